"""The conditional ALI/BiGAN and its cyclic-cost fine-tuning: shapes of the published networks, losses against
hand computations, optimizer isolation, frozen G and D, the counterfactual contract, checkpoints, training."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from configs.loader import compose, instantiate
from lightning_modules.bigan import ConditionalBiGAN, discriminator_accuracy
from lightning_modules.bigan_finetune import CyclicFineTunedBiGAN, cyclic_cost
from lightning_modules.losses import gan_discriminator_loss
from lightning_modules.networks.bigan import BiGANDiscriminator, BiGANEncoder, BiGANGenerator
from tests.test_ifcvae import StepRecorder

SIZE, LATENT = 16, 6
PARENTS = {"thickness": {"kind": "continuous", "low": 1.0, "high": 5.0}, "digit": {"kind": "categorical",
                                                                                   "num_classes": 3}}


def make_gan(**kwargs) -> ConditionalBiGAN:
    common = {"image_size": SIZE, "parents": PARENTS, "latent_dim": LATENT}
    return ConditionalBiGAN(
        encoder=BiGANEncoder(in_channels=1, widths=[4, 8, 8], embed_resolution=4, **common),
        generator=BiGANGenerator(out_channels=1, widths=[8, 8, 4], embed_dim=3, **common),
        discriminator=BiGANDiscriminator(in_channels=1, x_widths=[4, 8, 8], z_widths=[8], xz_widths=[8], x_dropout=0.2,
                                         z_dropout=0.2, embed_resolution=4, **common),
        **kwargs,
    )


class Blobs(Dataset):
    """A bright square whose side follows ``thickness`` and whose corner follows ``digit``, on a dark image."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.digit = torch.randint(0, 3, (n,), generator=g)
        self.thickness = torch.rand(n, generator=g) * 2 - 1
        self.x = torch.zeros(n, 1, SIZE, SIZE)
        for i in range(n):
            side, corner = 3 + int(2 * (self.thickness[i] + 1)), 2 + 4 * int(self.digit[i])
            self.x[i, 0, corner:corner + side, corner:corner + side] = 0.9

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "pa": {"thickness": self.thickness[i], "digit": self.digit[i].float()}, "index": i}

    def batch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.x, {"thickness": self.thickness, "digit": self.digit.float()}


def loader(n: int = 16, batch_size: int = 8) -> DataLoader:
    return DataLoader(Blobs(n), batch_size=batch_size)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=tmp_path, max_epochs=1)
    return pl.Trainer(**{**defaults, **kwargs})


def names_of(model, *players: str) -> set[str]:
    return {f"{p}.{n}" for p in players for n, _ in getattr(model, p).named_parameters()}


# -- the published networks ------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment, shape", [("bigan_morphomnist", (1, 32, 32)),
                                               ("bigan_celeba_simple", (3, 64, 64))])
def test_published_networks_map_the_shapes(experiment, shape):
    torch.manual_seed(0)
    model = instantiate(compose(experiment, ["model.scm_checkpoint=null"]).model, "model").eval()  # no SCM run
    pa = ({"thickness": torch.tensor([-1.0, 0.5]), "intensity": torch.tensor([0.0, 1.0]),
           "digit": torch.tensor([3.0, 7.0])} if shape[0] == 1 else
          {"Smiling": torch.tensor([0.0, 1.0]), "Eyeglasses": torch.tensor([1.0, 0.0])})
    x = torch.rand(2, *shape)
    with torch.no_grad():
        u = model.abduct(x, pa)
        x_rec = model.predict(u, pa)
        logits = model.discriminator(x, u, pa)
    assert u.shape == (2, 512) and logits.shape == (2,)
    assert x_rec.shape == x.shape and 0 <= x_rec.min() and x_rec.max() <= 1


def _layers(net: nn.Module) -> list[tuple]:
    """(kind, filters, kernel, stride) of every convolution, the slope of every LeakyReLU, the p of every
    dropout, in order."""
    out = []
    for layer in net.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            out.append((type(layer).__name__, layer.out_channels, layer.kernel_size[0], layer.stride[0]))
        elif isinstance(layer, nn.LeakyReLU):
            out.append(("LReLU", layer.negative_slope))
        elif isinstance(layer, (nn.Dropout, nn.Dropout2d)):
            out.append(("D", layer.p))
    return out


