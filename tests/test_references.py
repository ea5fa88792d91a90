"""Reference counterfactuals (identity, mean image, retrieval) and the effect/preservation split, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from callbacks.editing_metrics import AttributeEditingMetrics
from callbacks.metrics.editing import (
    TrueCounterfactualSplitError,
    changed_pixels,
    split_error_sums,
    true_counterfactual_split_error,
)
from callbacks.references import ReferenceCounterfactuals, references_of
from datamodules.base import Attribute
from lightning_modules.references import (
    IdentityCounterfactual,
    MeanImageCounterfactual,
    NearestTrainingImage,
    TrainingPool,
    parent_codes,
    retrieval_features,
)
from tests.test_callbacks import (
    ATTR,
    OTHER,
    FakeEditor,
    FakeOracle,
    TinyEditingData,
    as_floats,
    expected_metrics,
    make_trainer,
)

BINARY = Attribute("s", "binary")
DIGIT = Attribute("d", "categorical", num_classes=3)
THICK = Attribute("t", "continuous", low=0.0, high=4.0, bins=(0.0, 1.0, 2.0, 4.0))
PLAIN = Attribute("i", "continuous", low=0.0, high=10.0)  # no bins: 10 equal-width ones


class Items(Dataset):
    """Batch-contract items from uint8 images [N, C, H, W] and raw parent values."""

    def __init__(self, images: torch.Tensor, pa: dict[str, torch.Tensor], attributes) -> None:
        self.images, self.attributes = images, attributes
        self.pa = {a.name: a.normalise(pa[a.name]) for a in attributes}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.images[i].float() / 255.0, "pa": {n: v[i] for n, v in self.pa.items()},
                "index": torch.tensor(i)}


def test_parent_codes_by_kind() -> None:
    pa = {"s": torch.tensor([0.0, 1.0, 1.0]), "d": torch.tensor([2.0, 0.0, 1.0]),
          "t": THICK.normalise([0.5, 1.0, 3.9]), "i": PLAIN.normalise([0.0, 4.5, 10.0])}
    codes = parent_codes(pa, [BINARY, DIGIT, THICK, PLAIN])
    # thickness bins [0,1) [1,2) [2,4]: 0.5 -> 0, 1.0 -> 1 (edges belong to the upper bin), 3.9 -> 2;
    # intensity in 10 bins of width 1: 0 -> 0, 4.5 -> 4, 10 -> 9 (the top edge stays in the last bin)
    assert codes.tolist() == [[0, 2, 0, 0], [1, 0, 1, 4], [1, 1, 2, 9]]
    with pytest.raises(KeyError, match=r"\['d'\]"):
        parent_codes({"s": pa["s"]}, [BINARY, DIGIT])


def _pool(images: torch.Tensor, pa: dict, attributes, **kwargs) -> TrainingPool:
    return TrainingPool(Items(images, pa, attributes), attributes, **kwargs)


def test_pool_keeps_the_bytes_and_draws_a_seeded_subset() -> None:
    images = torch.randint(0, 256, (10, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pa = {"s": torch.arange(10.0) % 2}
    pool = _pool(images, pa, [BINARY])
    assert torch.equal(pool.images, images) and pool.codes[:, 0].tolist() == [0, 1] * 5
    subset = _pool(images, pa, [BINARY], pool_size=4, seed=3)
    chosen = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:4].sort().values
    assert torch.equal(subset.images, images[chosen])
    with pytest.raises(ValueError, match="pool_size"):
        _pool(images, pa, [BINARY], pool_size=0)


def test_retrieval_features_area_average() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert retrieval_features(x, 2).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    assert torch.equal(retrieval_features(x, None), x.flatten(1))
    assert torch.equal(retrieval_features(x, 8), x.flatten(1))  # never upsampled


def test_identity_returns_x() -> None:
    x = torch.rand(3, 1, 2, 2)
    out = IdentityCounterfactual().counterfactual(x, {"s": torch.zeros(3)}, {"s": torch.ones(3)})
    assert torch.equal(out, x) and out is not x
    with pytest.raises(KeyError, match="unknown"):
        IdentityCounterfactual().counterfactual(x, {"s": torch.zeros(3)}, {"q": torch.ones(3)})


def test_mean_image_by_group_and_null_intervention() -> None:
    # four 1-pixel images 10, 20, 30, 50 with s = 0, 0, 1, 1 and digits 0, 1, 0, 1
    images = torch.tensor([10, 20, 30, 50], dtype=torch.uint8).view(4, 1, 1, 1)
    pa = {"s": torch.tensor([0.0, 0.0, 1.0, 1.0]), "d": torch.tensor([0.0, 1.0, 0.0, 1.0])}
    mean = MeanImageCounterfactual().fit(_pool(images, pa, [BINARY, DIGIT]))
    x = torch.zeros(2, 1, 1, 1)
    query = {"s": torch.tensor([0.0, 1.0]), "d": torch.tensor([0.0, 0.0])}
    assert (mean.counterfactual(x, query, {"s": torch.tensor([1.0, 0.0])}) * 255).flatten().tolist() == \
        pytest.approx([40.0, 15.0])
    assert (mean.reconstruct(x, query) * 255).flatten().tolist() == pytest.approx([27.5, 27.5])
    both = {"s": torch.tensor([1.0, 0.0]), "d": torch.tensor([1.0, 0.0])}
    assert (mean.counterfactual(x, query, both) * 255).flatten().tolist() == pytest.approx([50.0, 10.0])


def test_mean_image_falls_back_to_the_fewest_mismatches() -> None:
    # no image has (s=1, d=2): the groups differing in one parent, (s=1, d=0) and (s=0, d=2), are pooled
    images = torch.tensor([10, 20, 60], dtype=torch.uint8).view(3, 1, 1, 1)
    pa = {"s": torch.tensor([1.0, 0.0, 0.0]), "d": torch.tensor([0.0, 2.0, 1.0])}
    mean = MeanImageCounterfactual().fit(_pool(images, pa, [BINARY, DIGIT]))
    out = mean.counterfactual(torch.zeros(1, 1, 1, 1), {"s": torch.tensor([0.0]), "d": torch.tensor([1.0])},
                              {"s": torch.tensor([1.0]), "d": torch.tensor([2.0])})
    assert out.item() * 255 == pytest.approx(15.0)


def test_mean_image_of_a_continuous_parent_uses_its_bin() -> None:
    images = torch.tensor([0, 10, 100, 200], dtype=torch.uint8).view(4, 1, 1, 1)
    pa = {"t": torch.tensor([0.2, 0.8, 1.5, 3.0])}
    mean = MeanImageCounterfactual().fit(_pool(images, pa, [THICK]))
    out = mean.counterfactual(torch.zeros(2, 1, 1, 1), {"t": THICK.normalise([3.0, 3.0])},
                              {"t": THICK.normalise([0.5, 1.2])})
    assert (out * 255).flatten().tolist() == pytest.approx([5.0, 100.0])


def test_retrieval_is_the_nearest_image_with_the_counterfactual_parents() -> None:
    # 1x1 images; s = 0, 1, 1, 0; query pixel 100 with do(s=1): candidates 30 and 120 -> 120
    images = torch.tensor([90, 30, 120, 101], dtype=torch.uint8).view(4, 1, 1, 1)
    pa = {"s": torch.tensor([0.0, 1.0, 1.0, 0.0]), "d": torch.tensor([0.0, 0.0, 1.0, 1.0])}
    nearest = NearestTrainingImage().fit(_pool(images, pa, [BINARY, DIGIT]))
    x = torch.full((1, 1, 1, 1), 100 / 255)
    fact = {"s": torch.tensor([0.0]), "d": torch.tensor([1.0])}
    assert nearest.counterfactual(x, fact, {"s": torch.tensor([1.0])}).item() * 255 == pytest.approx(120.0)
    assert nearest.reconstruct(x, fact).item() * 255 == pytest.approx(101.0)
    # do(d=0) with s=1 leaves only image 30 ... unless d changes too; here (s=0, d=0): image 90
    assert nearest.counterfactual(x, fact, {"d": torch.tensor([0.0])}).item() * 255 == pytest.approx(90.0)


def test_retrieval_falls_back_and_compares_pooled_features() -> None:
    # 2x2 images whose 1x1 area means are 40 (s=0, d=0) and 50 (s=0, d=1), and an exact-pixel twin of the query
    # with s=1, d=1 but pooled mean 10 away: the query (s=1, d=0) has no exact match, so the three images with
    # one mismatch compete on pooled distance
    a = torch.tensor([[40, 40], [40, 40]])
    b = torch.tensor([[50, 50], [50, 50]])
    c = torch.tensor([[0, 0], [0, 120]])
    images = torch.stack([a, b, c]).to(torch.uint8).view(3, 1, 2, 2)
    pa = {"s": torch.tensor([0.0, 0.0, 1.0]), "d": torch.tensor([0.0, 1.0, 1.0])}
    nearest = NearestTrainingImage().fit(_pool(images, pa, [BINARY, DIGIT], resolution=1))
    query = torch.tensor([[0, 0], [0, 150]], dtype=torch.float32).view(1, 1, 2, 2) / 255  # mean 37.5
    fact = {"s": torch.tensor([0.0]), "d": torch.tensor([0.0])}
    # (s=1, d=0): a (d matches) and c (s matches) have one mismatch; pooled means 40 and 30 -> a
    assert nearest.nearest(query, {"s": torch.tensor([1.0]), "d": torch.tensor([0.0])}).tolist() == [0]
    full = NearestTrainingImage().fit(_pool(images, pa, [BINARY, DIGIT], resolution=None))
    assert full.nearest(query, {"s": torch.tensor([1.0]), "d": torch.tensor([0.0])}).tolist() == [2]
    assert nearest.counterfactual(query, fact, {}).mul(255).flatten().tolist() == pytest.approx([40.0] * 4)


def test_references_need_fitting() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        MeanImageCounterfactual().counterfactual(torch.zeros(1, 1, 1, 1), {"s": torch.zeros(1)}, {})
    with pytest.raises(NotImplementedError, match="no exogenous noise"):
        IdentityCounterfactual().abduct(torch.zeros(1), {})


# -- the effect / preservation split ----------------------------------------------------------------------------
def test_split_error_by_hand() -> None:
    # one 2-channel 1x3 image; the truth changes pixel 0 (channel 1 only) and pixel 2 (both), not pixel 1
    x = torch.tensor([[[[0.5, 0.5, 0.5]], [[0.5, 0.5, 0.5]]]])
    truth = torch.tensor([[[[0.5, 0.5, 0.1]], [[0.9, 0.5, 0.1]]]])
    preds = torch.tensor([[[[0.6, 0.7, 0.2]], [[0.8, 0.3, 0.3]]]])
    assert changed_pixels(x, truth)[0, 0, 0].tolist() == [True, False, True]
    values = true_counterfactual_split_error(preds, x, truth)
    # effect: elements (c0,p0) 0.1, (c1,p0) -0.1, (c0,p2) 0.1, (c1,p2) 0.2 against the truth
    assert values["effect_mse"].item() == pytest.approx((0.01 + 0.01 + 0.01 + 0.04) / 4)
    assert values["effect_l1"].item() == pytest.approx((0.1 + 0.1 + 0.1 + 0.2) / 4)
    # preservation: pixel 1 against x: 0.2 and -0.2
    assert values["preservation_mse"].item() == pytest.approx(0.04)
    assert values["preservation_l1"].item() == pytest.approx(0.2)
    assert values["changed_fraction"].item() == pytest.approx(2 / 3)
    assert values["mse"].item() == pytest.approx(((preds - truth) ** 2).mean().item())
    # a change within the tolerance (two grey levels) is not a change
    assert not changed_pixels(x, x + 1.9 / 255).any() and changed_pixels(x, x + 2.1 / 255).all()


def test_split_error_metric_is_set_level_and_nan_when_empty() -> None:
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (3, 1, 4):
        x = torch.rand(n, 3, 4, 4, generator=g)
        truth = torch.where(torch.rand(n, 1, 4, 4, generator=g) > 0.7, torch.rand(n, 3, 4, 4, generator=g), x)
        batches.append((torch.rand(n, 3, 4, 4, generator=g), truth, x))
    metric = TrueCounterfactualSplitError()
    for preds, truth, x in batches:
        metric.update(preds, truth, x)
    whole = true_counterfactual_split_error(*(torch.cat(t) for t in zip(*[(p, x, t) for p, t, x in batches],
                                                                      strict=True)))
    for key, value in metric.compute().items():
        assert value.item() == pytest.approx(whole[key].item(), rel=1e-12), key
    x = torch.rand(2, 1, 2, 2, generator=g)
    nothing = true_counterfactual_split_error(x, x, x)
    assert math.isnan(nothing["effect_mse"].item()) and nothing["preservation_mse"].item() == 0.0
    sums = split_error_sums(x, x, x)
    assert (sums["changed_pixels"].item(), sums["pixels"].item()) == (0, 8)


# -- through the editing callback ----------------------------------------------------------------------------
def _references() -> ReferenceCounterfactuals:
    return ReferenceCounterfactuals({"identity": IdentityCounterfactual(), "mean": MeanImageCounterfactual(),
                                     "retrieval": NearestTrainingImage()}, retrieval_resolution=None)


def _by_hand(data: TinyEditingData):
    """The three references' (reconstruction, do(0), do(1)) by hand: the pool is the training split = rows
    [0, n_val) of the fixture."""
    pool_x = data.images[: data.n_val].double().numpy()
    pool_x = np.round(pool_x * 255) / 255
    pool_y = data.labels[: data.n_val].numpy()

    def identity(x, y):
        return x, x, x

    def mean(x, y):
        def group(v):
            return np.broadcast_to(pool_x[pool_y == v].mean(0), x.shape)
        return np.broadcast_to(pool_x.mean(0), x.shape), group(0), group(1)

    def retrieval(x, y):
        def nearest(values):
            out = []
            for image, v in zip(x, values, strict=True):
                candidates = np.flatnonzero(pool_y == v)
                d = ((pool_x[candidates] - image) ** 2).sum(axis=(1, 2, 3))
                out.append(pool_x[candidates[np.argmin(d)]])
            return np.stack(out)
        return nearest(y), nearest(np.zeros_like(y)), nearest(np.ones_like(y))

    return {"identity": identity, "mean": mean, "retrieval": retrieval}


def test_references_are_evaluated_beside_the_model_by_hand(tmp_path) -> None:
    data = TinyEditingData(n_val=10, n_test=7, batch_size=3)
    callback = AttributeEditingMetrics(ATTR, oracle=FakeOracle(), preservation_oracle=FakeOracle(),
                                       preserved=[OTHER])
    trainer = make_trainer(tmp_path, [callback, _references()])
    logged = as_floats(trainer.test(FakeEditor(), datamodule=data, verbose=False)[0])
    expected = expected_metrics(data, range(10, 17), "test", preserved=True)
    for name, outputs in _by_hand(data).items():
        expected.update(expected_metrics(data, range(10, 17), "test", outputs=outputs, preserved=True,
                                         prefix=f"reference/{name}/"))
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # doing nothing: a perfect preservation, the full change as effect; the mean image ignores x
    assert logged["test/reference/identity/true_cf/preservation_mse"] == 0.0
    assert logged["test/reference/identity/true_cf/effect_mse"] > logged["test/true_cf/effect_mse"] > 0
    assert logged["test/reference/mean/true_cf/preservation_mse"] > 0.01


def test_reference_values_are_computed_once_in_validation(tmp_path, monkeypatch) -> None:
    data = TinyEditingData(n_val=8, batch_size=4)
    callback = AttributeEditingMetrics(ATTR, oracle=FakeOracle())
    references = _references()
    calls = []
    original = IdentityCounterfactual.counterfactual
    monkeypatch.setattr(IdentityCounterfactual, "counterfactual",
                        lambda self, *a: calls.append(1) or original(self, *a))
    trainer = make_trainer(tmp_path, [callback, references], max_epochs=3, limit_train_batches=1)
    trainer.fit(FakeEditor(), datamodule=data)
    assert len(calls) == 2 * 3  # reconstruct, do(0) and do(1) of two batches, in the first epoch only
    assert callback.results["val"]["val/reference/identity/true_cf/preservation_mse"] == 0.0
    assert trainer.callback_metrics["val/reference/identity/mse"].item() == 0.0


def test_references_of_without_the_callback_is_empty() -> None:
    assert references_of(None) == {}
    with pytest.raises(ValueError, match="not 'model'"):
        ReferenceCounterfactuals({"model": IdentityCounterfactual()})
    with pytest.raises(TypeError, match="lightning_modules.references"):
        ReferenceCounterfactuals({"x": torch.nn.Linear(1, 1)})
