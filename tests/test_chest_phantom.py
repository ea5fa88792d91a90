"""The chest phantom: CheXpert layout, determinism, caching, findings as physical changes, true counterfactuals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.chest_phantom_ctr import measure_ctr
from configs.loader import _load_option, instantiate
from datamodules.base import DatasetError
from datamodules.chexpert import CheXpertDataModule, preprocess
from datamodules.chexpert_format import OBSERVATIONS, RELEASE_DIR, TRAIN_CSV, VALID_CSV, read_chexpert_csv
from datamodules.synthetic.chest_phantom import (
    FACTORS_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ChestPhantomBuilder,
    load_factors,
)
from datamodules.synthetic.chest_phantom_factors import (
    CTR_ENLARGED,
    CTR_NORMAL,
    MODELLED_FINDINGS,
    cardiothoracic_ratio,
    sample_phantom,
)
from datamodules.synthetic.chest_phantom_render import finding_box, render, render_frontal

SMALL = {"n_train_patients": 6, "n_valid_patients": 3, "image_size": 96, "seed": 0}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChestPhantomBuilder, Path]:
    builder = ChestPhantomBuilder(**SMALL)
    return builder, builder.build(tmp_path_factory.mktemp("phantom") / RELEASE_DIR)


def _row(factors: dict[str, np.ndarray], i: int) -> dict:
    return {k: v[i].item() for k, v in factors.items()}


def _read(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / Path(rel).relative_to(RELEASE_DIR)) as im:
        assert im.mode == "L"
        return np.asarray(im)


# -- layout and labels ---------------------------------------------------------------------------------


def test_files_follow_the_chexpert_layout(built: tuple[ChestPhantomBuilder, Path]) -> None:
    _, root = built
    train, valid = read_chexpert_csv(root / TRAIN_CSV), read_chexpert_csv(root / VALID_CSV)
    factors, params = load_factors(root)
    assert params == json.loads((root / MANIFEST_FILE).read_text())["params"]
    assert len(factors["Cardiomegaly"]) == len(train) + len(valid)
    assert all(p.startswith(f"{RELEASE_DIR}/train/patient") for p in train.paths)
    assert all(p.startswith(f"{RELEASE_DIR}/valid/patient") and p.endswith("view1_frontal.jpg") for p in valid.paths)
    assert len({p.split("/")[2] for p in train.paths}) == 6 and len(valid) == 3
    for i, p in enumerate(train.paths + valid.paths):
        assert ("frontal" in p) == bool(factors["frontal"][i]) and _read(root, p).shape == (96, 96)
    assert (train.view == np.where(factors["frontal"][: len(train)] == 1, "Frontal", "Lateral")).all()

    # valid.csv like the release's consensus labels: every cell 1.0 or 0.0, equal to the truth
    for name in OBSERVATIONS:
        assert set(np.unique(valid.labels[name])) <= {0.0, 1.0}
    for name in MODELLED_FINDINGS:
        np.testing.assert_array_equal(valid.labels[name], factors[name][len(train):])
    # train.csv reports: one label row per study; unmodelled observations blank; No Finding iff no mention
    for name in set(OBSERVATIONS) - {*MODELLED_FINDINGS, "No Finding"}:
        assert np.isnan(train.labels[name]).all()
    mentioned = np.zeros(len(train), bool)
    for name in MODELLED_FINDINGS:
        cells, truth = train.labels[name], factors[name][: len(train)]
        assert (cells[truth == 1] != 0).all() and not np.isnan(cells[truth == 1]).any()
        assert not (cells[truth == 0] == 1).any()
        mentioned |= (cells == 1) | (cells == -1)
    np.testing.assert_array_equal(train.labels["No Finding"] == 1, ~mentioned)


def test_sampled_population() -> None:
    f, rows = sample_phantom(3000, 100, seed=3)
    frontal, source = f["frontal"] == 1, f["source"]
    assert abs(f["Cardiomegaly"][frontal].mean() - 0.15) < 0.04
    assert abs(f["Consolidation"][frontal].mean() - 0.08) < 0.02
    assert abs(f["Atelectasis"][frontal].mean() - 0.15) < 0.02
    assert abs(f["Sex"][frontal].mean() - 0.41) < 0.04
    old, young = f["Age"] >= 70, f["Age"] < 50
    assert f["Cardiomegaly"][old].mean() > 2 * f["Cardiomegaly"][young].mean()
    assert not (~frontal & (source == 1)).any(), "valid.csv has frontal views only"
    assert 0.1 < (~frontal).mean() < 0.2
    # Cardiomegaly is the patient's; studies of one patient age forward
    for p in np.unique(f["patient"])[:200]:
        mine = f["patient"] == p
        assert len(np.unique(f["Cardiomegaly"][mine])) == 1 and (np.diff(f["Age"][mine]) >= 0).all()
    cells = np.array([r["Cardiomegaly"] for r in rows if r["Path"].split("/")[1] == "train"], dtype=float)
    assert 0.2 < np.isnan(cells).mean() < 0.8 and (cells == -1).any()
    with pytest.raises(ValueError, match="unknown population keys"):
        sample_phantom(5, 0, population={"pneumonia": 0.1})
    with pytest.raises(ValueError, match="not a probability"):
        ChestPhantomBuilder(population={"cardiomegaly": 1.5})


def test_generation_is_deterministic(built: tuple[ChestPhantomBuilder, Path], tmp_path: Path) -> None:
    _, root = built
    again = ChestPhantomBuilder(**SMALL).build(tmp_path / "same")
    for name in (TRAIN_CSV, VALID_CSV):
        assert (again / name).read_bytes() == (root / name).read_bytes()
    paths = read_chexpert_csv(root / TRAIN_CSV).paths
    for p in (paths[0], paths[-1]):
        rel = Path(p).relative_to(RELEASE_DIR)
        assert (again / rel).read_bytes() == (root / rel).read_bytes()
    other = ChestPhantomBuilder(**{**SMALL, "seed": 1}).build(tmp_path / "other")
    rel = Path(read_chexpert_csv(other / TRAIN_CSV).paths[0]).relative_to(RELEASE_DIR)
    assert (other / rel).read_bytes() != (root / rel).read_bytes()


def test_build_is_cached_and_regenerated_on_change(tmp_path: Path) -> None:
    params = {**SMALL, "n_train_patients": 2, "n_valid_patients": 1, "image_size": 64}
    builder = ChestPhantomBuilder(**params)
    builder.build(tmp_path)
    n = builder.render_count
    assert n == len(load_factors(tmp_path)[0]["frontal"])
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    ChestPhantomBuilder(**params).build(tmp_path)
    builder.build(tmp_path)
    assert builder.render_count == n and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes

    changed = ChestPhantomBuilder(**{**params, "noise_std": 0.0})
    changed.build(tmp_path)
    assert changed.render_count == n
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["params"]["noise_std"] == 0.0
    (tmp_path / MANIFEST_FILE).unlink()  # an interrupted build has no manifest
    changed.build(tmp_path)
    assert changed.render_count == 2 * n and (tmp_path / FACTORS_FILE).is_file()
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION - 1}))
    changed.build(tmp_path)  # drawn by an older renderer: drawn again
    assert changed.render_count == 3 * n


def test_refuses_to_overwrite_a_foreign_dataset(tmp_path: Path) -> None:
    (tmp_path / TRAIN_CSV).write_text("Path\n")
    with pytest.raises(DatasetError, match="refusing"):
        ChestPhantomBuilder(**SMALL).build(tmp_path)
    assert (tmp_path / TRAIN_CSV).read_text() == "Path\n"


# -- findings and counterfactuals ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def frontal_rows() -> list[dict]:
    f, _ = sample_phantom(40, 0, seed=7)
    return [_row(f, i) for i in np.flatnonzero(f["frontal"] == 1)[:24]]


@pytest.mark.parametrize("finding", MODELLED_FINDINGS)
def test_toggling_a_finding_changes_only_its_region(frontal_rows: list[dict], finding: str) -> None:
    size = 96
    for row in frontal_rows:
        factual = render_frontal(row, size, noise_std=0.012)
        assert np.array_equal(factual, render_frontal(dict(row), size, noise_std=0.012))
        toggled = render_frontal(dict(row, **{finding: 1 - row[finding]}), size, noise_std=0.012)
        changed = factual != toggled
        y0, y1, x0, x1 = finding_box(row, finding, size)
        assert changed[y0:y1, x0:x1].sum() >= 10, f"{finding} should visibly change the image"
        assert (y1 - y0) * (x1 - x0) < 0.3 * size * size, "the region should be local"
        changed[y0:y1, x0:x1] = False
        assert not changed.any(), f"toggling {finding} changed pixels outside its region"


def test_findings_change_the_image_the_right_way(frontal_rows: list[dict]) -> None:
    row = next(r for r in frontal_rows if not any(r[n] for n in MODELLED_FINDINGS))
    normal = render_frontal(row, 128).astype(float)
    for finding in MODELLED_FINDINGS:
        diff = render_frontal(dict(row, **{finding: 1}), 128).astype(float) - normal
        y0, y1, x0, x1 = finding_box(row, finding, 128)
        # each finding puts soft tissue where air was (brighter); atelectasis also removes no air elsewhere
        assert diff[y0:y1, x0:x1].sum() > 0 and (diff >= -1).all(), finding


def test_cardiothoracic_ratio_ranges_and_pixels(frontal_rows: list[dict]) -> None:
    u = np.linspace(0, 1, 11)
    assert cardiothoracic_ratio(0, u).min() == CTR_NORMAL[0] and cardiothoracic_ratio(0, u).max() == CTR_NORMAL[1]
    assert cardiothoracic_ratio(1, u).min() == CTR_ENLARGED[0] and cardiothoracic_ratio(1, u).max() == CTR_ENLARGED[1]
    clean = [r for r in frontal_rows if not (r["Consolidation"] or r["Atelectasis"])][:4]
    for row in clean:
        for card in (0, 1):
            f = dict(row, Cardiomegaly=card)
            img = preprocess(Image.fromarray(render_frontal(f, 256, 0.012)), 128)
            truth = float(cardiothoracic_ratio(card, row["ctr_u"]))
            assert abs(measure_ctr(img) - truth) < 0.04, (card, measure_ctr(img), truth)


def test_noop_counterfactual_reproduces_the_stored_jpeg(built: tuple[ChestPhantomBuilder, Path]) -> None:
    builder, root = built
    factors, _ = builder.load_factors(root)
    paths = read_chexpert_csv(root / TRAIN_CSV).paths + read_chexpert_csv(root / VALID_CSV).paths
    idx = np.array([0, 1, len(paths) - 1])
    stored = np.stack([_read(root, paths[i]) for i in idx])
    assert np.array_equal(builder.true_counterfactual(root, idx, {}), stored)
    own = {n: factors[n][idx] for n in (*MODELLED_FINDINGS, "Sex", "Age")}
    assert np.array_equal(builder.true_counterfactual(root, idx, own), stored)


def test_counterfactual_sets_only_what_it_names(built: tuple[ChestPhantomBuilder, Path]) -> None:
    builder, root = built
    factors, _ = builder.load_factors(root)
    idx = np.arange(4)
    cf = builder.true_counterfactual(root, idx, {"Consolidation": 1, "Age": 85.0}, jpeg_roundtrip=False)
    rows = {k: v[idx].copy() for k, v in factors.items()}
    rows["Consolidation"][:], rows["Age"][:] = 1, 85.0
    assert np.array_equal(cf, builder.render(rows))
    sex = builder.true_counterfactual(root, [0], {"Sex": 1 - factors["Sex"][0]}, jpeg_roundtrip=False)[0]
    assert (sex != render(_row(factors, 0), 96, builder.noise_std)).mean() > 0.2, "Sex changes the body"


def test_invalid_interventions_raise(built: tuple[ChestPhantomBuilder, Path]) -> None:
    builder, root = built
    with pytest.raises(ValueError, match="Cardiomegaly, Consolidation, Atelectasis, Sex, Age"):
        builder.true_counterfactual(root, [0, 1], {"Edema": 1})
    with pytest.raises(ValueError, match="0 or 1"):
        builder.true_counterfactual(root, [0, 1], {"Cardiomegaly": 0.5})
    with pytest.raises(ValueError, match="length 2"):
        builder.true_counterfactual(root, [0, 1], {"Cardiomegaly": [1, 0, 1]})
    with pytest.raises(ValueError, match="years"):
        builder.true_counterfactual(root, [0], {"Age": -0.5})
    with pytest.raises(IndexError):
        builder.true_counterfactual(root, [10_000], {})


# -- through the DataModule and the config ------------------------------------------------------------


def test_datamodule_true_counterfactuals(tmp_path: Path) -> None:
    builder = ChestPhantomBuilder(**{**SMALL, "population": {"cardiomegaly": 0.5}})
    dm = CheXpertDataModule(str(tmp_path / "phantom"), attributes=["Cardiomegaly", "Age"], builder=builder,
                            split="official", split_fractions=[0.5, 0.5, 0.0], batch_size=64, image_size=64,
                            cache="always")  # no files yet: no error
    assert dm.has_true_counterfactuals
    with pytest.raises(DatasetError, match="prepare_data"):
        dm.setup("fit")
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    x, index, pa = batch["x"], batch["index"], batch["pa"]
    assert x.shape[1:] == (1, 64, 64)
    own = dm.true_counterfactual(index, {"Cardiomegaly": pa["Cardiomegaly"], "Age": pa["Age"]})
    assert own.dtype == torch.float32 and torch.equal(own, x)
    flipped = dm.true_counterfactual(index, {"Cardiomegaly": 1.0 - pa["Cardiomegaly"]})
    assert all(not torch.equal(a, b) for a, b in zip(flipped, x, strict=True))
    # Age in batch units (normalised) reaches the builder in years
    older = dm.true_counterfactual(index[:1], {"Age": torch.tensor([1.0])})
    raw = builder.true_counterfactual(dm.root, index[:1].numpy(), {"Age": 90.0})
    expected = torch.from_numpy(preprocess(Image.fromarray(raw[0]), 64))[None].float() / 255
    assert torch.equal(older[0], expected)
    with pytest.raises(ValueError, match="0/1"):
        dm.true_counterfactual(index, {"Cardiomegaly": torch.full((len(index),), 0.5)})
    with pytest.raises(KeyError, match="Sex"):
        dm.true_counterfactual(index, {"Sex": 1.0})


def test_config_builds_the_phantom_datamodule(tmp_path: Path) -> None:
    cfg = _load_option("data", "chest_phantom")
    assert _load_option("data", "chexpert")._target_ == cfg._target_ == "datamodules.chexpert.CheXpertDataModule"
    cfg.root, cfg.seed, cfg.builder.seed = str(tmp_path), 0, 0
    cfg.builder.n_train_patients, cfg.builder.n_valid_patients, cfg.builder.image_size = 3, 2, 64
    dm = instantiate(cfg)
    assert isinstance(dm.builder, ChestPhantomBuilder) and dm.image_shape == (1, 128, 128)
    dm.prepare_data()
    assert (tmp_path / TRAIN_CSV).is_file() and dm.split == "official"


def test_the_command_line_and_the_config_build_the_same_phantom():
    """`make data-chest` must prepare exactly the data `data=chest_phantom` reads (same folder, same stamp)."""
    from configs.loader import compose, instantiate

    cfg = compose("classifier_smiling_synth", ["data=chest_phantom"])
    builder = instantiate(cfg.data.builder)
    default = ChestPhantomBuilder()
    assert builder.params == default.params
    assert cfg.data.root.endswith(f"chest_phantom_{default.image_size}px_{default.n_train_patients}_seed0")
