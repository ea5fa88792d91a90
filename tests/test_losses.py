"""Every loss against a hand computation."""

import math

import pytest
import torch

from lightning_modules.losses import (
    bce_with_logits,
    binary_accuracy_from_logits,
    confusion_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    kl_normal_std,
    reconstruction_bce,
)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_kl_normal_std_matches_the_closed_form_averaged_over_dims_and_batch():
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # 0.5 (μ² + σ² − 1 − log σ²) per element
    per_dim = [0.5 * (1 + 1 - 1 - 0), 0.5 * (0 + 2 - 1 - math.log(2.0)), 0.0, 0.5 * (4 + 1 - 1 - 0)]
    assert kl_normal_std(mu, logvar).item() == pytest.approx(sum(per_dim) / 4, abs=1e-7)


def test_kl_is_zero_at_the_prior():
    assert kl_normal_std(torch.zeros(3, 5), torch.zeros(3, 5)).item() == 0.0


def test_bce_with_logits_is_the_positive_cross_entropy_mean():
    logits = torch.tensor([0.0, 2.0, -1.0])
    target = torch.tensor([1.0, 0.0, 1.0])
    manual = [
        -(t * math.log(sigmoid(v)) + (1 - t) * math.log(1 - sigmoid(v)))
        for v, t in zip(logits.tolist(), target.tolist(), strict=True)
    ]
    assert bce_with_logits(logits, target).item() == pytest.approx(sum(manual) / 3, abs=1e-6)
    assert manual[0] == pytest.approx(math.log(2.0))
    assert bce_with_logits(logits, target).item() > 0


def test_bce_with_logits_broadcasts_a_float_target():
    logits = torch.tensor([0.5, -0.5])
    assert bce_with_logits(logits, 1.0).item() == pytest.approx(
        (softplus(-0.5) + softplus(0.5)) / 2, abs=1e-6
    )
    assert bce_with_logits(logits, 0.0).item() == pytest.approx(
        (softplus(0.5) + softplus(-0.5)) / 2, abs=1e-6
    )


def test_reconstruction_bce_averages_over_batch_and_every_pixel():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    x = torch.rand(2, 3, 4, 4)
    p = torch.sigmoid(logits.double())
    manual = -(x * p.log() + (1 - x) * (1 - p).log()).mean()
    assert reconstruction_bce(logits, x).item() == pytest.approx(manual.item(), abs=1e-6)


def test_gan_discriminator_loss_is_one_third_of_the_three_terms():
    real = torch.tensor([0.0, 1.0])
    recon = torch.tensor([1.0, -2.0])
    prior = torch.tensor([-1.0, 0.5])
    l_real = (softplus(-0.0) + softplus(-1.0)) / 2  # bce(l, 1) = softplus(-l)
    l_recon = (softplus(1.0) + softplus(-2.0)) / 2  # bce(l, 0) = softplus(l)
    l_prior = (softplus(-1.0) + softplus(0.5)) / 2
    expected = (l_real + l_recon + l_prior) / 3
    assert gan_discriminator_loss(real, [recon, prior]).item() == pytest.approx(expected, abs=1e-6)


def test_generator_losses_values():
    a, b = torch.tensor([1.0]), torch.tensor([-2.0])
    minimax = gan_generator_loss([a, b], "minimax").item()
    nonsat = gan_generator_loss([a, b], "non_saturating").item()
    assert minimax == pytest.approx(-(softplus(1.0) + softplus(-2.0)) / 3, abs=1e-6)
    assert nonsat == pytest.approx((softplus(-1.0) + softplus(2.0)) / 3, abs=1e-6)
    assert gan_generator_loss([a, b]).item() == nonsat  # non-saturating is the default


def test_minimax_generator_loss_has_the_gradient_of_minus_l_gan():
    real = torch.tensor([0.3, -0.2])
    fakes = [torch.tensor([1.0, -2.0], requires_grad=True), torch.tensor([0.5, 3.0], requires_grad=True)]
    g_minimax = torch.autograd.grad(gan_generator_loss(fakes, "minimax"), fakes)
    g_minus_lgan = torch.autograd.grad(-gan_discriminator_loss(real, fakes), fakes)
    for g1, g2 in zip(g_minimax, g_minus_lgan, strict=True):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("mode", ["minimax", "non_saturating"])
def test_generator_losses_push_fake_logits_up(mode):
    fake = torch.tensor([-10.0, 0.0, 3.0], requires_grad=True)
    (grad,) = torch.autograd.grad(gan_generator_loss([fake], mode), fake)
    assert (grad < 0).all()  # descending the loss raises D(fake)


def test_minimax_gradient_vanishes_where_non_saturating_does_not():
    """A confidently rejected fake (logit −10): d/dl of −softplus(l)/2 is −σ(l)/2 ≈ 0, of softplus(−l)/2 ≈ −1/2."""
    fake = torch.tensor([-10.0], requires_grad=True)
    (g_mm,) = torch.autograd.grad(gan_generator_loss([fake], "minimax"), fake)
    (g_ns,) = torch.autograd.grad(gan_generator_loss([fake], "non_saturating"), fake)
    assert g_mm.item() == pytest.approx(-sigmoid(-10.0) / 2, rel=1e-4)
    assert g_ns.item() == pytest.approx(-(1 - sigmoid(-10.0)) / 2, rel=1e-4)
    assert abs(g_ns.item()) > 1e4 * abs(g_mm.item())


def test_generator_loss_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        gan_generator_loss([torch.zeros(1)], "wasserstein")


def test_binary_accuracy_from_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    target = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert binary_accuracy_from_logits(logits, target).item() == 0.5


def test_confusion_loss_is_the_cross_entropy_to_one_half_and_minimal_at_zero_logit():
    logits = torch.tensor([0.0, 2.0, -1.0])
    p = torch.sigmoid(logits)
    by_hand = (-0.5 * (torch.log(p) + torch.log(1 - p))).mean()
    assert confusion_loss(logits).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # log 2 + KL(Bern(1/2) || Bern(p)): log 2 exactly at p = 1/2, with zero gradient there
    zero = torch.zeros(4, requires_grad=True)
    assert confusion_loss(zero).item() == pytest.approx(math.log(2), rel=1e-7)
    (grad,) = torch.autograd.grad(confusion_loss(zero), zero)
    assert torch.equal(grad, torch.zeros(4))
    # symmetric: a confidently wrong adversary costs as much as a confidently right one
    assert confusion_loss(torch.tensor([3.0])).item() == pytest.approx(confusion_loss(torch.tensor([-3.0])).item())
