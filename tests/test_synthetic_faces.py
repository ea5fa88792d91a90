"""The embedded synthetic faces: CelebA layout, determinism, correlations, caching, true counterfactuals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.base import DatasetError
from datamodules.celeba_format import (
    ATTR_FILE,
    CELEBA_ATTRIBUTES,
    IMAGE_DIR,
    PARTITION_FILE,
    read_attributes,
    read_partition,
)
from datamodules.synthetic.faces import (
    FACTORS_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SyntheticFacesBuilder,
    load_factors,
    preview_grid,
)
from datamodules.synthetic.faces_factors import MODELLED_ATTRIBUTES, sample_factors
from datamodules.synthetic.faces_render import mouth_box, render_face

SMALL = {"n_train": 30, "n_val": 10, "n_test": 10, "image_size": 64, "seed": 0}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticFacesBuilder, Path]:
    builder = SyntheticFacesBuilder(**SMALL)
    root = builder.build(tmp_path_factory.mktemp("faces"))
    return builder, root


def _row(factors: dict[str, np.ndarray], i: int) -> dict:
    return {k: v[i].tolist() for k, v in factors.items()}


def _read_image(root: Path, index: int) -> np.ndarray:
    with Image.open(root / IMAGE_DIR / f"{index + 1:06d}.jpg") as im:
        return np.asarray(im.convert("RGB"))


def test_files_follow_celeba_layout(built: tuple[SyntheticFacesBuilder, Path]) -> None:
    _, root = built
    filenames, names, attrs = read_attributes(root / ATTR_FILE)
    assert filenames == [f"{i:06d}.jpg" for i in range(1, 51)]
    assert tuple(names) == CELEBA_ATTRIBUTES
    assert attrs.shape == (50, 40) and set(np.unique(attrs)) <= {-1, 1}
    unmodelled = [i for i, n in enumerate(CELEBA_ATTRIBUTES) if n not in MODELLED_ATTRIBUTES]
    assert (attrs[:, unmodelled] == -1).all()

    partition = read_partition(root / PARTITION_FILE)
    assert [partition[f] for f in filenames] == [0] * 30 + [1] * 10 + [2] * 10

    factors, params = load_factors(root)
    assert params == json.loads((root / MANIFEST_FILE).read_text())["params"]
    for name in MODELLED_ATTRIBUTES:
        assert (attrs[:, CELEBA_ATTRIBUTES.index(name)] == 2 * factors[name] - 1).all()
    assert sorted(p.name for p in (root / IMAGE_DIR).iterdir()) == filenames
    with Image.open(root / IMAGE_DIR / "000050.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)


def test_generation_is_deterministic(built: tuple[SyntheticFacesBuilder, Path], tmp_path: Path) -> None:
    _, root = built
    again = SyntheticFacesBuilder(**SMALL).build(tmp_path / "same")
    for name in ("000001.jpg", "000025.jpg", "000050.jpg"):
        assert (again / IMAGE_DIR / name).read_bytes() == (root / IMAGE_DIR / name).read_bytes()
    assert (again / ATTR_FILE).read_bytes() == (root / ATTR_FILE).read_bytes()
    f1, f2 = load_factors(root)[0], load_factors(again)[0]
    assert f1.keys() == f2.keys() and all(np.array_equal(f1[k], f2[k]) for k in f1)

    other = SyntheticFacesBuilder(**{**SMALL, "seed": 1}).build(tmp_path / "other")
    assert (other / IMAGE_DIR / "000001.jpg").read_bytes() != (root / IMAGE_DIR / "000001.jpg").read_bytes()


def test_sampled_attributes_respect_correlations() -> None:
    f = sample_factors(5000, seed=3)
    male = f["Male"] == 1
    assert not (f["Mustache"][~male]).any(), "mustache on a female"
    assert (f["No_Beard"][~male] == 1).all(), "beard on a female"
    assert not (f["Black_Hair"] & f["Blond_Hair"]).any()
    assert abs(male.mean() - 0.42) < 0.03 and abs(f["Smiling"].mean() - 0.48) < 0.03
    smiling = f["Smiling"] == 1
    assert abs(f["Mouth_Slightly_Open"][smiling].mean() - 0.7) < 0.04
    assert abs(f["Mouth_Slightly_Open"][~smiling].mean() - 0.3) < 0.04
    assert abs(f["No_Beard"][male].mean() - 0.6) < 0.04
    assert f["Blond_Hair"][~male].mean() > 4 * f["Blond_Hair"][male].mean()
    assert abs(f["Black_Hair"].mean() - 0.24) < 0.03 and abs(f["Blond_Hair"].mean() - 0.15) < 0.03

    all_male = sample_factors(200, seed=3, correlations={"male": 1.0, "hat": 0.0})
    assert all_male["Male"].all() and not all_male["Wearing_Hat"].any()
    with pytest.raises(ValueError, match="unknown correlation"):
        sample_factors(10, correlations={"bald": 0.5})


@pytest.mark.parametrize("size", [64, 128])
def test_flipping_smiling_changes_only_the_mouth_box(size: int) -> None:
    factors = sample_factors(12, seed=5)
    for i in range(12):
        row = _row(factors, i)
        factual = render_face(row, size, noise_std=0.02)
        counterfactual = render_face(dict(row, Smiling=1 - row["Smiling"]), size, noise_std=0.02)
        changed = (factual != counterfactual).any(-1)
        y0, y1, x0, x1 = mouth_box(row, size)
        assert changed[y0:y1, x0:x1].sum() >= 4, "Smiling should visibly change the mouth"
        changed[y0:y1, x0:x1] = False
        assert not changed.any(), f"row {i}: Smiling changed pixels outside the mouth box"
        assert np.array_equal(factual, render_face(row, size, noise_std=0.02))


def test_noop_intervention_reproduces_the_stored_jpeg(built: tuple[SyntheticFacesBuilder, Path]) -> None:
    builder, root = built
    factors, _ = builder.load_factors(root)
    idx = np.array([0, 7, 33, 49])
    stored = np.stack([_read_image(root, i) for i in idx])
    assert np.array_equal(builder.true_counterfactual(root, idx, {}), stored)
    as_pm1 = 2.0 * factors["Smiling"][idx] - 1
    assert np.array_equal(builder.true_counterfactual(root, idx, {"Smiling": as_pm1}), stored)
    as_bool = factors["Male"][idx].astype(bool)
    assert np.array_equal(builder.true_counterfactual(root, idx, {"Male": as_bool}), stored)


def test_counterfactual_sets_only_the_intervened_attribute(built: tuple[SyntheticFacesBuilder, Path]) -> None:
    builder, root = built
    factors, _ = builder.load_factors(root)
    idx = np.arange(6)
    cf = builder.true_counterfactual(root, idx, {"Smiling": 1.0}, jpeg_roundtrip=False)
    rows = {k: v[idx].copy() for k, v in factors.items()}
    rows["Smiling"][:] = 1
    assert np.array_equal(cf, builder.render(rows)), "Mouth_Slightly_Open or another factor was resampled"

    blond = int(np.flatnonzero(factors["Blond_Hair"])[0])
    black = builder.true_counterfactual(root, [blond], {"Black_Hair": 1}, jpeg_roundtrip=False)[0]
    expected = builder.render(dict(_row(factors, blond), Black_Hair=1, Blond_Hair=0))
    assert np.array_equal(black, expected), "hair colour is one variable: Black_Hair=1 clears Blond_Hair"
    with pytest.raises(ValueError, match="both be 1"):
        builder.true_counterfactual(root, [0], {"Black_Hair": 1, "Blond_Hair": 1})


def test_invalid_interventions_raise(built: tuple[SyntheticFacesBuilder, Path]) -> None:
    builder, root = built
    with pytest.raises(ValueError, match="Smiling.*Wearing_Hat"):
        builder.true_counterfactual(root, [0, 1], {"Young": 1})
    with pytest.raises(ValueError, match="0/1"):
        builder.true_counterfactual(root, [0, 1], {"Smiling": 2})
    with pytest.raises(ValueError, match="length 2"):
        builder.true_counterfactual(root, [0, 1], {"Smiling": [1, 0, 1]})
    with pytest.raises(IndexError):
        builder.true_counterfactual(root, [50], {"Smiling": 1})


def test_build_is_cached_and_regenerated_on_change(tmp_path: Path) -> None:
    params = {**SMALL, "n_train": 4, "n_val": 2, "n_test": 2}
    builder = SyntheticFacesBuilder(**params)
    builder.build(tmp_path)
    assert builder.render_count == 8
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    SyntheticFacesBuilder(**params).build(tmp_path)
    builder.build(tmp_path)
    assert builder.render_count == 8
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes

    changed = SyntheticFacesBuilder(**{**params, "n_train": 2, "noise_std": 0.0})
    changed.build(tmp_path)
    assert changed.render_count == 6 and len(list((tmp_path / IMAGE_DIR).iterdir())) == 6
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["params"]["noise_std"] == 0.0

    (tmp_path / MANIFEST_FILE).unlink()  # an interrupted build has no manifest
    changed.build(tmp_path)
    assert changed.render_count == 12 and (tmp_path / FACTORS_FILE).is_file()

    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION - 1}))
    changed.build(tmp_path)  # built by an older renderer: drawn again
    assert changed.render_count == 18
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["format_version"] == FORMAT_VERSION


def test_refuses_to_overwrite_a_foreign_dataset(tmp_path: Path) -> None:
    (tmp_path / ATTR_FILE).write_text("1\n")
    with pytest.raises(DatasetError, match="refusing"):
        SyntheticFacesBuilder(**SMALL).build(tmp_path)
    assert (tmp_path / ATTR_FILE).read_text() == "1\n"


def test_builder_arguments_are_json_and_128_builds(tmp_path: Path) -> None:
    builder = SyntheticFacesBuilder(n_train=2, n_val=1, n_test=1, image_size=128, correlations={"male": 0.9})
    json.dumps(builder.params)
    root = builder.build(tmp_path)
    assert _read_image(root, 3).shape == (128, 128, 3)
    assert builder.true_counterfactual(root, [0, 3], {"Wearing_Hat": 1}).shape == (2, 128, 128, 3)
    with pytest.raises(ValueError):
        SyntheticFacesBuilder(image_size=16)


def test_preview_grid(tmp_path: Path) -> None:
    grid = preview_grid(tmp_path / "grid.png", n=8, image_size=32, pairs=4)
    assert grid.shape == (2 * 32, 8 * 32, 3) and (tmp_path / "grid.png").is_file()
