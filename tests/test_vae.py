"""The unconditional VAE of CLD: ELBO terms, posterior API, checkpoints and its experiments."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from configs.loader import compose
from experiments.runner import run
from lightning_modules.vae import VAE, gaussian_kl_std, reconstruction_nll
from tests.test_predictors import experiment_overrides

ENC = {
    "_target_": "lightning_modules.networks.encoders.ConvEncoder",
    "image_size": 8,
    "in_channels": 1,
    "base_width": 4,
    "latent_dim": 3,
    "n_attributes": 0,
}
DEC = {
    "_target_": "lightning_modules.networks.decoders.ConvDecoder",
    "image_size": 8,
    "out_channels": 1,
    "base_width": 4,
    "in_features": 3,
}


def make(**kw) -> VAE:
    torch.manual_seed(0)
    return VAE(ENC, DEC, **kw)


def test_elbo_terms_match_hand_computations():
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    # 0.5 (μ² + σ² − 1 − log σ²) summed: 0.5 (1 + 1 − 1 − 0) + 0.5 (0 + 4 − 1 − log 4)
    assert gaussian_kl_std(mu, logvar).item() == pytest.approx(0.5 + 0.5 * (3 - math.log(4.0)))
    logits, x = torch.tensor([[[[0.0, 2.0]]]]), torch.tensor([[[[1.0, 0.25]]]])
    p = torch.sigmoid(logits).flatten()
    bce = -(math.log(p[0]) + 0.25 * math.log(p[1]) + 0.75 * math.log(1 - p[1]))
    assert reconstruction_nll(logits, x, "bernoulli").item() == pytest.approx(bce, rel=1e-5)
    s = 0.5
    gauss = sum(
        0.5 * ((xi - pi) / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)
        for xi, pi in zip([1.0, 0.25], p.tolist(), strict=True)
    )
    assert reconstruction_nll(logits, x, "gaussian", sigma=s).item() == pytest.approx(gauss, rel=1e-5)
    with pytest.raises(ValueError, match="likelihood"):
        make(likelihood="poisson")


def test_training_loss_is_the_negative_elbo():
    model = make(beta=1.0)
    logged = {}
    model.log = lambda k, v, **_: logged.__setitem__(k, float(v.detach()))
    x = torch.rand(4, 1, 8, 8)
    torch.manual_seed(5)
    loss = model.training_step({"x": x}, 0)
    torch.manual_seed(5)
    logits, mu, logvar = model(x)
    expected = (
        F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
        + gaussian_kl_std(mu, logvar)
    ).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logged["train/elbo"] == pytest.approx(-loss.item(), rel=1e-5)


def test_posterior_runs_in_eval_mode_without_touching_weights_or_bn_stats():
    model = make()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(5, 1, 8, 8)
    mean, logvar = model.posterior(x)
    assert mean.shape == logvar.shape == (5, 3) and not mean.requires_grad
    assert model.reconstruct(x).shape == x.shape and model.sample(2).shape == (2, 1, 8, 8)
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Deterministic and per image: the posterior of one image does not depend on the batch.
    assert torch.allclose(model.posterior(x[:1])[0], mean[:1], atol=1e-6)


def test_mismatched_latent_sizes_fail():
    with pytest.raises(ValueError, match="in_features"):
        VAE(ENC, {**DEC, "in_features": 4})


def test_checkpoint_alone_rebuilds_the_vae(tmp_path):
    model = make(likelihood="gaussian", sigma=0.2)
    x = torch.rand(16, 1, 8, 8)
    loader = torch.utils.data.DataLoader([{"x": x[i]} for i in range(16)], batch_size=8)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, loader, loader)
    assert {"val/loss", "val/elbo", "val/rec", "val/kl"} <= set(trainer.logged_metrics)
    trainer.save_checkpoint(tmp_path / "vae.ckpt")
    loaded = VAE.load_from_checkpoint(tmp_path / "vae.ckpt", map_location="cpu")
    assert loaded.hparams.likelihood == "gaussian" and loaded.hparams.sigma == 0.2
    for a, b in zip(model.posterior(x), loaded.posterior(x), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["vae_morphomnist", "vae_morphomnist_synth"])
def test_vae_experiments_survive_fast_dev_run(name, tmp_path):
    result = run(
        compose(name, [*experiment_overrides(name, tmp_path), "trainer.fast_dev_run=true", "run_id=fdr"])
    )
    assert {"test/loss", "test/elbo", "test/kl"} <= set(result.metrics)
    assert compose(name).model._latent == 16
