"""CheXpertDataModule on tiny datasets written in CheXpert-v1.0-small's layout (``tests.helpers.chexpert_layout``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from datamodules.base import Attribute, DatasetError
from datamodules.chexpert import CheXpertDataModule
from datamodules.chexpert_format import (
    OBSERVATIONS,
    RELEASE_DIR,
    SPLITS,
    TRAIN_CSV,
    VALID_CSV,
    read_chexpert_csv,
)
from tests.helpers.chexpert_layout import TRAIN_ROWS, VALID_ROWS, image_path, write_tiny_chexpert

N_TRAIN = len(TRAIN_ROWS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only tiny CheXpert shared by the tests that do not modify files."""
    return write_tiny_chexpert(tmp_path_factory.mktemp("chexpert"))


@pytest.fixture
def tiny_rw(tmp_path: Path) -> Path:
    """A private tiny CheXpert for tests that break files."""
    return write_tiny_chexpert(tmp_path)


def make_dm(root: Path | str, **kwargs) -> CheXpertDataModule:
    # official split with an empty test share of train.csv: every train.csv row is in train or val, valid.csv
    # rows in test, so the three splits together show every selected row
    kwargs = {"batch_size": 4, "cache": "never", "split": "official", "split_fractions": [0.5, 0.5, 0.0],
              **kwargs}
    return CheXpertDataModule(str(root), **kwargs)


def selected(dm: CheXpertDataModule) -> dict[int, tuple[float, ...]]:
    """Global row -> raw parent values, over all three splits."""
    out = {}
    for split in SPLITS:
        rows = dm.split_rows(split)
        values = dm.parent_values(rows)
        for k, r in enumerate(rows):
            out[int(r)] = tuple(float(values[n][k]) for n in dm.attribute_names)
    return dict(sorted(out.items()))


# -- labels: CSV parsing, uncertainty policies, the pathology-vs-No-Finding task -------------------------


def test_csv_cells(tiny: Path) -> None:
    table = read_chexpert_csv(tiny / TRAIN_CSV)
    assert table.paths[0] == f"{RELEASE_DIR}/train/patient00001/study1/view1_frontal.jpg"
    cardio = table.labels["Cardiomegaly"]
    np.testing.assert_array_equal(cardio[[2, 3, 4]], [1.0, -1.0, 0.0])
    assert np.isnan(cardio[0]) and np.isnan(table.labels["Edema"][0])
    assert table.sex[9] == "Unknown" and table.age[5] == 70 and table.view[1] == "Lateral"
    valid = read_chexpert_csv(tiny / VALID_CSV)
    assert not any(np.isnan(v).any() or (v == -1).any() for v in valid.labels.values())
    assert set(valid.labels) == set(OBSERVATIONS)


# The hand-written rows of tests/helpers/chexpert_layout.py and what each policy keeps (row -> Cardiomegaly):
# uncertain Cardiomegaly with a blank No Finding (rows 3, 9) is neither class under zeros, a positive under
# ones, dropped under ignore; other-pathology-only (7) and contradictory (13) rows and lateral views never count.
EXPECTED_CARDIOMEGALY = {
    "zeros": {0: 0, 2: 1, 4: 0, 5: 1, 8: 0, 10: 0, 11: 1, 14: 1, 15: 0},
    "ones": {0: 0, 2: 1, 3: 1, 4: 0, 5: 1, 8: 0, 9: 1, 10: 0, 11: 1, 14: 1, 15: 0},
    "ignore": {0: 0, 2: 1, 4: 0, 5: 1, 8: 0, 10: 0, 11: 1, 14: 1, 15: 0},
}


@pytest.mark.parametrize("policy", list(EXPECTED_CARDIOMEGALY))
def test_pathology_vs_no_finding(tiny: Path, policy: str) -> None:
    dm = make_dm(tiny, attributes=["Cardiomegaly"], uncertainty=policy)
    expected = {r: (float(v),) for r, v in EXPECTED_CARDIOMEGALY[policy].items()}
    assert selected(dm) == expected


