"""CDVAE-GAN and its Bernoulli-VAE baseline: the losses against hand computations (eqs. 3.3-3.10), optimizer
isolation of E, G and D, counterfactual flips of z_B, checkpoints."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_modules.attribute_latents import (
    bernoulli_kl,
    divergence_loss,
    gan_value,
    gaussian_kl,
    gaussian_reconstruction,
    hard_bernoulli,
    relaxed_bernoulli,
)
from lightning_modules.cdvae_gan import CDVAEGAN
from lightning_modules.losses import gan_generator_loss
from lightning_modules.networks.cdvae_gan import Table1Decoder, Table1Discriminator, Table1Encoder
from lightning_modules.vae_bernoulli import BernoulliVAE
from tests.test_ifcvae import StepRecorder

SIZE, LATENT = 16, 4
ATTRS = ["Smiling", "Male", "Bangs"]
WIDTHS = (4, 4, 4)


def networks(k: int = len(ATTRS)) -> dict:
    return {
        "encoder": Table1Encoder(SIZE, 3, WIDTHS, (8,), LATENT, k),
        "decoder": Table1Decoder(SIZE, 3, LATENT + k, (4, 4), start_size=8, start_width=4),
        "discriminator": Table1Discriminator(SIZE, 3, WIDTHS, 8, feature_layer=2),
    }


def make_cdvae(**kwargs) -> CDVAEGAN:
    return CDVAEGAN(**networks(), attributes=ATTRS, **kwargs)


def make_vae(**kwargs) -> BernoulliVAE:
    nets = networks()
    return BernoulliVAE(nets["encoder"], nets["decoder"], attributes=ATTRS, **kwargs)


class AttributeSquares(Dataset):
    """Noise images with a bright square per attribute that is 1 (the batch contract)."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n, len(ATTRS)), generator=g).float()
        self.x = 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=g)
        for j in range(len(ATTRS)):
            self.x[self.y[:, j] == 1, :, 4 * j:4 * j + 4, 2:6] = 0.9

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "pa": {a: self.y[i, j] for j, a in enumerate(ATTRS)}, "index": i}


def loader(n: int = 16, batch_size: int = 8) -> DataLoader:
    return DataLoader(AttributeSquares(n), batch_size=batch_size)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, max_epochs=1)
    return pl.Trainer(**{**defaults, **kwargs})


# -- losses ----------------------------------------------------------------------------------------------------
def test_bernoulli_kl_is_eq_3_4_for_soft_labels():
    y = torch.tensor([[0.3, 1.0, 0.0]], dtype=torch.float64)
    pi = torch.tensor([[0.6, 0.8, 0.25]], dtype=torch.float64)
    expected = (0.3 * math.log(0.3 / 0.6) + 0.7 * math.log(0.7 / 0.4)) + math.log(1 / 0.8) + math.log(1 / 0.75)
    torch.testing.assert_close(bernoulli_kl(y, torch.logit(pi)), torch.tensor(expected, dtype=torch.float64))


def test_bernoulli_kl_equals_its_limit_eq_3_5_for_hard_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (5, 38), generator=g).double()
    logits = 3 * torch.randn(5, 38, generator=g, dtype=torch.float64)
    pi = torch.sigmoid(logits)
    eq_3_5 = -(y * pi.log() + (1 - y) * (1 - pi).log()).sum(1).mean()
    torch.testing.assert_close(bernoulli_kl(y, logits), eq_3_5, rtol=1e-12, atol=1e-12)
    # and it is the summed binary cross-entropy
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / 5
    torch.testing.assert_close(bernoulli_kl(y, logits), bce, rtol=1e-12, atol=1e-12)


def test_bernoulli_kl_is_exact_where_sigmoid_saturates():
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    logits = torch.tensor([[60.0, -60.0, -60.0, 60.0]])  # right, right, wrong, wrong
    value = bernoulli_kl(y, logits)
    assert torch.isfinite(value)
    torch.testing.assert_close(value, torch.tensor(120.0))  # -log sigmoid(-60) = 60 per wrong entry
    logits.requires_grad_(True)
    bernoulli_kl(y, logits).backward()
    assert torch.isfinite(logits.grad).all()


def test_gaussian_kl_and_divergence_by_hand():
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [0.0, 0.0]])
    per_image = [0.5 * 1 + 0.5 * (4 - math.log(4) - 1), 0.5 * 4]
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.tensor(sum(per_image) / 2))
    y, logits = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [0.0]])
    torch.testing.assert_close(divergence_loss(mu, logvar, y, logits, 2.0),
                               torch.tensor(sum(per_image) / 2 + 2.0 * math.log(2.0)))


