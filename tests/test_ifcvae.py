"""IFCVAE: optimizer isolation, exact per-player gradients, the ŷ -> decoder coupling, checkpoints, training."""

import copy
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_modules.ifcvae import IFCVAE
from lightning_modules.losses import reconstruction_bce
from lightning_modules.networks.classifiers import MLPClassifier
from lightning_modules.networks.decoders import ConvDecoder
from lightning_modules.networks.discriminators import ConvDiscriminator
from lightning_modules.networks.encoders import ConvEncoder

SIZE, WIDTH, LATENT, ATTR = 16, 8, 8, "Smiling"
PLAYERS = ("encoder", "decoder", "discriminator", "auxiliary")  # the order of configure_optimizers


def make_model(norm: str = "none", arch: str = "dcgan", **kwargs) -> IFCVAE:
    return IFCVAE(
        encoder=ConvEncoder(SIZE, 3, WIDTH, LATENT, 1, arch=arch, norm=norm),
        decoder=ConvDecoder(SIZE, 3, WIDTH, LATENT + 1, arch=arch),
        discriminator=ConvDiscriminator(SIZE, 3, WIDTH, arch=arch, norm=norm),
        auxiliary=MLPClassifier(LATENT, (16,), 1),
        attribute=ATTR,
        **kwargs,
    )


class SquaresDataset(Dataset):
    """Dim noise images with a bright top-left square iff the attribute is 1 (the batch contract)."""

    def __init__(self, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.y = (torch.arange(n) % 2).float()
        self.x = 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=g)
        self.x[self.y == 1, :, 2:8, 2:8] = 0.9

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "pa": {ATTR: self.y[i], "Male": 1 - self.y[i]}, "index": i}


def loader(n: int = 8, batch_size: int = 8) -> DataLoader:
    return DataLoader(SquaresDataset(n), batch_size=batch_size)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        max_epochs=1,
    )
    return pl.Trainer(**{**defaults, **kwargs})


