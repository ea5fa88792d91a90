"""The conditional VAE image mechanism of the Deep-SCM benchmark: the ELBO against hand computations, the
N(0, I) prior, the fixed σ, shapes at both published resolutions, abduction-action-prediction with its
residual temperature, checkpoints, training and its experiments."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from configs.loader import compose, instantiate
from lightning_modules.cvae import ConditionalVAE, CVAENoise, negative_elbo
from lightning_modules.likelihoods import discretized_gaussian_nll, to_signed, to_unit
from lightning_modules.networks.conditional_vae import ConditionalDecoder, ConditionalEncoder
from lightning_modules.optim import linear_warmup

PARENTS = {"t": {"kind": "continuous"}, "d": {"kind": "categorical", "num_classes": 3}}  # width 1 + 3
ENC = {"_target_": "lightning_modules.networks.conditional_vae.ConditionalEncoder", "image_size": 8,
       "in_channels": 1, "channels": [4, 4], "kernels": [3, 3], "hidden_dim": 8, "latent_dim": 3, "cond_dim": 4}
DEC = {"_target_": "lightning_modules.networks.conditional_vae.ConditionalDecoder", "image_size": 8,
       "out_channels": 1, "channels": [4, 4, 4], "kernels": [3, 3], "hidden_dim": 8, "latent_dim": 3,
       "cond_dim": 4}


def make(learned: bool = False, **kw) -> ConditionalVAE:
    torch.manual_seed(0)
    return ConditionalVAE(ENC, {**DEC, "log_scale": None if learned else -2.5}, PARENTS, **kw).eval()


def batch(n: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g).float() / 255.0  # on the 8-bit grid
    pa = {"t": torch.rand(n, generator=g) * 2 - 1, "d": torch.randint(0, 3, (n,), generator=g).float()}
    return {"x": x, "pa": pa, "index": torch.arange(n)}


# -- the ELBO and the prior ---------------------------------------------------------------------------------
def test_kl_matches_the_closed_form_against_a_standard_normal_prior():
    mu, logvar = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, math.log(4.0)]])
    x, loc, log_scale = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -2.5)
    terms = negative_elbo(x, loc, log_scale, mu, logvar, beta=5.0)
    # 0.5 Σ (μ² + σ² − 1 − log σ²) = 0.5 (1 + 1 − 1 − 0) + 0.5 (4 + 4 − 1 − log 4)
    assert terms["kl"].item() == pytest.approx(0.5 + 0.5 * (7.0 - math.log(4.0)), rel=1e-6)
    assert terms["total"].item() == pytest.approx(terms["nll"].item() + 5.0 * terms["kl"].item(), rel=1e-6)
    assert terms["nll"].item() == pytest.approx(discretized_gaussian_nll(x, loc, log_scale).item())
    # The prior is N(0, I): the posterior N(0, I) costs nothing. The published prior N(0, e²) would charge
    # 0.5 (e⁻² − 1 + 2) per dimension here.
    zero = negative_elbo(x, loc, log_scale, torch.zeros(1, 16), torch.zeros(1, 16))["kl"]
    assert zero.item() == 0.0
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
    assert terms["kl"].item() == pytest.approx(torch.distributions.kl_divergence(q, p).sum().item(), rel=1e-6)


def test_likelihood_gradients_are_finite_far_from_the_mean():
    """Every grey level against means across [-1, 1] and σ from e⁻⁵ to 1: the branches that ``torch.where``
    discards must not send NaN gradients into training (they did, and every update was skipped)."""
    x = to_signed(torch.arange(256.0) / 255.0)[:, None, None]
    loc = torch.linspace(-1, 1, 21)[None, :, None].expand(256, 21, 6).clone().requires_grad_()
    log_scale = torch.linspace(-5, 0, 6)[None, None, :].expand(256, 21, 6).clone().requires_grad_()
    nll = discretized_gaussian_nll(x.expand(256, 21, 6)[None], loc[None], log_scale[None])
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()


def test_the_training_loss_is_the_negative_elbo_per_image():
    model = make(beta=2.0)
    b = batch()
    torch.manual_seed(3)
    terms = model.loss_terms(b)
    torch.manual_seed(3)
    c = model.condition(b["pa"])
    mu, logvar = model.encoder(b["x"], c)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    loc, log_scale = model.decoder(z, c)
    nll = discretized_gaussian_nll(to_signed(b["x"]), loc, log_scale)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    assert torch.allclose(terms["nll"], nll) and torch.allclose(terms["kl"], kl)
    assert torch.allclose(terms["total"], nll + 2.0 * kl)


def test_fixed_sigma_is_e_to_the_minus_five_and_learned_sigma_is_a_second_head():
    model = make()
    c = model.condition(batch()["pa"])
    loc, log_scale = model.decoder(torch.randn(6, 3), c)
    assert torch.equal(log_scale, torch.full_like(loc, -2.5))
    assert torch.exp(2 * log_scale[0, 0, 0, 0]).item() == pytest.approx(math.exp(-5.0))
    assert not model.decoder.learned_scale and model.decoder.scale_head is None
    learned = make(learned=True)
    loc, log_scale = learned.decoder(torch.randn(6, 3), c)
    assert learned.decoder.learned_scale and log_scale.shape == loc.shape and log_scale.std() > 0
    n = sum(p.numel() for p in learned.parameters()) - sum(p.numel() for p in model.parameters())
    assert n == 4 + 1  # the 1x1 head: 4 channels -> 1, with a bias


@pytest.mark.parametrize("name, shape", [("cvae_morphomnist", (1, 32, 32)), ("cvae_celeba_simple", (3, 64, 64))])
def test_published_variants_have_the_right_shapes(name, shape):
    cfg = compose(name, ["model.scm_checkpoint=null"])  # the network alone: no trained SCM needed
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    assert model.latent_dim == 16
    n = 3
    if name == "cvae_morphomnist":
        pa = {"thickness": torch.zeros(n), "intensity": torch.zeros(n), "digit": torch.tensor([0.0, 4.0, 9.0])}
        assert model.condition(pa).shape == (n, 12)
    else:
        pa = {"Smiling": torch.ones(n), "Eyeglasses": torch.zeros(n)}
    x = torch.rand(n, *shape)
    mu, logvar = model.posterior(x, model.condition(pa))
    assert mu.shape == logvar.shape == (n, 16)
    loc, log_scale = model.likelihood(mu, model.condition(pa))
    assert loc.shape == log_scale.shape == (n, *shape)
    noise = model.abduct(x, pa)
    assert noise.z.shape == (n, 16) and noise.eps.shape == (n, *shape)
    for out in (model.counterfactual(x, pa, {}), model.reconstruct(x, pa), model.sample(pa)):
        assert out.shape == (n, *shape) and out.min() >= 0 and out.max() <= 1


def test_parameter_counts_follow_the_published_tables():
    """Tables 7-8 and 9-10 (with the published code's two heads and 1x1 Gaussian network), counted by hand."""
    def count(module):
        return sum(p.numel() for p in module.parameters())

    mnist = instantiate(compose("cvae_morphomnist", ["model.scm_checkpoint=null"]).model)
    enc = (1 * 32 * 25 + 32) + 2 * (32 * 32 * 9 + 32) + (512 * 128 + 128) + ((128 + 12) * 128 + 128) + 2 * (128 * 16 + 16)
    dec = ((16 + 12) * 128 + 128) + (128 * 512 + 512) + 2 * (32 * 32 * 9 + 32) + (32 * 16 * 25 + 16) + (16 + 1)
    assert (count(mnist.encoder), count(mnist.decoder)) == (enc, dec) == (107_168, 101_089)
    celeba = instantiate(compose("cvae_celeba_simple").model)
    convs = [(3, 32), (32, 64), (64, 128), (128, 256)]
    enc = (sum(i * o * 9 + o + 2 * o for i, o in convs) + (256 * 256 + 256) + (4096 * 256 + 256)
           + ((256 + 2) * 256 + 256) + 2 * (256 * 16 + 16))
    convs = [(256, 256), (256, 128), (128, 64), (64, 32), (32, 16)]
    dec = (((16 + 2) * 256 + 256) + (256 * 4096 + 4096) + sum(i * o * 9 + o + 2 * o for i, o in convs)
           + (16 * 3 + 3))
    assert (count(celeba.encoder), count(celeba.decoder)) == (enc, dec) == (1_578_528, 2_040_579)


def test_networks_reject_inconsistent_shapes():
    with pytest.raises(ValueError, match=r"set model._cond_dim=4"):
        ConditionalVAE({**ENC, "cond_dim": 12}, DEC, PARENTS)
    with pytest.raises(ValueError, match="latent_dim"):
        ConditionalVAE(ENC, {**DEC, "latent_dim": 5}, PARENTS)
    with pytest.raises(ValueError, match="at least 3"):
        ConditionalDecoder(image_size=32, channels=[4, 4, 4], kernels=[3, 3])
    with pytest.raises(ValueError, match="same, non-zero length"):
        ConditionalEncoder(channels=[4, 4], kernels=[3])
    with pytest.raises(ValueError, match="residual_temperature"):
        make(residual_temperature=-0.1)


# -- abduction, action, prediction --------------------------------------------------------------------------
@pytest.mark.parametrize("learned", [False, True])
def test_residual_temperature_one_makes_the_factual_counterfactual_exact(learned):
    """Abducting ε = (x − loc)/σ and predicting loc + 1·σ·ε gives x back whatever the networks are: composition
    is trivially perfect at t = 1 (and the posterior sample z does not matter)."""
    model = make(learned, residual_temperature=1.0, latent_temperature=1.0)
    b = batch()
    with torch.no_grad():
        x_cf = model.counterfactual(b["x"], b["pa"], {"t": b["pa"]["t"].clone(), "d": b["pa"]["d"].clone()})
    assert torch.allclose(x_cf, b["x"], atol=1e-5)


def test_fixed_sigma_at_temperature_one_adds_the_change_of_the_mean():
    """With a fixed σ, σ cancels: x* = x + loc(z, pa*) − loc(z, pa) (then clipped)."""
    model = make(residual_temperature=1.0, latent_temperature=0.0)
    b = batch()
    do = {"d": (b["pa"]["d"] + 1) % 3}
    with torch.no_grad():
        z = model.encoder(b["x"], model.condition(b["pa"]))[0]
        loc = model.decoder(z, model.condition(b["pa"]))[0]
        loc_cf = model.decoder(z, model.condition({**b["pa"], **do}))[0]
        x_cf = model.counterfactual(b["x"], b["pa"], do)
    assert torch.allclose(x_cf, to_unit(to_signed(b["x"]) + loc_cf - loc), atol=1e-6)
    assert not torch.allclose(x_cf, b["x"], atol=1e-3)


@pytest.mark.parametrize("learned", [False, True])
def test_residual_temperature_scales_the_abducted_residual_exactly(learned):
    b = batch()
    do = {"t": -b["pa"]["t"], "d": (b["pa"]["d"] + 2) % 3}
    pa_cf = {**b["pa"], **do}
    for t in (0.0, 0.1, 0.5, 1.0):
        model = make(learned, residual_temperature=t, latent_temperature=0.0)
        with torch.no_grad():
            c, c_cf = model.condition(b["pa"]), model.condition(pa_cf)
            z = model.encoder(b["x"], c)[0]  # latent temperature 0: the posterior mean
            loc, log_scale = model.decoder(z, c)
            eps = (to_signed(b["x"]) - loc) / log_scale.exp()
            loc_cf, log_scale_cf = model.decoder(z, c_cf)
            x_cf = model.counterfactual(b["x"], b["pa"], do)
        expected = to_unit(loc_cf + t * log_scale_cf.exp() * eps)
        assert torch.allclose(x_cf, expected, atol=1e-6)
        if t == 0.0:  # no residual: the decoder mean at (z, pa*)
            assert torch.allclose(x_cf, to_unit(loc_cf), atol=1e-7)


def test_abduction_returns_both_noises_and_the_latent_temperature_controls_z():
    b = batch()
    model = make(latent_temperature=0.0)
    with torch.no_grad():
        mu, logvar = model.encoder(b["x"], model.condition(b["pa"]))
        noise = model.abduct(b["x"], b["pa"])
        assert isinstance(noise, CVAENoise) and torch.equal(noise.z, mu)
        model.hparams.latent_temperature = 1.0
        torch.manual_seed(7)
        z = model.abduct(b["x"], b["pa"]).z
        torch.manual_seed(7)
        assert torch.allclose(z, mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
        # reconstruct is the decoder mean at the abducted z; predict adds the residual
        model.hparams.latent_temperature = 0.0
        loc = model.decoder(mu, model.condition(b["pa"]))[0]
        assert torch.allclose(model.reconstruct(b["x"], b["pa"]), to_unit(loc))


def test_sample_decodes_prior_draws():
    model = make()
    pa = batch()["pa"]
    with torch.no_grad():
        torch.manual_seed(11)
        x = model.sample(pa)
        torch.manual_seed(11)
        expected = to_unit(model.decoder(torch.randn(6, 3), model.condition(pa))[0])
    assert torch.equal(x, expected)


# -- training and checkpoints -------------------------------------------------------------------------------
def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


def _loader(b: dict, repeat: int = 1):
    items = [{"x": b["x"][i], "pa": {k: v[i] for k, v in b["pa"].items()}, "index": b["index"][i]}
             for i in range(len(b["x"]))] * repeat
    return torch.utils.data.DataLoader(items, batch_size=len(b["x"]))


def test_a_few_steps_reduce_the_loss():
    model = make(warmup_steps=1, lr=1e-2)
    b = batch()
    torch.manual_seed(0)
    before = model.loss_terms(b)["total"].mean().item()
    model.train()
    _trainer(max_steps=20).fit(model, _loader(b, repeat=20))
    model.eval()
    torch.manual_seed(0)
    after = model.loss_terms(b)["total"].mean().item()
    assert after < 0.9 * before
    assert model.skipped_updates.item() == 0


def test_oversized_updates_are_skipped_and_counted():
    model = make(grad_skip=1e-9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(max_steps=3)
    trainer.fit(model, _loader(batch(), repeat=3))
    assert model.skipped_updates.item() == 3 and trainer.global_step == 3
    for k, v in model.state_dict().items():
        if k != "skipped_updates":
            assert torch.equal(v, before[k]), k


def test_linear_warmup():
    f = linear_warmup(100)
    assert [f(0), f(49), f(99), f(500)] == [0.01, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("learned", [False, True])
def test_checkpoint_alone_rebuilds_the_model(tmp_path, learned):
    model = make(learned, residual_temperature=0.3, latent_temperature=0.0)
    b = batch()
    trainer = _trainer(max_epochs=1)
    trainer.fit(model, _loader(b), _loader(b))
    assert {"val/loss", "val/nll_per_pixel", "val/kl", "val/nats_per_pixel"} <= set(trainer.logged_metrics)
    trainer.save_checkpoint(tmp_path / "cvae.ckpt")
    loaded = ConditionalVAE.load_from_checkpoint(tmp_path / "cvae.ckpt", map_location="cpu").eval()
    model.eval()
    assert loaded.hparams.residual_temperature == 0.3 and loaded.decoder.learned_scale == learned
    assert loaded.hparams.parents == PARENTS and loaded.scm is None
    do = {"d": (b["pa"]["d"] + 1) % 3}
    with torch.no_grad():
        for method in ("reconstruct", "counterfactual"):
            args = (b["x"], b["pa"], do) if method == "counterfactual" else (b["x"], b["pa"])
            assert torch.equal(getattr(model, method)(*args), getattr(loaded, method)(*args)), method
        torch.manual_seed(2)
        s = model.sample(b["pa"])
        torch.manual_seed(2)
        assert torch.equal(s, loaded.sample(b["pa"]))


# -- experiments --------------------------------------------------------------------------------------------
def test_experiments_set_the_published_settings():
    fixed, learned = compose("cvae_morphomnist"), compose("cvae_learned_sigma_morphomnist")
    assert fixed.model.decoder.log_scale == -2.5 and learned.model.decoder.log_scale is None
    assert fixed.model.beta == 1.0 and list(fixed.model.betas) == [0.9, 0.9] and fixed.model.weight_decay == 0.01
    simple, complex_ = compose("cvae_celeba_simple"), compose("cvae_celeba_complex")
    assert list(simple.data.attributes) == ["Smiling", "Eyeglasses"] and simple.model._cond_dim == 2
    assert list(complex_.data.attributes) == ["Young", "Male", "No_Beard", "Bald"] and complex_.model._cond_dim == 4
    assert simple.model.beta == 5.0 and simple.model.lr == 5e-4 and simple.model.weight_decay == 0.0
    assert list(compose("cvae_celeba_simple_synth").data.attributes) == ["Smiling", "Eyeglasses"]