def test_gaussian_reconstruction_by_hand():
    x = torch.zeros(2, 1, 1, 2)
    x_logits = torch.tensor([0.0, 0.0, 0.0, float(math.log(3.0))]).reshape(2, 1, 1, 2)  # x' = 0.5, 0.5 | 0.5, 0.75
    expected = 0.5 * ((0.25 + 0.25) + (0.25 + 0.5625)) / 0.25 / 2
    torch.testing.assert_close(gaussian_reconstruction(x_logits, x, 0.5), torch.tensor(expected))


def test_gan_terms_by_hand():
    d = {"real": 0.8, "prior": 0.3, "recon": 0.4}  # D's probabilities
    logits = {k: torch.logit(torch.tensor([v])) for k, v in d.items()}
    value = gan_value(logits["real"], logits["prior"], logits["recon"])
    torch.testing.assert_close(value, torch.tensor(math.log(0.8) + math.log(0.7) + math.log(0.6)))
    minimax = gan_generator_loss([logits["prior"], logits["recon"]], "minimax", "sum")
    torch.testing.assert_close(minimax, torch.tensor(math.log(0.7) + math.log(0.6)))
    ns = gan_generator_loss([logits["prior"], logits["recon"]], "non_saturating", "sum")
    torch.testing.assert_close(ns, torch.tensor(-math.log(0.3) - math.log(0.4)))
    with pytest.raises(ValueError, match="mode must be one of"):
        gan_generator_loss([logits["prior"], logits["recon"]], "wasserstein", "sum")
    with pytest.raises(ValueError, match="reduction"):
        gan_generator_loss([logits["prior"]], "minimax", "max")


def test_relaxed_bernoulli_tends_to_bernoulli_samples():
    torch.manual_seed(0)
    pi = torch.tensor([0.2, 0.5, 0.9])
    samples = relaxed_bernoulli(torch.logit(pi).expand(20000, 3), tau=0.1)
    assert ((samples < 0.05) | (samples > 0.95)).float().mean() > 0.85  # nearly binary at tau = 0.1
    torch.testing.assert_close(samples.mean(0), pi, atol=0.02, rtol=0)
    assert torch.equal(hard_bernoulli(torch.tensor([-0.1, 0.0, 0.1])), torch.tensor([0.0, 0.0, 1.0]))


# -- training: each optimizer step moves only its own player ---------------------------------------------------------
def names_of(model, player: str) -> set[str]:
    return {f"{player}.{n}" for n, _ in getattr(model, player).named_parameters()}


@pytest.mark.parametrize("make", [make_cdvae, make_vae], ids=["cdvae_gan", "vae_bernoulli"])
def test_each_optimizer_step_moves_only_its_own_player(make, tmp_path):
    torch.manual_seed(0)
    model, recorder = make(), StepRecorder()
    t = trainer(tmp_path, callbacks=[recorder])
    t.fit(model, loader(n=16, batch_size=8))
    n = len(model.players)
    assert [s["opt"] for s in recorder.steps] == list(range(n)) * 2
    for step in recorder.steps:
        assert step["changed"] == names_of(model, model.players[step["opt"]]), model.players[step["opt"]]
    if n == 3:
        # First batch: each backward leaves the other players' gradients as they were (None before their own
        # backward, then exactly the gradient of their own step).
        e, g, d = (names_of(model, p) for p in model.players)
        first = recorder.steps[:3]
        assert all(first[0]["grads"][name] is None for name in g | d)
        assert all(first[1]["grads"][name] is None for name in d)
        for name in e:
            assert torch.equal(first[1]["grads"][name], first[0]["grads"][name])
            assert torch.equal(first[2]["grads"][name], first[0]["grads"][name])
        for name in g:
            assert torch.equal(first[2]["grads"][name], first[1]["grads"][name])