class StepRecorder(pl.Callback):
    """Hooks every optimizer step: which parameters it changed and the gradients it received."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.module = pl_module
        for index, opt in enumerate(trainer.optimizers):
            opt.register_step_pre_hook(partial(self._pre, index))
            opt.register_step_post_hook(partial(self._post, index))

    def _pre(self, index, optimizer, args, kwargs):
        params = dict(self.module.named_parameters())
        self.steps.append(
            {
                "opt": index,
                "before": {n: p.detach().clone() for n, p in params.items()},
                "grads": {n: None if p.grad is None else p.grad.clone() for n, p in params.items()},
            }
        )

    def _post(self, index, optimizer, args, kwargs):
        step = self.steps[-1]
        step["changed"] = {
            n for n, p in self.module.named_parameters() if not torch.equal(p.detach(), step["before"][n])
        }


def names_of(model: IFCVAE, player: str) -> set[str]:
    return {f"{player}.{n}" for n, _ in getattr(model, player).named_parameters()}


# -- (1) optimizer isolation ---------------------------------------------------------------------------
def test_each_optimizer_step_moves_only_its_own_player(tmp_path):
    model, recorder = make_model(), StepRecorder()
    t = trainer(tmp_path, callbacks=[recorder])
    t.fit(model, loader(n=16, batch_size=8))

    assert [s["opt"] for s in recorder.steps] == [0, 1, 2, 3] * 2
    assert t.global_step == 8  # Lightning counts optimizer steps: four per batch
    for step in recorder.steps:
        own = names_of(model, PLAYERS[step["opt"]])
        assert step["changed"] == own, PLAYERS[step["opt"]]
    # The encoder/decoder backward puts no gradient into the discriminator or the auxiliary network.
    first = recorder.steps[0]["grads"]
    others = names_of(model, "discriminator") | names_of(model, "auxiliary")
    assert all(first[n] is None for n in others)


def test_aux_steps_repeats_only_the_auxiliary_update_on_the_same_codes(tmp_path):
    torch.manual_seed(0)
    model = make_model(aux_steps=3)
    reference, x, y, rng_state, recorder = run_one_step(model, tmp_path, max_steps=6)
    assert [s["opt"] for s in recorder.steps] == [0, 1, 2, 3, 3, 3]
    for step in recorder.steps[3:]:
        assert step["changed"] == names_of(model, "auxiliary")
    # Each A-step's gradient is L_aux's on the batch's detached codes, at A as the previous step left it.
    hp = reference.hparams
    ref_opt = torch.optim.RMSprop(reference.auxiliary.parameters(), lr=hp.aux_lr, alpha=hp.rmsprop_alpha)
    torch.set_rng_state(rng_state)
    out = reference._forward(x, y)
    for recorded in recorder.steps[3:]:
        ref_opt.zero_grad()
        reference._aux_loss(out, y).backward()
        for name, param in reference.auxiliary.named_parameters():
            torch.testing.assert_close(recorded["grads"][f"auxiliary.{name}"], param.grad)
        ref_opt.step()


# -- (2), (3) exact per-player gradients ------------------------------------------------------------------
def reference_objectives(net: IFCVAE, x, y, rng_state, hp) -> tuple[torch.Tensor, torch.Tensor]:
    """L_IFcVAE-GAN (eq. 6) and L_dec (eq. 3, + the x̂-class ablation), written out from the paper."""
    torch.set_rng_state(rng_state)
    E, D, C, A = net.encoder, net.decoder, net.discriminator, net.auxiliary
    mu, logvar, y_logit = E(x)
    y_logit = y_logit[:, 0]
    z_hat = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    z = torch.randn_like(mu)
    x_hat = D(torch.cat([torch.sigmoid(y_logit)[:, None], z_hat], 1))
    x_p = D(torch.cat([y[:, None], z], 1))
    bce = F.binary_cross_entropy_with_logits
    rec = bce(x_hat, x)
    kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).mean()
    cls = bce(y_logit, y)
    aux = bce(A(z_hat)[:, 0], y)
    d_real, d_rec, d_prior = C(x), C(torch.sigmoid(x_hat)), C(torch.sigmoid(x_p))
    ones, zeros = torch.ones_like(d_real), torch.zeros_like(d_real)
    if hp["gan_loss"] == "minimax":  # the literal "− δ L_gan"
        gen = -(bce(d_real, ones) + bce(d_rec, zeros) + bce(d_prior, zeros)) / 3
    else:
        gen = (bce(d_rec, ones) + bce(d_prior, ones)) / 3
    xhat_class = bce(E(torch.sigmoid(x_hat))[2][:, 0], y)
    l_dec = rec + hp["delta"] * gen + hp["xhat_class_weight"] * xhat_class
    l_enc = rec + hp["alpha"] * kl + hp["rho"] * cls + hp["delta"] * gen
    if hp["aux_objective"] == "confusion":  # the encoder drives A towards 1/2 instead of maximising L_aux
        return l_enc + hp["aux_weight"] * bce(A(z_hat)[:, 0], torch.full_like(y, 0.5)), l_dec
    return l_enc - hp["aux_weight"] * aux, l_dec


def run_one_step(model: IFCVAE, tmp_path, max_steps: int = 4):
    """One training batch; returns a pre-training copy, the batch, the forward's RNG state and the recorder."""
    reference = copy.deepcopy(model)
    rng_states = []
    forward = model._forward

    def recording_forward(x, y):
        rng_states.append(torch.get_rng_state())
        return forward(x, y)

    model._forward = recording_forward
    recorder = StepRecorder()
    trainer(tmp_path, callbacks=[recorder], max_steps=max_steps).fit(model, loader())
    data = SquaresDataset()
    return reference.train(), data.x, data.y, rng_states[0], recorder


def grads_wrt(loss, module, prefix):
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
    return {f"{prefix}.{n}": g for n, g in zip(params, grads, strict=True)}


def assert_grads_equal(received: dict, expected: dict):
    for name, g in expected.items():
        torch.testing.assert_close(received[name], g, rtol=1e-5, atol=1e-6, msg=name)


