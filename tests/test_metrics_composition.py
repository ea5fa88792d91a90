"""Composition, reversibility and the image distances: hand-computed values, offline weight loading, frozen
networks, and the same set-level values on one and two processes."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from callbacks.metrics.composition import (
    Composition,
    Reversibility,
    composition_cycles,
    composition_key,
    reversibility,
)
from callbacks.metrics.distances import (
    ConcatFeatures,
    EmbeddingL1,
    LPIPSDistance,
    PixelL1,
    PretrainedWeightsMissing,
    hub_checkpoint_path,
    vgg16_fc7,
)
from lightning_modules.base import CounterfactualModule
from tests.helpers.ddp import run_distributed, shard

C = 1 / 16  # every image value and shift is on a dyadic grid, so all float sums below are exact


class IdentityModel(CounterfactualModule):
    """abduct returns the image, predict returns the noise: every counterfactual is the input itself."""

    def abduct(self, x, pa):
        return x

    def predict(self, noise, pa):
        return noise


class ShiftModel(nn.Module):
    """Each counterfactual call adds ``c · (1 + pa["a"])`` to the image (the parents it is called with)."""

    def __init__(self, c: float = C) -> None:
        super().__init__()
        self.c = c

    def counterfactual(self, x, pa, do):
        return x + self.c * (1 + pa["a"]).view(-1, 1, 1, 1)


class BatchNormModel(CounterfactualModule):
    """A model whose abduction would update BatchNorm running statistics if it ran in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.head = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.BatchNorm2d(1), nn.Dropout(0.5))

    def abduct(self, x, pa):
        return self.bn(x)

    def predict(self, noise, pa):
        return self.head(noise).sigmoid()


def _data(n: int = 7, size: int = 4, seed: int = 0) -> tuple[torch.Tensor, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 9, (n, 1, size, size), generator=g) / 16.0  # in [0, 0.5], shifts stay below 1
    pa = {"a": torch.randint(0, 2, (n,), generator=g).float()}
    do = {"a": 1 - pa["a"]}
    return x, pa, do


# -- distances ------------------------------------------------------------------------------------------------
def test_pixel_l1_matches_hand_computation() -> None:
    x = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    # per image: 255 · mean over C·H·W of |x - y| -> 255 · 1/4 and 255 · 1/2
    assert PixelL1()(x, y).tolist() == [63.75, 127.5]
    rgb = torch.zeros(1, 3, 2, 2)
    rgb_y = rgb.clone()
    rgb_y[0, 0] = 1.0  # one channel of three fully on
    assert PixelL1()(rgb, rgb_y).tolist() == [85.0]
    with pytest.raises(ValueError, match="same shape"):
        PixelL1()(x, rgb)


def test_embedding_l1_and_concat_features() -> None:
    first, second = nn.Flatten(), nn.Sequential(nn.Flatten(), nn.Linear(4, 1, bias=False))
    nn.init.constant_(second[1].weight, 1.0)
    dist = EmbeddingL1(ConcatFeatures([first, second]))
    x, y = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.25)
    # features: 4 pixels (|Δ| = 0.25 each) and their sum (|Δ| = 1): mean over 5 dimensions = 2 / 5
    assert dist(x, y).tolist() == [pytest.approx(0.4, abs=1e-12)]


@pytest.fixture(scope="module")
def alexnet_hub(tmp_path_factory) -> str:
    """A TORCH_HOME whose hub cache holds a randomly initialised torchvision AlexNet under the real file name."""
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(
        torchvision.models.alexnet().state_dict(), home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    )
    return str(home)


def test_lpips_loads_trunk_from_hub_cache(alexnet_hub, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", alexnet_hub)
    dist = LPIPSDistance("alex")
    state = torch.load(hub_checkpoint_path("alexnet-owt-7be5be79.pth"), weights_only=True)
    # the trunk holds the file's weights (first and last conv of the features)
    assert torch.equal(dist.lpips.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(dist.lpips.net.slice5.get_submodule("10").bias, state["features.10.bias"])
    assert not any(p.requires_grad for p in dist.parameters())

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 1, 32, 32, generator=g), torch.rand(3, 1, 32, 32, generator=g)
    assert dist(x, x).tolist() == [0.0, 0.0, 0.0]
    d_xy = dist(x, y)
    assert d_xy.shape == (3,) and (d_xy > 0).all()
    torch.testing.assert_close(dist(y, x), d_xy)
    # grayscale is repeated to 3 channels
    torch.testing.assert_close(dist(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)), d_xy)


