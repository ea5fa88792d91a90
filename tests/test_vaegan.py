"""VAE-GAN baseline: feature-wise reconstruction, attribute vectors (hand-computed mean differences) and their
counterfactuals, optimizer isolation, checkpoints carrying the vectors."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.networks.cdvae_gan import Table1Decoder, Table1Discriminator, Table1Encoder
from lightning_modules.vaegan import VAEGAN, attribute_vector_sums, feature_reconstruction
from tests.test_cdvae_gan import ATTRS, LATENT, SIZE, WIDTHS, AttributeSquares, loader, names_of, trainer
from tests.test_ifcvae import StepRecorder


def make_vaegan(**kwargs) -> VAEGAN:
    return VAEGAN(
        encoder=Table1Encoder(SIZE, 3, WIDTHS, (8,), LATENT, 0),
        decoder=Table1Decoder(SIZE, 3, LATENT, (4, 4), start_size=8, start_width=4),
        discriminator=Table1Discriminator(SIZE, 3, WIDTHS, 8, feature_layer=2),
        attributes=ATTRS,
        **kwargs,
    )


def batches(data: AttributeSquares, size: int) -> list[dict]:
    return [{"x": data.x[i:i + size], "pa": {a: data.y[i:i + size, j] for j, a in enumerate(ATTRS)}}
            for i in range(0, len(data), size)]


def test_feature_reconstruction_by_hand():
    a = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])
    b = torch.tensor([[[0.0, 0.0]], [[3.0, 0.0]]])
    assert feature_reconstruction(a, b).item() == pytest.approx(0.5 * (1 + 4 + 9) / 2)


def test_attribute_vectors_are_the_mean_latent_differences():
    torch.manual_seed(0)
    model = make_vaegan()
    data = AttributeSquares(10)
    model.fit_attribute_vectors(batches(data, 4))  # three batches of 4, 4, 2
    assert bool(model.attribute_vectors_ready)
    assert model.encoder.training  # fitting the vectors restores the train flags
    model.eval()
    with torch.no_grad():
        mu = model.encoder(data.x)[0].double()
    for j in range(len(ATTRS)):
        on, off = data.y[:, j] == 1, data.y[:, j] == 0
        expected = mu[on].mean(0) - mu[off].mean(0)
        torch.testing.assert_close(model.attribute_vectors[j], expected.float(), rtol=1e-5, atol=1e-6)


def test_attribute_vector_sums_on_a_tiny_example():
    mu = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    y = torch.tensor([[1.0], [1.0], [0.0]])
    s1, n1, s0, n0 = attribute_vector_sums(mu, y)
    assert torch.equal(s1, torch.tensor([[4.0, 2.0]])) and torch.equal(n1, torch.tensor([2.0]))
    assert torch.equal(s0, torch.tensor([[5.0, 4.0]])) and torch.equal(n0, torch.tensor([1.0]))
    # v = (2, 1) - (5, 4) = (-3, -3)


def test_one_class_attribute_gets_a_zero_vector_and_a_warning():
    model = make_vaegan()
    data = AttributeSquares(8)
    data.y[:, 2] = 0.0
    with pytest.warns(UserWarning, match="\\['Bangs'\\] have one class only"):
        model.fit_attribute_vectors(batches(data, 8))
    assert torch.equal(model.attribute_vectors[2], torch.zeros(LATENT))


def test_counterfactual_adds_and_subtracts_attribute_vectors():
    torch.manual_seed(0)
    model = make_vaegan()
    data = AttributeSquares(8)
    pa = {a: data.y[:, j] for j, a in enumerate(ATTRS)}
    with pytest.raises(RuntimeError, match="attribute vectors are not computed"):
        model.counterfactual(data.x, pa, {"Male": 1 - pa["Male"]})
    model.fit_attribute_vectors(batches(data, 8))
    model.eval()
    codes: list[torch.Tensor] = []
    model.decoder.register_forward_pre_hook(lambda module, args: codes.append(args[0].detach().clone()))
    with torch.no_grad():
        mu = model.encoder(data.x)[0]
        model.counterfactual(data.x, pa, {"Male": 1 - pa["Male"], "Smiling": torch.ones(8)})
        model.counterfactual(data.x, pa, {})
    v = model.attribute_vectors
    sign_male = (1 - 2 * pa["Male"])[:, None]  # +1 turns Male on, -1 turns it off
    expected = mu + sign_male * v[ATTRS.index("Male")] + (1 - pa["Smiling"])[:, None] * v[ATTRS.index("Smiling")]
    torch.testing.assert_close(codes[0], expected)
    assert torch.equal(codes[1], mu)
    with pytest.raises(KeyError, match="cannot intervene on \\['Young'\\]"):
        model.counterfactual(data.x, pa, {"Young": torch.ones(8)})


def test_each_optimizer_step_moves_only_its_own_player(tmp_path):
    torch.manual_seed(0)
    model, recorder = make_vaegan(), StepRecorder()
    trainer(tmp_path, callbacks=[recorder]).fit(model, loader(n=16, batch_size=8))
    assert [s["opt"] for s in recorder.steps] == [0, 1, 2] * 2
    for step in recorder.steps:
        assert step["changed"] == names_of(model, model.players[step["opt"]])
    # L_llike reads D's features without training D or updating its BatchNorm statistics: D's are updated by
    # its own step only (real, prior and reconstructed batches: three per training batch).
    tracked = {m.num_batches_tracked.item() for m in model.discriminator.modules()
               if isinstance(m, torch.nn.BatchNorm2d)}
    assert tracked == {6}


class Squares(pl.LightningDataModule):
    def train_dataloader(self):
        return loader(n=16, batch_size=8)

    def val_dataloader(self):
        return loader(n=8, batch_size=8)


def test_fit_recomputes_the_vectors_and_the_checkpoint_carries_them(tmp_path):
    torch.manual_seed(0)
    model = make_vaegan()
    t = trainer(tmp_path, limit_val_batches=1)
    t.fit(model, datamodule=Squares())
    assert bool(model.attribute_vectors_ready) and model.attribute_vectors.abs().sum() > 0
    fresh = make_vaegan()
    fresh.load_state_dict(model.state_dict())
    fresh.fit_attribute_vectors(batches(AttributeSquares(16), 8))
    torch.testing.assert_close(fresh.attribute_vectors, model.attribute_vectors)  # computed after the last epoch
    path = tmp_path / "vaegan.ckpt"
    t.save_checkpoint(path)
    loaded = VAEGAN.load_from_checkpoint(path).eval()
    model.eval()
    assert dict(loaded.hparams) == dict(model.hparams)
    assert torch.equal(loaded.attribute_vectors, model.attribute_vectors) and bool(loaded.attribute_vectors_ready)
    data = AttributeSquares(8)
    pa = {a: data.y[:, j] for j, a in enumerate(ATTRS)}
    with torch.no_grad():
        do = {"Bangs": 1 - pa["Bangs"]}
        assert torch.equal(loaded.counterfactual(data.x, pa, do), model.counterfactual(data.x, pa, do))
    with pytest.raises(NotImplementedError, match="no attribute classifier"):
        loaded.predict_attributes(data.x)


def test_networks_must_fit_the_vaegan():
    with pytest.raises(ValueError, match="has no Bernoulli latents, so set it to 0"):
        VAEGAN(Table1Encoder(SIZE, 3, WIDTHS, (8,), LATENT, 3), Table1Decoder(SIZE, 3, LATENT, (4, 4), 8, 4),
               Table1Discriminator(SIZE, 3, WIDTHS, 8, 2), ATTRS)