CASES = {
    "paper": {},
    "minimax": {"gan_loss": "minimax"},
    "xhat_class": {"xhat_class_weight": 0.7},
    "naive_cvae_gan": {"aux_weight": 0.0},
    "confusion": {"aux_objective": "confusion", "aux_weight": 0.3},
    "batchnorm_resnet": {"norm": "batch", "arch": "resnet", "xhat_class_weight": 0.5},
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_encoder_and_decoder_receive_exactly_their_own_loss_gradients(case, tmp_path):
    torch.manual_seed(0)
    model = make_model(**case)
    reference, x, y, rng_state, recorder = run_one_step(model, tmp_path)
    l_if, l_dec = reference_objectives(reference, x, y, rng_state, dict(reference.hparams))
    assert_grads_equal(recorder.steps[0]["grads"], grads_wrt(l_if, reference.encoder, "encoder"))
    assert_grads_equal(recorder.steps[1]["grads"], grads_wrt(l_dec, reference.decoder, "decoder"))


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_discriminator_receives_exactly_the_gradient_of_l_gan(norm, tmp_path):
    """χ's step follows ∇_χ L_gan (§3.1) on x and on the detached x̂ and x_p of the same forward pass."""
    torch.manual_seed(0)
    model = make_model(norm=norm)
    reference, x, y, rng_state, recorder = run_one_step(model, tmp_path)
    torch.set_rng_state(rng_state)
    E, D, C = reference.encoder, reference.decoder, reference.discriminator
    mu, logvar, y_logit = E(x)
    z_hat = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    z = torch.randn_like(mu)
    x_hat = torch.sigmoid(D(torch.cat([torch.sigmoid(y_logit[:, :1]), z_hat], 1))).detach()
    x_p = torch.sigmoid(D(torch.cat([y[:, None], z], 1))).detach()
    bce = F.binary_cross_entropy_with_logits
    real, rec, prior = C(x), C(x_hat), C(x_p)
    l_gan = (bce(real, torch.ones_like(real)) + bce(rec, torch.zeros_like(rec)) + bce(prior, torch.zeros_like(prior))) / 3
    step = next(s for s in recorder.steps if s["opt"] == PLAYERS.index("discriminator"))
    assert_grads_equal(step["grads"], grads_wrt(l_gan, C, "discriminator"))


def test_xhat_class_term_reaches_the_decoder_only(tmp_path):
    torch.manual_seed(0)
    reference, x, y, rng_state, recorder = run_one_step(make_model(xhat_class_weight=0.7), tmp_path)
    hp = dict(reference.hparams)
    l_if, l_dec = reference_objectives(reference, x, y, rng_state, hp)
    l_if_0, l_dec_0 = reference_objectives(reference, x, y, rng_state, {**hp, "xhat_class_weight": 0.0})
    enc_grads = grads_wrt(l_if, reference.encoder, "encoder")
    assert_grads_equal(enc_grads, grads_wrt(l_if_0, reference.encoder, "encoder"))  # φ unaffected
    dec_grads, dec_grads_0 = (
        grads_wrt(l_dec, reference.decoder, "decoder"),
        grads_wrt(l_dec_0, reference.decoder, "decoder"),
    )
    assert any(not torch.allclose(dec_grads[n], dec_grads_0[n]) for n in dec_grads)  # θ affected


def test_aux_weight_zero_removes_l_aux_from_the_encoder_gradient(tmp_path):
    torch.manual_seed(0)
    reference, x, y, rng_state, recorder = run_one_step(make_model(aux_weight=0.0), tmp_path)
    hp = dict(reference.hparams)
    received = recorder.steps[0]["grads"]
    without_aux, _ = reference_objectives(reference, x, y, rng_state, hp)
    with_aux, _ = reference_objectives(reference, x, y, rng_state, {**hp, "aux_weight": 1.0})
    assert_grads_equal(received, grads_wrt(without_aux, reference.encoder, "encoder"))
    grads_with_aux = grads_wrt(with_aux, reference.encoder, "encoder")
    assert any(not torch.allclose(received[n], g, atol=1e-6) for n, g in grads_with_aux.items())
    # A_ψ is still trained (its step changed its parameters) so train/acc/aux stays meaningful.
    assert recorder.steps[3]["changed"] == names_of(reference, "auxiliary")


# -- (4) ŷ reaches the decoder ---------------------------------------------------------------------------
def test_reconstruction_gradient_reaches_the_attribute_head():
    torch.manual_seed(0)
    model = make_model()
    data = SquaresDataset()
    out = model._forward(data.x, data.y)
    (grad,) = torch.autograd.grad(reconstruction_bce(out.x_hat_logits, data.x), model.encoder.y.weight)
    assert grad.abs().sum() > 0


@torch.no_grad()
def test_contract_methods():
    torch.manual_seed(0)
    model = make_model().eval()
    data = SquaresDataset()
    x, pa = data.x, {ATTR: data.y, "Male": 1 - data.y}
    z = model.abduct(x, pa)
    assert z.shape == (8, LATENT)
    torch.testing.assert_close(z, model.encoder(x)[0])  # the posterior mean
    cf0 = model.counterfactual(x, pa, {ATTR: torch.zeros(8)})
    cf1 = model.counterfactual(x, pa, {ATTR: torch.ones(8)})
    assert cf0.shape == x.shape and 0 <= cf0.min() and cf0.max() <= 1
    assert not torch.allclose(cf0, cf1)  # the decoder reads ŷ
    torch.testing.assert_close(cf1, model.predict(z, {ATTR: torch.ones(8)}))
    # Reconstruction uses the encoder's own ŷ, whatever label pa carries (§4.1).
    y_hat = model.predict_attributes(x)[ATTR]
    assert y_hat.shape == (8,) and ((0 < y_hat) & (y_hat < 1)).all()
    rec = model.reconstruct(x, pa)
    torch.testing.assert_close(rec, model.reconstruct(x, {ATTR: 1 - data.y}))
    torch.testing.assert_close(rec, model.predict(z, {ATTR: y_hat}))
    assert model.sample(pa).shape == x.shape
    with pytest.raises(ValueError, match="Male"):
        model.counterfactual(x, pa, {"Male": torch.zeros(8)})
    with pytest.raises(KeyError, match=ATTR):
        model.sample({"Male": data.y})


def test_mismatched_networks_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="in_features"):
        IFCVAE(
            ConvEncoder(SIZE, 3, WIDTH, LATENT),
            ConvDecoder(SIZE, 3, WIDTH, in_features=LATENT),
            ConvDiscriminator(SIZE, 3, WIDTH),
            MLPClassifier(LATENT, (4,), 1),
        )
    with pytest.raises(ValueError, match="n_attributes"):
        IFCVAE(
            ConvEncoder(SIZE, 3, WIDTH, LATENT, n_attributes=2),
            ConvDecoder(SIZE, 3, WIDTH, LATENT + 1),
            ConvDiscriminator(SIZE, 3, WIDTH),
            MLPClassifier(LATENT, (4,), 1),
        )
    with pytest.raises(ValueError, match="gan_loss"):
        make_model(gan_loss="hinge")
    with pytest.raises(ValueError, match="aux_objective must be one of .*'confusion'.* got 'minimise'"):
        make_model(aux_objective="minimise")
    with pytest.raises(ValueError, match="aux_steps must be >= 1, got 0"):
        make_model(aux_steps=0)