def _of(layers: list[tuple], kind: str, field: int = 1) -> list:
    """One field (filters, kernel or stride; slope; p) of the layers of one kind, in order."""
    return [entry[field] for entry in layers if entry[0] == kind]


def test_published_morphomnist_networks_follow_tables_11_to_13():
    model = instantiate(compose("bigan_morphomnist", ["model.scm_checkpoint=null"]).model, "model")
    encoder, generator = _layers(model.encoder), _layers(model.generator)
    # Table 11: 64, 128, 256 (4x4, stride 2), 512, then the 512-d code without activation
    assert _of(encoder, "Conv2d") == [64, 128, 256, 512, 512] and _of(encoder, "Conv2d", 2)[:3] == [4, 4, 4]
    assert _of(encoder, "LReLU") == [0.2] * 4
    # Table 12's depth and LReLU(0.2), the encoder's widths mirrored (configs/model/bigan.yaml says why)
    assert _of(generator, "ConvTranspose2d") == [512, 256, 128, 64] and _of(generator, "Conv2d") == [1]
    assert _of(generator, "LReLU") == [0.2] * 4
    d = {part: _layers(getattr(model.discriminator, part)) for part in ("dx", "dz", "dxz")}
    # Table 13: D_x 32, 64, 128, 256, 512; D_z 512, 512; D_xz 1024, 1024, 1; LReLU(0.1); its dropouts
    assert _of(d["dx"], "Conv2d") == [32, 64, 128, 256, 512]
    assert _of(d["dz"], "Conv2d") == [512, 512] and _of(d["dxz"], "Conv2d") == [1024, 1024, 1]
    assert {slope for part in d.values() for slope in _of(part, "LReLU")} == {0.1}
    assert _of(d["dx"], "D") == [0.2, 0.2, 0.5, 0.5, 0.5]
    assert _of(d["dz"], "D") == [0.2, 0.5] and _of(d["dxz"], "D") == [0.2, 0.2, 0.2]


def test_parent_conditioning_reaches_every_network():
    torch.manual_seed(0)
    model = make_gan().eval()
    x, pa = Blobs(4).batch()
    other = {**pa, "digit": (pa["digit"] + 1) % 3}
    u = torch.randn(4, LATENT)
    with torch.no_grad():
        assert not torch.allclose(model.encoder(x, pa), model.encoder(x, other))
        assert not torch.allclose(model.generator(u, pa), model.generator(u, other))
        assert not torch.allclose(model.discriminator(x, u, pa), model.discriminator(x, u, other))


def test_too_few_widths_fail_with_the_needed_count():
    with pytest.raises(ValueError, match="at least 4 widths"):
        BiGANEncoder(32, 1, PARENTS, widths=[4, 8, 8])
    with pytest.raises(ValueError, match="at least 4 generator widths"):
        BiGANGenerator(32, 1, PARENTS, widths=[8, 8, 8])


# -- losses ----------------------------------------------------------------------------------------------
def test_losses_match_hand_computations():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731  BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l)
    d = (softplus(-0.0) + softplus(-2.0)) / 2 + (softplus(-1.0) + softplus(1.0)) / 2
    eg = (softplus(0.0) + softplus(2.0)) / 2 + (softplus(1.0) + softplus(-1.0)) / 2
    # L_D = −V(D, G, E) (eq. 5) and E/G's loss with the labels swapped
    assert gan_discriminator_loss(real, [fake], "sum").item() == pytest.approx(d, rel=1e-6)
    assert gan_discriminator_loss(fake, [real], "sum").item() == pytest.approx(eg, rel=1e-6)
    # real logits 0 and 2: one called real (2 > 0); fake logits -1 and 1: one called fake -> (1/2 + 1/2) / 2
    assert discriminator_accuracy(real, fake).item() == pytest.approx(0.5)
    assert discriminator_accuracy(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0])).item() == pytest.approx(0.75)