@pytest.mark.parametrize("policy, expected", [
    ("zeros", {0: (0, 0), 2: (1, 0), 3: (0, 1), 4: (0, 0), 5: (1, 0), 8: (0, 0), 10: (0, 0), 11: (1, 0),
               14: (1, 0), 15: (0, 0)}),
    ("ones", {0: (0, 0), 2: (1, 0), 3: (1, 1), 4: (0, 0), 5: (1, 0), 8: (0, 0), 9: (1, 0), 10: (0, 0),
              11: (1, 0), 14: (1, 0), 15: (0, 0)}),
    # row 3 is uncertain in Cardiomegaly, a used column, so ignore drops it although it has Consolidation
    ("ignore", {0: (0, 0), 2: (1, 0), 4: (0, 0), 5: (1, 0), 8: (0, 0), 10: (0, 0), 11: (1, 0), 14: (1, 0),
                15: (0, 0)}),
])
def test_two_findings(tiny: Path, policy: str, expected: dict) -> None:
    dm = make_dm(tiny, attributes=["Cardiomegaly", "Consolidation"], uncertainty=policy)
    assert selected(dm) == {r: tuple(float(x) for x in v) for r, v in expected.items()}


def test_task_all_and_frontal_filter(tiny: Path) -> None:
    frontal = {0: 0, 2: 1, 3: 0, 4: 0, 5: 1, 7: 0, 8: 0, 9: 0, 10: 0, 11: 1, 13: 1, 14: 1, 15: 0}
    dm = make_dm(tiny, attributes=["Cardiomegaly"], task="all")
    assert selected(dm) == {r: (float(v),) for r, v in frontal.items()}
    every_view = {**frontal, 1: 0, 6: 1, 12: 1, 16: 0}
    dm = make_dm(tiny, attributes=["Cardiomegaly"], task="all", frontal_only=False)
    assert selected(dm) == {r: (float(v),) for r, v in sorted(every_view.items())}


def test_sex_and_age_parents(tiny: Path) -> None:
    dm = make_dm(tiny, attributes=["Sex", "Age"], task="all", age_range=[20, 80])
    rows = selected(dm)
    assert 9 not in rows and 10 not in rows, "Unknown sex is dropped when Sex is a parent"
    entries = TRAIN_ROWS + VALID_ROWS
    for r, (sex, age) in rows.items():
        assert sex == {"Male": 0.0, "Female": 1.0}[entries[r][3]] and age == entries[r][4]
    age = dm.attribute("Age")
    assert age.kind == "continuous" and (age.low, age.high) == (20.0, 80.0) and age.bins[0] == 20.0
    assert dm.attribute("Sex") == Attribute("Sex", "binary")
    item = dm.dataset("test")[0]  # valid.csv row 14: a 50-year-old man
    assert int(item["index"]) == 14 and item["pa"]["Sex"] == 0.0
    assert item["pa"]["Age"] == pytest.approx(2 * (50 - 20) / 60 - 1)


# -- layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder, prefix", [(RELEASE_DIR, None), ("renamed", None), ("renamed", "")],
                         ids=["release", "renamed-folder", "paths-relative-to-root"])
def test_path_forms(tmp_path: Path, folder: str, prefix: str | None) -> None:
    root = write_tiny_chexpert(tmp_path, folder_name=folder, path_prefix=prefix)
    dm = make_dm(root)
    dm.setup()
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 7 and len(dm.dataset("test")) == 2
    assert dm.dataset("test").files[0] == image_path(root, 14)


def test_patient_level_random_split(tmp_path: Path) -> None:
    root = write_tiny_chexpert(tmp_path, extra_patients=40)
    patients = {}
    for i, p in enumerate(read_chexpert_csv(root / TRAIN_CSV).paths):
        patients[i] = p.split("/")[2]

    def split_patients(seed: int) -> dict[str, set[str]]:
        dm = make_dm(root, split="random", split_fractions=[0.6, 0.2, 0.2], seed=seed, task="all",
                     frontal_only=False)
        return {s: {patients[int(r)] for r in dm.split_rows(s)} for s in SPLITS}

    first = split_patients(0)
    assert not (first["train"] & first["val"]) and not (first["train"] & first["test"])
    assert not (first["val"] & first["test"])
    assert sum(len(v) for v in first.values()) == 46
    assert 25 <= len(first["train"]) <= 30 and all(len(first[s]) >= 7 for s in ("val", "test"))
    assert split_patients(0) == first and split_patients(1) != first
    # the cut is over all patients, before the task's row filter: a patient stays in its split
    dm = make_dm(root, split="random", split_fractions=[0.6, 0.2, 0.2], seed=0)
    assert all({patients[int(r)] for r in dm.split_rows(s)} <= first[s] for s in SPLITS)