def test_encoder_step_follows_l_div_plus_l_rec(tmp_path):
    """E's gradient is ∇_E (L_Div + L_Rec) at the batch's relaxed code (Algorithm 1 line 11), recomputed by hand."""
    torch.manual_seed(0)
    model = make_cdvae(lambda_b=2.0, rec_sigma=0.3)
    reference = __import__("copy").deepcopy(model).train()
    states = []
    forward = model._forward

    def recording_forward(x):
        states.append(torch.get_rng_state())
        return forward(x)

    model._forward = recording_forward
    recorder = StepRecorder()
    trainer(tmp_path, callbacks=[recorder], max_steps=1).fit(model, loader(n=8, batch_size=8))
    data = AttributeSquares(8)
    torch.set_rng_state(states[0])
    mu, logvar, logits = reference.encoder(data.x)
    z_g = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    z_b = torch.sigmoid((logits + u.log() - (-u).log1p()) / 0.1)
    x_rec = torch.sigmoid(reference.decoder(torch.cat([z_g, z_b], 1)))
    kl_g = (0.5 * (mu**2 + logvar.exp() - logvar - 1)).sum(1).mean()
    pi = torch.sigmoid(logits)
    kl_b = -(data.y * pi.log() + (1 - data.y) * (1 - pi).log()).sum(1).mean()
    rec = (0.5 * ((x_rec - data.x) / 0.3) ** 2).flatten(1).sum(1).mean()
    params = dict(reference.encoder.named_parameters())
    grads = torch.autograd.grad(kl_g + 2.0 * kl_b + rec, list(params.values()))
    # float32 sums in another order: differences are relative to the largest gradient, not to each entry (a
    # convolution bias followed by BatchNorm has a gradient that is exactly 0 up to that noise)
    scale = max(g.abs().max().item() for g in grads)
    for (name, _), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(recorder.steps[0]["grads"][f"encoder.{name}"], g, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("gamma", [15.0, 3.0])
def test_generator_step_follows_gamma_l_rec_plus_its_gan_term(gamma, tmp_path):
    """G's gradient is ∇_G (γ L_Rec + L_GAN's generator term) at E's code before E moved (Algorithm 1 line 12),
    recomputed by hand: a G loss without γ, or with another GAN term, fails it."""
    torch.manual_seed(0)
    model = make_cdvae(gamma=gamma, rec_sigma=0.4)
    reference = __import__("copy").deepcopy(model).train()
    states = []
    forward = model._forward

    def recording_forward(x):
        states.append(torch.get_rng_state())
        return forward(x)

    model._forward = recording_forward
    recorder = StepRecorder()
    trainer(tmp_path, callbacks=[recorder], max_steps=1).fit(model, loader(n=8, batch_size=8))
    data = AttributeSquares(8)
    torch.set_rng_state(states[0])
    mu, logvar, logits = reference.encoder(data.x)
    z_g = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    z = torch.cat([z_g, torch.sigmoid((logits + u.log() - (-u).log1p()) / 0.1)], 1).detach()
    prior = torch.cat([torch.randn(8, LATENT), torch.bernoulli(torch.full((8, len(ATTRS)), 0.5))], 1)
    x_rec, x_prior = torch.sigmoid(reference.decoder(z)), torch.sigmoid(reference.decoder(prior))
    d = reference.discriminator
    gen = -F.logsigmoid(d(x_prior)).mean() - F.logsigmoid(d(x_rec)).mean()  # non-saturating (the default)
    rec = (0.5 * ((x_rec - data.x) / 0.4) ** 2).flatten(1).sum(1).mean()
    params = dict(reference.decoder.named_parameters())
    grads = torch.autograd.grad(gamma * rec + gen, list(params.values()))
    scale = max(g.abs().max().item() for g in grads)
    step = next(s for s in recorder.steps if s["opt"] == 1)
    for (name, _), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(step["grads"][f"decoder.{name}"], g, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_prior_samples_and_same_point_passes_do_not_touch_running_statistics(tmp_path):
    """Per batch, G's BatchNorm statistics are updated once (E's reconstruction pass), not by prior samples."""
    torch.manual_seed(0)
    model = make_cdvae()
    trainer(tmp_path, max_steps=6).fit(model, loader(n=16, batch_size=8))
    tracked = [m.num_batches_tracked.item() for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert tracked and set(tracked) == {2}  # two batches -> two updates


# -- the counterfactual contract -------------------------------------------------------------------------------------
def decoded_codes(model: CDVAEGAN) -> list[torch.Tensor]:
    codes: list[torch.Tensor] = []
    model.decoder.register_forward_pre_hook(lambda module, args: codes.append(args[0].detach().clone()))
    return codes


def test_counterfactual_sets_only_the_requested_z_b_entries():
    torch.manual_seed(0)
    model = make_cdvae().eval()
    data = AttributeSquares(8)
    pa = {a: data.y[:, j] for j, a in enumerate(ATTRS)}
    codes = decoded_codes(model)
    with torch.no_grad():
        factual = model.abduct_code(data.x)
        mu, _, logits = model.encoder(data.x)
        torch.testing.assert_close(factual, torch.cat([mu, (logits > 0).float()], 1))
        model.counterfactual(data.x, pa, {"Male": 1 - pa["Male"]})
        model.counterfactual(data.x, pa, {"Smiling": torch.ones(8), "Bangs": torch.zeros(8)})
    single, multi = codes
    j_male, j_smile, j_bangs = (LATENT + ATTRS.index(a) for a in ("Male", "Smiling", "Bangs"))
    assert torch.equal(single[:, j_male], 1 - pa["Male"])
    keep = [c for c in range(LATENT + 3) if c != j_male]
    assert torch.equal(single[:, keep], factual[:, keep])
    assert torch.equal(multi[:, j_smile], torch.ones(8)) and torch.equal(multi[:, j_bangs], torch.zeros(8))
    assert torch.equal(multi[:, : LATENT], factual[:, : LATENT])
    assert torch.equal(multi[:, j_male], factual[:, j_male])
    with pytest.raises(KeyError, match="cannot intervene on \\['Young'\\]"):
        model.counterfactual(data.x, pa, {"Young": torch.ones(8)})


def test_contract_methods():
    torch.manual_seed(0)
    model = make_cdvae().eval()
    data = AttributeSquares(4)
    pa = {a: data.y[:, j] for j, a in enumerate(ATTRS)}
    with torch.no_grad():
        probs = model.predict_attributes(data.x)
        torch.testing.assert_close(torch.stack([probs[a] for a in ATTRS], 1), torch.sigmoid(model.encoder(data.x)[2]))
        assert torch.equal(model.abduct(data.x, pa), model.encoder(data.x)[0])
        # predict reads z_B from pa (the decoder as the image mechanism); reconstruct uses E's own z_B
        z = model.abduct(data.x, pa)
        torch.testing.assert_close(model.predict(z, pa), torch.sigmoid(model.decoder(torch.cat([z, data.y], 1))))
        torch.testing.assert_close(model.reconstruct(data.x, pa), torch.sigmoid(model.decoder(model.abduct_code(data.x))))
        for image in (model.sample(pa), model.counterfactual(data.x, pa, {})):
            assert image.shape == (4, 3, SIZE, SIZE) and image.min() >= 0 and image.max() <= 1
    with pytest.raises(KeyError, match="needs attributes \\['Bangs'\\]"):
        model.sample({"Smiling": data.y[:, 0], "Male": data.y[:, 1]})


def test_mismatched_networks_fail_with_a_clear_message():
    nets = networks(k=2)
    with pytest.raises(ValueError, match="n_attributes=2, but CDVAEGAN needs 3"):
        CDVAEGAN(**nets, attributes=ATTRS)
    nets = networks()
    nets["decoder"] = Table1Decoder(SIZE, 3, LATENT + 1, (4, 4), 8, 4)
    with pytest.raises(ValueError, match="latent_dim \\+ k = 4 \\+ 3 = 7"):
        CDVAEGAN(**nets, attributes=ATTRS)
    with pytest.raises(ValueError, match="gan_loss must be one of"):
        make_cdvae(gan_loss="hinge")


@pytest.mark.parametrize("make, cls", [(make_cdvae, CDVAEGAN), (make_vae, BernoulliVAE)], ids=["cdvae_gan", "vae"])
def test_checkpoint_round_trip_is_exact(make, cls, tmp_path):
    torch.manual_seed(0)
    model = make(lambda_b=0.5)
    t = trainer(tmp_path, limit_val_batches=1)
    t.fit(model, loader(n=16, batch_size=8), loader(n=8, batch_size=8))
    assert "val/loss/kl_b" in t.callback_metrics and "val/acc/pi" in t.callback_metrics
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    loaded = cls.load_from_checkpoint(path).eval()
    model.eval()
    assert dict(loaded.hparams) == dict(model.hparams) and loaded.hparams.lambda_b == 0.5
    data = AttributeSquares(8)
    pa = {a: data.y[:, j] for j, a in enumerate(ATTRS)}
    do = {"Male": 1 - pa["Male"], "Bangs": 1 - pa["Bangs"]}
    with torch.no_grad():
        assert torch.equal(model.counterfactual(data.x, pa, do), loaded.counterfactual(data.x, pa, do))
        assert torch.equal(model.reconstruct(data.x, pa), loaded.reconstruct(data.x, pa))
        assert torch.equal(model.predict_attributes(data.x)["Smiling"], loaded.predict_attributes(data.x)["Smiling"])