def test_cyclic_cost_matches_hand_computation():
    u, u_cycle = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])  # MSE = (1 + 0) / 2
    x, x_cycle = torch.tensor([[[[0.0, 1.0]]]]), torch.tensor([[[[0.5, 0.5]]]])  # L1 = (0.5 + 0.5) / 2
    loss, terms = cyclic_cost(u, u_cycle, x, x_cycle, latent_weight=2.0, image_weight=3.0)
    assert terms["latent"].item() == pytest.approx(0.5) and terms["image"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(2.0 * 0.5 + 3.0 * 0.5)


# -- optimizer isolation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("d_steps", [1, 2])
def test_d_step_moves_only_d_and_eg_step_only_e_and_g(d_steps, tmp_path):
    torch.manual_seed(0)
    model, recorder = make_gan(d_steps_per_g_step=d_steps), StepRecorder()
    t = trainer(tmp_path, callbacks=[recorder])
    t.fit(model, loader())
    assert [s["opt"] for s in recorder.steps] == ([0] * d_steps + [1]) * 2
    assert t.global_step == 2 * (d_steps + 1)
    for step in recorder.steps:
        players = ("discriminator",) if step["opt"] == 0 else ("encoder", "generator")
        assert step["changed"] == names_of(model, *players)
    # The D backward leaves E and G without gradient; the E+G backward adds none to D (its gradients are still
    # those of the D step before).
    first_d, first_eg = recorder.steps[0], recorder.steps[d_steps]
    assert all(first_d["grads"][n] is None for n in names_of(model, "encoder", "generator"))
    last_d = recorder.steps[d_steps - 1]
    for n in names_of(model, "discriminator"):
        assert torch.equal(first_eg["grads"][n], last_d["grads"][n]), n


def test_training_logs_losses_and_validation_logs_the_reconstruction_distance(tmp_path):
    torch.manual_seed(0)
    t = trainer(tmp_path, limit_val_batches=1)
    t.fit(make_gan(), loader(), loader())
    assert {"train/loss/d", "train/loss/eg", "train/acc/d", "val/loss/d", "val/loss/eg", "val/acc/d",
            "val/rec/l1"} <= set(t.logged_metrics)


# -- the counterfactual contract -------------------------------------------------------------------------
@torch.no_grad()
def test_counterfactual_is_g_of_e_with_the_intervened_parents():
    torch.manual_seed(0)
    model = make_gan().eval()
    x, pa = Blobs(4).batch()
    do = {"thickness": torch.full((4,), 0.75)}
    expected = model.generator(model.encoder(x, pa), {**pa, **do})
    assert torch.equal(model.counterfactual(x, pa, do), expected)
    assert torch.equal(model.reconstruct(x, pa), model.generator(model.encoder(x, pa), pa))
    torch.manual_seed(1)
    sample = model.sample(pa)
    torch.manual_seed(1)
    assert torch.equal(sample, model.generator(torch.randn(4, LATENT), pa))


# -- checkpoints -----------------------------------------------------------------------------------------
def fit_and_save(model, tmp_path, name: str, steps: int = 2) -> str:
    t = trainer(tmp_path, max_steps=steps)
    t.fit(model, loader())
    path = str(tmp_path / name)
    t.save_checkpoint(path)
    return path


@torch.no_grad()
def assert_same_mechanism(a, b):
    x, pa = Blobs(4).batch()
    a.eval(), b.eval()
    assert torch.equal(a.abduct(x, pa), b.abduct(x, pa))
    u = torch.randn(4, LATENT)
    assert torch.equal(a.predict(u, pa), b.predict(u, pa))
    assert torch.equal(a.discriminator(x, u, pa), b.discriminator(x, u, pa))


def test_gan_checkpoint_alone_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    model = make_gan(lr=3e-4)
    loaded = ConditionalBiGAN.load_from_checkpoint(fit_and_save(model, tmp_path, "gan.ckpt"), map_location="cpu")
    assert loaded.hparams.lr == 3e-4 and loaded.scm is None
    assert_same_mechanism(model, loaded)


def test_missing_pretrained_gan_names_the_experiment_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="make train EXP=bigan_morphomnist"):
        CyclicFineTunedBiGAN(pretrained=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ValueError, match="pretrained"):
        CyclicFineTunedBiGAN()