# -- (5) checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = make_model(norm="batch", alpha=0.3, xhat_class_weight=0.1)
    t = trainer(tmp_path, max_steps=8)
    t.fit(model, loader(n=16, batch_size=8))
    path = tmp_path / "ifcvae.ckpt"
    t.save_checkpoint(path)

    loaded = IFCVAE.load_from_checkpoint(path).eval()
    model.eval()
    assert dict(loaded.hparams) == dict(model.hparams)
    assert loaded.hparams.encoder["_target_"] == "lightning_modules.networks.encoders.ConvEncoder"
    data = SquaresDataset()
    x, pa = data.x, {ATTR: data.y}
    with torch.no_grad():
        for fn in (model.reconstruct, loaded.reconstruct, model.abduct, loaded.abduct):
            fn(x, pa)  # eval mode: repeated calls must not change anything
        assert torch.equal(model.reconstruct(x, pa), loaded.reconstruct(x, pa))
        assert torch.equal(model.abduct(x, pa), loaded.abduct(x, pa))
        do = {ATTR: 1 - data.y}
        assert torch.equal(model.counterfactual(x, pa, do), loaded.counterfactual(x, pa, do))
        assert torch.equal(model.predict_attributes(x)[ATTR], loaded.predict_attributes(x)[ATTR])
        torch.manual_seed(1)
        s1 = model.sample(pa)
        torch.manual_seed(1)
        assert torch.equal(s1, loaded.sample(pa))
        assert torch.equal(model.discriminator(x), loaded.discriminator(x))
        assert torch.equal(model.auxiliary(model.abduct(x, pa)), loaded.auxiliary(loaded.abduct(x, pa)))