def test_official_split_uses_valid_csv_as_test(tiny: Path) -> None:
    dm = make_dm(tiny, split_fractions=[0.8, 0.1, 0.1])
    assert dm.split_rows("test").tolist() == [14, 15]
    train, val = set(dm.split_rows("train").tolist()), set(dm.split_rows("val").tolist())
    assert train | val == {0, 2, 4, 5, 8, 10, 11} and not train & val


def test_random_split_needs_no_valid_csv(tiny_rw: Path) -> None:
    (tiny_rw / VALID_CSV).unlink()
    dm = make_dm(tiny_rw, split="random", split_fractions=[0.5, 0.25, 0.25])
    assert sum(len(dm.split_rows(s)) for s in SPLITS) == 7


def test_patient_in_both_csvs_is_refused(tiny_rw: Path) -> None:
    text = (tiny_rw / VALID_CSV).read_text().replace("patient00090", "patient00001")
    (tiny_rw / VALID_CSV).write_text(text)
    with pytest.raises(DatasetError, match="share 1 patient") as err:
        make_dm(tiny_rw).setup()
    assert VALID_CSV in str(err.value)


# -- batches -----------------------------------------------------------------------------------------


def test_batch_contract(tiny: Path) -> None:
    dm = make_dm(tiny, attributes=["Cardiomegaly", "Sex"], uncertainty="ones")
    assert dm.image_shape == (1, 128, 128) and dm.attribute_names == ["Cardiomegaly", "Sex"]
    assert not dm.has_true_counterfactuals
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"x", "pa", "index"}
    x, pa, index = batch["x"], batch["pa"], batch["index"]
    assert x.dtype == torch.float32 and x.shape == (len(index), 1, 128, 128)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert index.dtype == torch.int64 and list(pa) == ["Cardiomegaly", "Sex"]
    expected = selected(dm)
    for k, r in enumerate(index.tolist()):
        assert (float(pa["Cardiomegaly"][k]), float(pa["Sex"][k])) == expected[r]
        assert pa["Sex"].dtype == torch.float32


@pytest.mark.parametrize("image_size", [32, 128])
def test_centre_crop_and_antialiased_resize(tiny: Path, image_size: int) -> None:
    dm = make_dm(tiny, image_size=image_size)
    item = dm.dataset("test")[0]
    with Image.open(image_path(tiny, 14)) as img:
        reference = TF.resize(TF.center_crop(img.convert("L"), [40, 40]), [image_size, image_size],
                              interpolation=TF.InterpolationMode.BICUBIC)
    expected = torch.from_numpy(np.array(reference))[None].float() / 255
    torch.testing.assert_close(item["x"], expected, rtol=0, atol=0)
    squashed = make_dm(tiny, image_size=image_size, center_crop=False).dataset("test")[0]["x"]
    assert squashed.shape == (1, image_size, image_size) and not torch.equal(squashed, item["x"])


def test_cache_matches_and_respects_the_budget(tiny: Path) -> None:
    cached, uncached = make_dm(tiny, cache="always"), make_dm(tiny)
    for split in SPLITS:
        a, b = cached.dataset(split), uncached.dataset(split)
        assert a.cache is not None and b.cache is None
        for i in range(len(a)):
            assert torch.equal(a[i]["x"], b[i]["x"]) and torch.equal(a[i]["index"], b[i]["index"])
    test_bytes = 2 * 128 * 128
    dm = make_dm(tiny, cache="auto", cache_max_bytes=test_bytes)
    dm.setup("test")
    dm.setup("fit")
    assert dm.dataset("test").cache is not None
    assert dm.dataset("train").cache is None and dm.dataset("val").cache is None


def test_balanced_sampler(tiny: Path) -> None:
    dm = make_dm(tiny, split="official", split_fractions=[1.0, 0.0, 0.0], balance_attribute="Cardiomegaly")
    labels = dm.dataset("train").raw["Cardiomegaly"]
    weights = dm.train_sampler_weights()
    assert labels.tolist() == [0, 1, 0, 1, 0, 0, 1]
    assert torch.allclose(weights, torch.tensor([1 / 4 if v == 0 else 1 / 3 for v in labels], dtype=torch.float64))


# -- errors ------------------------------------------------------------------------------------------