@pytest.fixture
def pretrained(tmp_path) -> tuple[ConditionalBiGAN, str]:
    torch.manual_seed(0)
    gan = make_gan()
    # Large weights make G's output depend clearly on u, as a trained generator's does; PyTorch's default init
    # all but flattens it at these widths (per-pixel std over u ~0.01), and no encoder can invert a constant.
    for m in gan.generator.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.normal_(m.weight, std=0.6)
    return gan, fit_and_save(gan, tmp_path, "gan.ckpt", steps=4)


def test_fine_tuning_moves_only_the_encoder(pretrained, tmp_path):
    gan, path = pretrained
    model = CyclicFineTunedBiGAN(pretrained=path, lr=1e-3)
    assert_same_mechanism(gan, model)  # starts from the pretrained weights
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}

    class ModeProbe(pl.Callback):
        modes: list[tuple[bool, bool]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.modes.append((pl_module.generator.training, pl_module.discriminator.training))

    probe, recorder = ModeProbe(), StepRecorder()
    trainer(tmp_path, max_epochs=2, callbacks=[probe, recorder]).fit(model, loader())
    assert probe.modes and not any(g or d for g, d in probe.modes)  # frozen BatchNorm and dropout
    assert all(step["changed"] == names_of(model, "encoder") for step in recorder.steps)
    for k, v in model.state_dict().items():
        if not k.startswith("encoder."):
            assert torch.equal(v, frozen_before[k]), k  # parameters and BatchNorm buffers bit-identical
    assert any(not torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())
    assert not any(p.requires_grad for p in [*model.generator.parameters(), *model.discriminator.parameters()])


def test_fine_tuning_loss_is_the_cyclic_cost(pretrained):
    _, path = pretrained
    model = CyclicFineTunedBiGAN(pretrained=path, latent_weight=0.3, image_weight=2.0)
    model.train()
    x, pa = Blobs(4).batch()
    logged = {}
    model.log_dict = lambda metrics, **_: logged.update({k: float(v) for k, v in metrics.items()})
    torch.manual_seed(3)
    loss = model.training_step({"x": x, "pa": pa}, 0)
    torch.manual_seed(3)
    u = torch.randn(4, LATENT)
    mse = ((model.encoder(model.generator(u, pa), pa) - u) ** 2).mean()
    l1 = (model.generator(model.encoder(x, pa), pa) - x).abs().mean()
    assert loss.item() == pytest.approx((0.3 * mse + 2.0 * l1).item(), rel=1e-6)
    assert logged["train/loss/latent"] == pytest.approx(mse.item(), rel=1e-6)
    assert logged["train/rec/l1"] == pytest.approx(l1.item(), rel=1e-6)


def test_fine_tuned_checkpoint_loads_without_the_pretrained_file(pretrained, tmp_path):
    _, path = pretrained
    model = CyclicFineTunedBiGAN(pretrained=path, image_weight=0.5)
    ft_path = fit_and_save(model, tmp_path, "cyclic.ckpt")
    (tmp_path / "gan.ckpt").unlink()
    loaded = CyclicFineTunedBiGAN.load_from_checkpoint(ft_path, map_location="cpu")
    assert loaded.hparams.pretrained is None and loaded.hparams.image_weight == 0.5
    assert_same_mechanism(model, loaded)
    assert not loaded.generator.training and not any(p.requires_grad for p in loaded.generator.parameters())
    x, pa = Blobs(4).batch()
    with torch.no_grad():
        do = {"digit": torch.zeros(4)}
        assert torch.equal(loaded.counterfactual(x, pa, do), loaded.generator(loaded.encoder(x, pa), {**pa, **do}))


# -- training --------------------------------------------------------------------------------------------
@pytest.mark.slow  # 200 optimizer steps: about 30 s on 2 idle cores
def test_cyclic_fine_tuning_reduces_the_cycle_and_reconstruction_errors(pretrained, tmp_path):
    _, path = pretrained
    torch.manual_seed(0)
    model = CyclicFineTunedBiGAN(pretrained=path, lr=1e-3)
    before = trainer(tmp_path).validate(model, loader(), verbose=False)[0]
    trainer(tmp_path, max_steps=200, max_epochs=-1).fit(model, loader(n=32))
    after = trainer(tmp_path).validate(model, loader(), verbose=False)[0]
    assert after["val/loss/cyc"] < 0.7 * before["val/loss/cyc"]
    assert after["val/rec/l1"] < before["val/rec/l1"]