@pytest.mark.parametrize(
    ("build", "filename"),
    [
        (lambda: LPIPSDistance("alex"), "alexnet-owt-7be5be79.pth"),
        (lambda: LPIPSDistance("vgg"), "vgg16-397923af.pth"),
        (vgg16_fc7, "vgg16-397923af.pth"),
    ],
    ids=["lpips-alex", "lpips-vgg", "vgg16-fc7"],
)
def test_missing_weights_error_names_file_folder_and_url(tmp_path, monkeypatch, build, filename) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsMissing) as info:
        build()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert filename in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "$TORCH_HOME/hub/checkpoints/" in message
    assert f"https://download.pytorch.org/models/{filename}" in message


def test_lpips_rejects_unknown_net() -> None:
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPSDistance("squeeze")


@pytest.mark.slow
def test_vgg_weights_from_hub_cache(tmp_path, monkeypatch) -> None:
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(
        torchvision.models.vgg16().state_dict(), tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fc7 = vgg16_fc7()
    x = torch.rand(2, 1, 32, 32)
    assert fc7(x).shape == (2, 4096)
    emb = EmbeddingL1(fc7)
    assert emb(x, x).tolist() == [0.0, 0.0]
    lp = LPIPSDistance("vgg")
    assert lp(x, x).tolist() == [0.0, 0.0]
    assert lp(x, torch.rand(2, 1, 32, 32)).gt(0).all()


# -- functional cores -----------------------------------------------------------------------------------------
def test_identity_model_scores_zero() -> None:
    x, pa, do = _data()
    distances = {"l1": PixelL1(), "emb": EmbeddingL1(nn.Flatten())}
    values = composition_cycles(IdentityModel(), x, pa, (1, 3, 10), distances)
    assert set(values) == {composition_key(d, m) for d in distances for m in (1, 3, 10)}
    assert all(v.shape == (7,) and not v.any() for v in values.values())
    rev = reversibility(IdentityModel(), x, pa, do, distances)
    assert all(v.shape == (7,) and not v.any() for v in rev.values())


def test_shift_model_hand_computed() -> None:
    x, pa, do = _data()
    values = composition_cycles(ShiftModel(), x, pa, m_values=(10, 1))
    shift = 255 * C * (1 + pa["a"]).double()  # per call; a constant c when a = 0
    assert torch.equal(values["l1/1"], shift)
    assert torch.equal(values["l1/10"], 10 * shift)
    zero_a = {"a": torch.zeros(7)}
    assert composition_cycles(ShiftModel(), x, zero_a, (4,))["l1/4"].tolist() == [4 * C * 255] * 7
    # there with pa, back with pa* = do: shifts c(1 + a) and c(1 + a*)
    rev = reversibility(ShiftModel(), x, pa, do)["l1"]
    assert torch.equal(rev, 255 * C * (2 + pa["a"] + do["a"]).double())


def test_argument_checks() -> None:
    x, pa, do = _data()
    with pytest.raises(ValueError, match="m_values"):
        composition_cycles(IdentityModel(), x, pa, m_values=(0, 1))
    with pytest.raises(ValueError, match="non-empty"):
        reversibility(IdentityModel(), x, pa, {})
    with pytest.raises(KeyError, match="unknown"):
        reversibility(IdentityModel(), x, pa, {"b": do["a"]})
    with pytest.raises(ValueError, match="no '/'"):
        Composition({"l1/x": PixelL1()})


def test_models_and_feature_extractors_are_never_changed() -> None:
    torch.manual_seed(0)
    model = BatchNormModel().train()
    model.head[1].eval()  # a partly frozen model must come back partly frozen
    extractor = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5)).train()
    model_state, extractor_state = copy.deepcopy(model.state_dict()), copy.deepcopy(extractor.state_dict())
    flags = [m.training for m in model.modules()]

    x, pa, do = _data(n=4, size=8)
    distances = {"l1": PixelL1(), "emb": EmbeddingL1(extractor)}
    comp, rev = Composition(distances, m_values=(1, 2)), Reversibility(distances)
    comp.update(model, x, pa)
    rev.update(model, x, pa, do)
    first = comp.compute()
    comp.update(model, x, pa)  # same batch again: eval-mode BN is deterministic, so the mean is unchanged
    assert comp.compute() == first
    composition_cycles(model, x, pa, (1,), distances)

    for key, value in model.state_dict().items():
        assert torch.equal(value, model_state[key]), key
    for key, value in extractor.state_dict().items():
        assert torch.equal(value, extractor_state[key]), key
    assert [m.training for m in model.modules()] == flags
    assert all(m.training for m in extractor.modules())
    assert all(p.grad is None for p in [*model.parameters(), *extractor.parameters()])