def test_missing_root_or_csv_fails_at_construction(tiny_rw: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="root folder not found") as err:
        make_dm(tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "data=chest_phantom" in str(err.value)
    (tiny_rw / VALID_CSV).unlink()
    with pytest.raises(DatasetError, match="files missing") as err:
        make_dm(tiny_rw)
    assert str(tiny_rw / VALID_CSV) in str(err.value) and "CheXpert-v1.0-small.zip" in str(err.value)


def test_csv_without_a_needed_column(tiny_rw: Path) -> None:
    lines = (tiny_rw / TRAIN_CSV).read_text().splitlines()
    (tiny_rw / TRAIN_CSV).write_text("\n".join([lines[0].replace("Cardiomegaly", "Cardiomegally"), *lines[1:]]))
    make_dm(tiny_rw, attributes=["Consolidation"]).setup()  # a column this task does not read
    with pytest.raises(DatasetError, match=r"lacks the column\(s\) \['Cardiomegaly'\]") as err:
        make_dm(tiny_rw).setup()
    assert str(tiny_rw / TRAIN_CSV) in str(err.value)


def test_malformed_cells_name_the_line(tiny_rw: Path) -> None:
    lines = (tiny_rw / TRAIN_CSV).read_text().splitlines()
    fields = lines[3].split(",")
    fields[7] = "maybe"  # Cardiomegaly of row 2, on line 4
    (tiny_rw / TRAIN_CSV).write_text("\n".join([*lines[:3], ",".join(fields), *lines[4:]]) + "\n")
    with pytest.raises(DatasetError, match=r"train.csv, line 4, column 'Cardiomegaly'.*'maybe'"):
        make_dm(tiny_rw).setup()
    (tiny_rw / TRAIN_CSV).write_text("\n".join([*lines[:3], ",".join(fields[:5]), *lines[4:]]) + "\n")
    with pytest.raises(DatasetError, match="line 4: expected 19 fields, found 5"):
        make_dm(tiny_rw).setup()


def test_missing_jpeg(tiny_rw: Path) -> None:
    dm = make_dm(tiny_rw)
    dm.setup("test")
    victim = image_path(tiny_rw, 14)
    victim.unlink()
    with pytest.raises(DatasetError, match="missing") as err:
        make_dm(tiny_rw).setup("test")
    assert str(victim) in str(err.value) and VALID_CSV in str(err.value)
    with pytest.raises(DatasetError, match="listed in valid.csv but missing") as err:
        dm.dataset("test")[0]  # set up before the file went: the read itself reports it
    assert str(victim) in str(err.value)


@pytest.mark.parametrize("content", [b"not a jpeg at all", None], ids=["garbage", "truncated"])
def test_corrupt_jpeg(tiny_rw: Path, content: bytes | None) -> None:
    victim = image_path(tiny_rw, 15)
    victim.write_bytes(content if content is not None else victim.read_bytes()[:200])
    dm = make_dm(tiny_rw)
    with pytest.raises(DatasetError, match="cannot decode") as err:
        dm.dataset("test")[1]
    assert str(victim) in str(err.value) and "regenerate" in str(err.value)
    with pytest.raises(DatasetError, match="cannot decode"):
        make_dm(tiny_rw, cache="always").setup("test")


def test_no_image_found_names_the_paths_tried(tmp_path: Path) -> None:
    root = write_tiny_chexpert(tmp_path)
    (root / "train").rename(root / "elsewhere")
    with pytest.raises(DatasetError, match="none of the first 14 images listed in") as err:
        make_dm(root).setup()
    assert str(root / "train" / "patient00001" / "study1" / "view1_frontal.jpg") in str(err.value)


def test_argument_errors(tiny: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown CheXpert parent 'Cardiomegally'; did you mean 'Cardiomegaly'\?"):
        make_dm(tiny, attributes=["Cardiomegally"])
    with pytest.raises(ValueError, match="did you mean 'Pleural Effusion'"):
        make_dm(tiny, attributes=["pleural effusion"])
    with pytest.raises(ValueError, match="defines the negative class"):
        make_dm(tiny, attributes=["No Finding"])
    with pytest.raises(ValueError, match="at least one finding"):
        make_dm(tiny, attributes=["Sex"])
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        make_dm(tiny, uncertainty="u-zeros")
    with pytest.raises(ValueError, match="balance_attribute"):
        make_dm(tiny, attributes=["Cardiomegaly", "Age"], balance_attribute="Age")


def test_true_counterfactual_needs_a_builder(tiny: Path) -> None:
    with pytest.raises(NotImplementedError):
        make_dm(tiny).true_counterfactual(torch.tensor([0]), {"Cardiomegaly": torch.tensor([1.0])})