def test_networks_may_be_given_as_configs():
    torch.manual_seed(0)
    built = make_model()
    configs = {name: dict(getattr(built, name).config) for name in PLAYERS}
    from_configs = IFCVAE(**configs, attribute=ATTR)
    from_configs.load_state_dict(built.state_dict())
    assert {k: from_configs.hparams[k] for k in PLAYERS} == {k: built.hparams[k] for k in PLAYERS}


# -- validation / test logging and a short training run ------------------------------------------------------
def test_validation_and_test_log_losses(tmp_path):
    torch.manual_seed(0)
    model, t = make_model(), trainer(tmp_path)
    (val,) = t.validate(model, loader(), verbose=False)
    (test,) = t.test(model, loader(), verbose=False)
    for stage, metrics in (("val", val), ("test", test)):
        for key in ("loss/rec", "loss/kl", "loss/class", "loss/aux", "loss/gan_gen", "loss/gan_disc", "acc/aux"):
            assert f"{stage}/{key}" in metrics
        assert f"{stage}/mse" not in metrics  # the callback's set-level MSE owns that key
    assert 0 < val["val/loss/rec"] < 1


class RecLogger(pl.Callback):
    def __init__(self):
        self.rec: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rec.append(trainer.callback_metrics["train/loss/rec"].item())


def test_reconstruction_loss_decreases_when_overfitting_a_batch(tmp_path):
    torch.manual_seed(0)
    model, rec = make_model(lr=1e-3), RecLogger()
    t = trainer(tmp_path, callbacks=[rec], max_epochs=30)
    t.fit(model, loader())
    assert len(rec.rec) == 30
    assert sum(rec.rec[-5:]) / 5 < 0.9 * rec.rec[0]
    for key in ("rec", "kl", "class", "aux", "gan_gen", "gan_disc", "dec", "enc"):
        assert f"train/loss/{key}" in t.callback_metrics
    assert "train/acc/E_y" in t.callback_metrics and "train/acc/aux" in t.callback_metrics


def test_prior_samples_do_not_update_decoder_running_statistics():
    """Evaluation decodes posterior codes with BatchNorm's running statistics: prior samples must not move them,
    and decoding the reconstruction must (the decoder's default norm is batch norm, as in the official code)."""
    torch.manual_seed(0)
    model = make_model()
    model.train()
    bn = [m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn, "the decoder should carry BatchNorm layers for this test to mean anything"
    before = [b.running_mean.clone() for b in bn]
    y = torch.ones(4)
    model._decode_prior(y, torch.randn(4, LATENT))
    assert all(torch.equal(a, b.running_mean) for a, b in zip(before, bn, strict=True))
    model._decode(y, torch.randn(4, LATENT))
    assert not all(torch.equal(a, b.running_mean) for a, b in zip(before, bn, strict=True))