# -- metrics --------------------------------------------------------------------------------------------------
def test_composition_metric_means_std_and_per_sample() -> None:
    x, pa, _ = _data()
    metric = Composition(m_values=(1, 2), keep_per_sample=True)
    metric.update(ShiftModel(), x[:4], {"a": pa["a"][:4]}, index=torch.arange(4))
    metric.update(ShiftModel(), x[4:], {"a": pa["a"][4:]}, index=torch.arange(4, 7))
    result = metric.compute()
    shift = 255 * C * (1 + pa["a"]).double()
    assert set(result) == {"l1/1", "l1/1/std", "l1/2", "l1/2/std"}
    torch.testing.assert_close(result["l1/1"], shift.mean())
    torch.testing.assert_close(result["l1/2"], 2 * shift.mean())
    torch.testing.assert_close(result["l1/2/std"], (2 * shift).std(unbiased=False))
    per_sample = metric.per_sample()
    assert per_sample["index"].tolist() == list(range(7))
    assert torch.equal(per_sample["l1/2"], 2 * shift)

    empty = Reversibility()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert empty.compute()["l1"].isnan()
    with pytest.raises(RuntimeError, match="keep_per_sample"):
        empty.per_sample()


def _metrics_on(rank: int, world_size: int) -> dict:
    """Composition and Reversibility on this rank's shard, in batches of 2; single process when world_size=1."""
    x, pa, do = _data(n=7)
    index = torch.arange(7)
    x, index = shard(x, rank, world_size), shard(index, rank, world_size)
    pa, do = {"a": shard(pa["a"], rank, world_size)}, {"a": shard(do["a"], rank, world_size)}
    distances = {"l1": PixelL1(), "emb": EmbeddingL1(nn.Flatten())}
    comp = Composition(distances, m_values=(1, 10), keep_per_sample=True)
    rev = Reversibility(distances, keep_per_sample=True)
    for s in range(0, len(index), 2):
        batch = slice(s, s + 2)
        comp.update(ShiftModel(), x[batch], {"a": pa["a"][batch]}, index=index[batch])
        rev.update(ShiftModel(), x[batch], {"a": pa["a"][batch]}, {"a": do["a"][batch]}, index=index[batch])
    out = {f"composition/{k}": v for k, v in comp.compute().items()}
    out |= {f"reversibility/{k}": v for k, v in rev.compute().items()}
    for name, metric in (("composition", comp), ("reversibility", rev)):
        values = metric.per_sample()
        order = values.pop("index").argsort()
        out |= {f"{name}/per_sample/{k}": v[order] for k, v in values.items()}
    return out


# In the default suite (about 20 s): CI must keep checking that every metric is the same on 1 and 2 processes.
def test_two_processes_equal_one_process() -> None:
    single = _metrics_on(0, 1)
    for result in run_distributed(_metrics_on, 2):
        assert result.keys() == single.keys()
        for key, value in single.items():
            assert torch.equal(result[key], value), key
    assert single["reversibility/per_sample/l1"].numel() == 7
    assert single["composition/l1/10"] == 10 * single["composition/l1/1"]


class CountingShiftModel(ShiftModel):
    """ShiftModel that counts its counterfactual calls."""

    calls = 0

    def counterfactual(self, x, pa, do):
        self.calls += 1
        return super().counterfactual(x, pa, do)


def test_reversibility_from_a_given_x_star() -> None:
    x, pa, do = _data()
    model = CountingShiftModel()
    x_star = model.counterfactual(x, pa, do)
    model.calls = 0
    given = reversibility(model, x, pa, do, x_star=x_star)["l1"]
    assert model.calls == 1  # the way back only
    assert torch.equal(given, reversibility(model, x, pa, do)["l1"])
    assert model.calls == 3
    # the way back starts from the x* given, whatever it is: from x* = x only the way back's c(1 + a*) is left
    assert torch.equal(reversibility(model, x, pa, do, x_star=x)["l1"], 255 * C * (1 + do["a"]).double())
    metric = Reversibility()
    metric.update(model, x, pa, do, x_star=x_star)
    torch.testing.assert_close(metric.compute()["l1"], given.mean())
    with pytest.raises(ValueError, match="x_star must have the images' shape"):
        reversibility(model, x, pa, do, x_star=x[:2])
