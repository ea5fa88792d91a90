"""CelebA (and the synthetic faces written in CelebA's layout) as a ``CounterfactualDataModule``.

Reads the official files (see ``datamodules.celeba_format``) from ``root`` or from torchvision's
``root/celeba``. Every image goes through one preprocessing function, ``preprocess``:

1. decode with PIL and convert to RGB;
2. centre-crop a ``crop_size`` square (torchvision's ``CenterCrop`` offsets), as the usual CelebA pipelines
   do on the 178x218 aligned images to keep the face and drop most of the background; ``None`` skips it;
3. resize to ``image_size`` with PIL's antialiased ``BICUBIC`` filter (the filter support grows with the
   downscale factor, so 140 -> 64 does not alias).

Ground-truth counterfactuals from a synthetic builder pass through the same function, so they are
pixel-comparable with the batches.

When file checks happen:

* at construction (no builder): ``check_files`` fails at once, with one ``DatasetError``, if the root, the
  attribute file, the partition file (official split only) or the image folder is missing;
* with a builder the files do not exist until ``prepare_data`` builds them, so the check runs there and in
  ``setup``;
* ``setup`` parses the text files (line-numbered errors from ``celeba_format``), checks that the partition
  covers every image and that every image of the split is on disk; undecodable images raise a
  ``DatasetError`` naming the file when they are read (while caching, or in ``__getitem__``, also inside
  DataLoader workers).

Caching (``cache="auto"``): in ``setup``, each split's decoded, cropped and resized uint8 images are kept in
one tensor if they fit in what is left of ``cache_max_bytes`` (a budget shared by all splits; CelebA's
train split at 64 px is about 2 GB). JPEG decoding is then paid once, in parallel over ``num_workers``,
instead of every epoch; ``"never"`` decodes on every read, ``"always"`` ignores the budget.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from datamodules.base import (
    Attribute,
    CounterfactualDataModule,
    DatasetError,
    check_name,
    distinct_names,
    file_loading_options,
    with_file_loading_options,
)
from datamodules.celeba_format import (
    ATTR_FILE,
    CELEBA_ATTRIBUTES,
    HOW_TO_GET_CELEBA,
    IMAGE_DIR,
    PARTITION_FILE,
    SPLITS,
    read_attributes,
    read_partition,
)


def preprocess(img: Image.Image, image_size: int, crop_size: int | None) -> np.ndarray:
    """Centre crop (optional) and antialiased bicubic resize -> uint8 array [image_size, image_size, 3]."""
    img = img.convert("RGB")
    if crop_size is not None:
        w, h = img.size
        if crop_size > min(w, h):
            raise ValueError(f"crop_size={crop_size} is larger than the {w}x{h} image; set crop_size=null "
                             f"(or a smaller value) for images this size")
        # The same rounding as torchvision's CenterCrop, so crops match the common CelebA pipelines.
        top, left = int(round((h - crop_size) / 2.0)), int(round((w - crop_size) / 2.0))
        img = img.crop((left, top, left + crop_size, top + crop_size))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays


@contextmanager
def _image_errors(path: Path) -> Iterator[None]:
    """Turn a missing or undecodable image into a ``DatasetError`` naming it.

    PIL signals corrupt or truncated JPEGs with several exception types; a bare PIL traceback (possibly
    from inside a DataLoader worker) would not say which of 200k files is broken or what to do.
    """
    try:
        yield
    except FileNotFoundError:
        raise DatasetError(f"image {path} is listed in {ATTR_FILE} but missing. Re-download and unzip "
                           f"img_align_celeba.zip, or regenerate the synthetic data. {HOW_TO_GET_CELEBA}"
                           ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"cannot decode image {path} ({type(err).__name__}: {err}); the file is corrupt or "
                           f"truncated. Re-download img_align_celeba.zip, or regenerate the synthetic data."
                           ) from None


def _to_float(img: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    t = torch.from_numpy(img) if isinstance(img, np.ndarray) else img
    return t.permute(2, 0, 1).to(torch.float32).div_(255.0)


class CelebADataset(Dataset):
    """One split: items are batch-contract dicts ``{"x", "pa", "index"}`` (see ``datamodules.base``)."""

    def __init__(
        self,
        image_dir: Path,
        filenames: Sequence[str],
        rows: np.ndarray,
        labels: np.ndarray,
        names: Sequence[str],
        image_size: int,
        crop_size: int | None,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.filenames = list(filenames)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.float32)  # [n, n_attributes], 0./1.
        self.names = tuple(names)
        self.image_size = image_size
        self.crop_size = crop_size
        # uint8 [n, H, W, 3] once filled. One tensor rather than many arrays: forked workers share it
        # copy-on-write (no per-item refcounts touch its pages), and under spawn/forkserver torch's
        # pickler hands workers a shared-memory handle instead of a copy.
        self.cache: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.filenames)

    def load_uint8(self, i: int) -> np.ndarray:
        """Decode and preprocess image ``i``; every I/O or decoding failure becomes a ``DatasetError``."""
        path = self.image_dir / self.filenames[i]
        with _image_errors(path), Image.open(path) as img:
            return preprocess(img, self.image_size, self.crop_size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = self.cache[i] if self.cache is not None else self.load_uint8(i)
        return {
            "x": _to_float(img),
            "pa": {n: torch.tensor(self.labels[i, j]) for j, n in enumerate(self.names)},
            "index": torch.tensor(self.rows[i], dtype=torch.int64),
        }


def _check_attribute_name(name: str) -> None:
    check_name(name, CELEBA_ATTRIBUTES, "CelebA attribute")


@with_file_loading_options
class CelebADataModule(CounterfactualDataModule):
    """CelebA's binary attributes as parents ``pa``; images in [0, 1] at ``image_size``.

    :param root: folder holding ``list_attr_celeba.txt``, or torchvision's parent of ``celeba/``.
    :param attributes: CelebA attribute names, in the order models and metrics see them.
    :param image_size: output side length (64 or 128 in our experiments).
    :param crop_size: centre-crop side before resizing; ``None`` resizes the whole image (synthetic faces
        are already square at ``image_size``).
    :param split: ``"official"`` (``list_eval_partition.txt``) or ``"random"`` (seeded by ``seed``, sizes
        from ``split_fractions`` = train, val, test fractions of all images).
    :param seed: seed of the random split only; sampling order follows the global RNG, which Lightning's
        ``seed_everything`` fixes.
    :param balance_attribute: any CelebA attribute; the train loader then draws its two classes equally often.
    :param cache: ``"auto"`` (cache a split if it fits in ``cache_max_bytes``), ``"always"`` or ``"never"``.
    :param builder: a synthetic builder (``build(root)``, ``true_counterfactual(root, indices, do)``); it
        writes the files in ``prepare_data`` and provides ground-truth counterfactuals.
    :param limit_per_split: keep only the first N images (in file order) of each split.
    :param drop_last_train: drop the last incomplete train batch, unless that would leave no batch at all.
    """

    def __init__(
        self,
        root: str,
        attributes: Sequence[str],
        image_size: int = 64,
        crop_size: int | None = 140,
        batch_size: int = 64,
        split: str = "official",
        **options: Any,
    ) -> None:
        options = file_loading_options(type(self).__name__, options)  # before save_hyperparameters: it saves them
        super().__init__(batch_size, options["num_workers"], options["seed"], options["pin_memory"],
                         options["drop_last_train"])
        self.save_hyperparameters(ignore=["builder"])
        balance_attribute, builder = options["balance_attribute"], options["builder"]
        names = distinct_names(attributes, _check_attribute_name)
        if balance_attribute is not None:
            _check_attribute_name(balance_attribute)
        self._set_split_and_cache(split, options["split_fractions"], options["cache"], options["cache_max_bytes"],
                                  options["limit_per_split"])
        if image_size < 1 or (crop_size is not None and crop_size < 1):
            raise ValueError(f"image_size and crop_size must be positive, got {image_size}, {crop_size}")

        self.root = Path(root).expanduser()
        self._names = tuple(names)
        self.image_size = int(image_size)
        self.crop_size = None if crop_size is None else int(crop_size)
        self.balance_attribute = balance_attribute
        self.builder = builder

        self._metadata: tuple[list[str], np.ndarray, list[str], dict[str, np.ndarray]] | None = None
        if builder is None:
            # Fail before any training starts: the runner builds the DataModule first.
            self.check_files()

    # -- metadata ------------------------------------------------------------------------------------

    @property
    def attributes(self) -> tuple[Attribute, ...]:
        return tuple(Attribute(n, "binary") for n in self._names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def has_true_counterfactuals(self) -> bool:
        return self.builder is not None

    @property
    def data_dir(self) -> Path:
        """The folder holding the files: ``root`` itself, or torchvision's ``root/celeba``."""
        if not (self.root / ATTR_FILE).exists() and (self.root / "celeba" / ATTR_FILE).exists():
            return self.root / "celeba"
        return self.root

    def check_files(self) -> None:
        """Raise one ``DatasetError`` naming every missing file or folder, with how to get CelebA."""
        # With a builder the files appear in prepare_data(), so a missing file most likely means it was skipped.
        hint = " Call prepare_data() first: the builder writes them." if self.builder is not None else ""
        if not self.root.is_dir():
            raise DatasetError(f"CelebA root folder not found: {self.root}.{hint} {HOW_TO_GET_CELEBA}")
        data_dir = self.data_dir
        needed = [ATTR_FILE, IMAGE_DIR] + ([PARTITION_FILE] if self.split == "official" else [])
        missing = [str(data_dir / n) for n in needed if not (data_dir / n).exists()]
        if missing:
            raise DatasetError(f"CelebA files missing (looked in {data_dir} and {self.root / 'celeba'}): "
                               f"{', '.join(missing)}.{hint} {HOW_TO_GET_CELEBA}")

    def _load_metadata(self) -> tuple[list[str], np.ndarray, list[str], dict[str, np.ndarray]]:
        """Parse the text files once -> (file names, int8 values [N, n_attr] in {1, -1}, header, split -> rows)."""
        if self._metadata is not None:
            return self._metadata
        self.check_files()
        attr_path = self.data_dir / ATTR_FILE
        filenames, header, values = read_attributes(attr_path)
        absent = [n for n in (*self._names, *filter(None, [self.balance_attribute])) if n not in header]
        if absent:
            raise DatasetError(f"{attr_path}, line 2: the header lacks attribute(s) {absent}; is this CelebA's "
                               f"list_attr_celeba.txt? Re-download or regenerate it.")
        rows = np.arange(len(filenames))
        if self.split == "official":
            part_path = self.data_dir / PARTITION_FILE
            partition = read_partition(part_path)
            uncovered = [f for f in filenames if f not in partition]
            if uncovered:
                raise DatasetError(f"{part_path} assigns no split to {len(uncovered)} of the {len(filenames)} "
                                   f"images in {attr_path} (first: {uncovered[0]}); the two files do not match. "
                                   f"Re-download or regenerate both, or use split=random.")
            assigned = np.array([partition[f] for f in filenames], dtype=np.int64)
            splits = {s: rows[assigned == code] for s, code in SPLITS.items()}
        else:
            perm = np.random.default_rng(self.seed).permutation(len(filenames))
            n_train = int(round(self.split_fractions[0] * len(filenames)))
            n_val = min(int(round(self.split_fractions[1] * len(filenames))), len(filenames) - n_train)
            # Sorted so that limit_per_split and the cache walk the files in order.
            splits = {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
                      "test": np.sort(perm[n_train + n_val:])}
        if self.limit_per_split is not None:
            splits = {s: r[: self.limit_per_split] for s, r in splits.items()}
        self._metadata = (filenames, values, header, splits)
        return self._metadata

    def split_rows(self, split: str) -> np.ndarray:
        """0-based rows of ``list_attr_celeba.txt`` in ``split`` (``train``, ``val`` or ``test``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        return self._load_metadata()[3][split]

    def _labels(self, rows: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """float32 [len(rows), len(names)]: CelebA's +-1 as 1./0."""
        _, values, header, _ = self._load_metadata()
        # Columns by name, so a file with another column order still reads correctly.
        cols = [header.index(n) for n in names]
        return (values[np.ix_(rows, cols)] > 0).astype(np.float32)

    def attribute_labels(self, index: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """float32 [B, len(names)] 0/1: the labels in ``list_attr_celeba.txt`` of the images at rows ``index``, for
        any of its attributes (not only the parents): what the preservation judges compare an edit with."""
        for name in names:
            _check_attribute_name(name)
        rows = torch.as_tensor(index).detach().cpu().to(torch.int64).reshape(-1).numpy()
        return torch.from_numpy(self._labels(rows, names))

    def label_frequencies(self, split: str) -> dict[str, float]:
        """P(attribute = 1) in ``split`` for every selected attribute (nan for an empty split)."""
        labels = self._labels(self.split_rows(split), self._names)
        return {n: float(labels[:, j].mean()) if len(labels) else float("nan") for j, n in enumerate(self._names)}

    # -- Lightning hooks -----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.builder is not None:
            self.builder.build(self.root)
        self.check_files()

    def _build_split(self, split: str) -> CelebADataset:
        filenames = self._load_metadata()[0]
        rows = self.split_rows(split)
        image_dir = self.data_dir / IMAGE_DIR
        files = [filenames[r] for r in rows]
        on_disk = set(os.listdir(image_dir))
        missing = [f for f in files if f not in on_disk]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) of the {split} split listed in {ATTR_FILE} are missing "
                               f"from {image_dir}, e.g. {image_dir / missing[0]}. Re-download and unzip "
                               f"img_align_celeba.zip, or regenerate the synthetic data. {HOW_TO_GET_CELEBA}")
        dataset = CelebADataset(image_dir, files, rows, self._labels(rows, self._names), self._names,
                                self.image_size, self.crop_size)
        if len(dataset) and self.crop_size is not None:
            # A config error (crop bigger than the images) should fail here, not in the first batch.
            with _image_errors(image_dir / files[0]), Image.open(image_dir / files[0]) as img:
                w, h = img.size
            if self.crop_size > min(w, h):
                raise ValueError(f"crop_size={self.crop_size} is larger than the {w}x{h} images in {image_dir}; "
                                 f"set crop_size=null (or smaller) for this data")
        self.cache_decoded(dataset, split, (self.image_size, self.image_size, 3),
                          "CelebA" if self.builder is None else "synthetic faces")
        return dataset

    def train_sampler_weights(self) -> torch.Tensor | None:
        if self.balance_attribute is None:
            return None
        labels = self._labels(self.dataset("train").rows, [self.balance_attribute])[:, 0]
        counts = np.array([(labels == 0).sum(), (labels == 1).sum()])
        if (counts == 0).any():
            raise DatasetError(f"cannot balance {self.balance_attribute!r}: the train split has no images with "
                               f"value {int(np.argmin(counts))}")
        return torch.as_tensor(1.0 / counts[labels.astype(np.int64)], dtype=torch.float64)

    # -- ground truth --------------------------------------------------------------------------------

    def true_counterfactual(self, index: torch.Tensor, do: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The builder's re-rendering of rows ``index`` under ``do``, preprocessed exactly like the batches.

        ``do`` maps attribute names to 0/1 values ([B] or scalar); returns float [B, 3, H, W] in [0, 1] on CPU.
        """
        if self.builder is None:
            return super().true_counterfactual(index, do)
        indices = torch.as_tensor(index).detach().cpu().to(torch.int64).reshape(-1).numpy()
        interventions: dict[str, np.ndarray] = {}
        for name, value in do.items():
            _check_attribute_name(name)
            v = np.broadcast_to(torch.as_tensor(value).detach().cpu().numpy(), indices.shape)
            if not np.isin(v, (0, 1)).all():
                raise ValueError(f"do[{name!r}] must hold 0/1 values for a binary attribute, got {np.unique(v)}")
            interventions[name] = v.astype(np.int64)
        images = np.asarray(self.builder.true_counterfactual(self.root, indices, interventions))
        out = [_to_float(preprocess(Image.fromarray(img), self.image_size, self.crop_size)) for img in images]
        return torch.stack(out) if out else torch.empty((0, *self.image_shape))
