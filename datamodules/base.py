"""The data contract shared by every dataset, model and metric, and the base every DataModule builds on.

Batch: a dict with
  ``x``     float image tensor [B, C, H, W] in **[0, 1]** (the one range used project-wide; models that
            want [-1, 1] convert inside their networks),
  ``pa``    dict attribute name -> float tensor [B] (binary: 0./1.; continuous: normalised to [-1, 1] by the
            attribute's ``low``/``high``; categorical: class index as float) in the order of
            ``CounterfactualDataModule.attributes``,
  ``index`` long tensor [B], the row of the image in the dataset's own files (global, unique across splits),
            used to look up ground-truth counterfactuals.

Attribute metadata (names, kinds, normalisation, bins) lives on the DataModule and reaches models and
callbacks by config interpolation, never re-derived.

``CounterfactualDataModule`` owns what every dataset shares: the seeded loaders (``EpochSampler`` order that
depends on (seed, epoch) only, a private generator for worker seeds), the ``prepare_data``/``setup`` split
(a builder writes files in ``prepare_data``; ``setup`` reads them), and split look-up. Small datasets keep
their decoded images in an ``ArrayDataset``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import random
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

AttributeKind = Literal["binary", "continuous", "categorical"]
SPLIT_NAMES = ("train", "val", "test")
#: how a file-backed DataModule splits its images, and when it keeps them decoded in memory
SPLIT_MODES = ("official", "random")
CACHE_MODES = ("auto", "always", "never")
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


#: bins of a continuous attribute without its own, wherever a metric needs its values discrete (CLD's sets,
#: "the same parents" of the reference counterfactuals): the benchmark's 10 equal-width bins (footnote 11)
DEFAULT_CONTINUOUS_BINS = 10


class DatasetError(RuntimeError):
    """A dataset file is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class Attribute:
    """One parent ``pa``: its name, kind and, for continuous attributes, how raw values are normalised.

    :param low, high: raw values mapped to -1 and +1 (min-max normalisation, as the published MorphoMNIST
        benchmarks do with the training extremes); required for continuous attributes.
    :param bins: raw-unit bin edges (increasing) used by metrics that need discrete values of a continuous
        parent (interventions "to another bin", CLD's sets); ``None`` for binary and categorical attributes.
    :param unit: the raw values' unit, for tables and plots.
    """

    name: str
    kind: AttributeKind = "binary"
    num_classes: int | None = None
    low: float | None = None
    high: float | None = None
    bins: tuple[float, ...] | None = None
    unit: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "continuous", "categorical"):
            raise ValueError(f"attribute {self.name!r}: kind must be binary, continuous or categorical, "
                             f"got {self.kind!r}")
        if self.kind == "continuous":
            if self.low is None or self.high is None or not self.high > self.low:
                raise ValueError(f"continuous attribute {self.name!r} needs low < high for its normalisation, "
                                 f"got low={self.low}, high={self.high}")
        if self.kind == "categorical" and (self.num_classes is None or self.num_classes < 2):
            raise ValueError(f"categorical attribute {self.name!r} needs num_classes >= 2, got {self.num_classes}")
        if self.bins is not None:
            if len(self.bins) < 2 or any(not lo < hi for lo, hi in zip(self.bins[:-1], self.bins[1:], strict=False)):
                raise ValueError(f"attribute {self.name!r}: bins must be at least two increasing edges, "
                                 f"got {self.bins}")
            object.__setattr__(self, "bins", tuple(float(b) for b in self.bins))

    @property
    def dim(self) -> int:
        """Width of the attribute in a model's conditioning vector (one-hot for categorical)."""
        return int(self.num_classes) if self.kind == "categorical" else 1

    def flip(self, value: torch.Tensor) -> torch.Tensor:
        """The single-parent intervention of a binary attribute: 0 <-> 1."""
        if self.kind != "binary":
            raise ValueError(f"flip() is defined for binary attributes; {self.name!r} is {self.kind}")
        return 1.0 - value

    def normalise(self, raw: Any) -> torch.Tensor:
        """Raw values -> the values batches carry (continuous: [low, high] -> [-1, 1]; others unchanged)."""
        raw = torch.as_tensor(raw, dtype=torch.float32)
        if self.kind != "continuous":
            return raw
        return 2.0 * (raw - self.low) / (self.high - self.low) - 1.0

    def denormalise(self, value: Any) -> torch.Tensor:
        """The inverse of ``normalise``: batch values -> raw units."""
        value = torch.as_tensor(value, dtype=torch.float32)
        if self.kind != "continuous":
            return value
        return (value + 1.0) * 0.5 * (self.high - self.low) + self.low

    def bin_index(self, raw: Any) -> torch.Tensor:
        """Bin of each raw value (long; values outside the edges fall into the first or last bin)."""
        if self.bins is None:
            raise ValueError(f"attribute {self.name!r} has no bins")
        edges = torch.tensor(self.bins[1:-1], dtype=torch.float32)
        return torch.bucketize(torch.as_tensor(raw, dtype=torch.float32), edges, right=True)

    def codes(self, values: Any) -> torch.Tensor:
        """Discrete codes [B] (long, on the values' device) of values in batch units: the label or class of a
        binary or categorical attribute, the bin of the raw value of a continuous one (``bins``, else
        ``DEFAULT_CONTINUOUS_BINS`` equal-width bins over [low, high]). What "the same parent value" means for
        metrics and references that compare parents."""
        values = torch.as_tensor(values).reshape(-1)
        if self.kind != "continuous":
            return values.round().long()
        raw = self.denormalise(values.detach().cpu())
        if self.bins is not None:
            codes = self.bin_index(raw)
        else:
            edges = torch.tensor(equal_width_bins(self.low, self.high, DEFAULT_CONTINUOUS_BINS)[1:-1])
            codes = torch.bucketize(raw, edges.to(raw.dtype), right=True)
        return codes.to(values.device)


def parent_attribute(name: str, spec: Mapping[str, Any]) -> Attribute:
    """The ``Attribute`` of one entry of a config's ``parents`` spec (``{kind, num_classes, low, high}``); a
    continuous parent without ``low``/``high`` is taken as already normalised (low=-1, high=1), so that
    denormalising is the identity."""
    kind = str(spec.get("kind", "binary"))
    if kind == "continuous":
        low, high = spec.get("low"), spec.get("high")
        return Attribute(
            name, kind, low=-1.0 if low is None else float(low), high=1.0 if high is None else float(high)
        )
    if kind == "categorical":
        return Attribute(name, kind, num_classes=spec.get("num_classes"))
    return Attribute(name, kind)


def parents_from_spec(spec: Mapping[str, Mapping[str, Any]] | Sequence[str]) -> list[Attribute]:
    """A model config's ``parents``: a mapping name -> spec (as the data configs' ``_parents``), or a list of
    names, all binary (CelebA's attributes)."""
    if isinstance(spec, Mapping):
        return [parent_attribute(str(n), s or {}) for n, s in spec.items()]
    return [Attribute(str(n), "binary") for n in spec]


def condition_vector(pa: Mapping[str, torch.Tensor], attributes: Sequence[Attribute]) -> torch.Tensor:
    """Parents in batch units -> a model's conditioning vector [B, Σ dim] in ``attributes`` order (categorical
    one-hot, the others as their value)."""
    missing = [a.name for a in attributes if a.name not in pa]
    if missing:
        raise KeyError(f"the conditioning vector needs the parent(s) {missing}; pa has {sorted(pa)}")
    cols = []
    for a in attributes:
        v = torch.as_tensor(pa[a.name]).reshape(-1)
        if a.kind == "categorical":
            cols.append(torch.nn.functional.one_hot(v.long(), int(a.num_classes)).to(torch.float32))
        else:
            cols.append(v.to(torch.float32)[:, None])
    return torch.cat(cols, dim=1)


def equal_width_bins(low: float, high: float, n: int) -> tuple[float, ...]:
    """``n`` equal-width bins over [low, high] as ``n + 1`` edges."""
    if n < 1 or not high > low:
        raise ValueError(f"need n >= 1 and high > low, got n={n}, low={low}, high={high}")
    return tuple(float(v) for v in np.linspace(low, high, n + 1))


def check_name(name: str, valid: Sequence[str], what: str) -> None:
    """Raise a ``ValueError`` for a ``name`` not in ``valid``, suggesting the closest valid one."""
    if name not in valid:
        close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.0)
        raise ValueError(f"unknown {what} {name!r}; did you mean {close[0]!r}? Valid names: {', '.join(valid)}")


def check_choice(value: Any, choices: Sequence[Any], what: str) -> None:
    """Raise a ``ValueError`` for an option ``value`` not among ``choices``."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")


def distinct_names(attributes: Sequence[Any], check: Callable[[str], None]) -> list[str]:
    """A DataModule's ``attributes`` as strings, each passed through ``check`` (which raises for an unknown
    name), with duplicates refused: a parent listed twice would get two columns of one conditioning vector."""
    names = [str(a) for a in attributes]
    for name in names:
        check(name)
    if len(set(names)) != len(names):
        raise ValueError(f"attributes contains duplicates: {names}")
    return names


def check_limit_per_split(limit_per_split: int | None) -> None:
    if limit_per_split is not None and limit_per_split < 1:
        raise ValueError(f"limit_per_split must be positive or None, got {limit_per_split}")


@dataclass(frozen=True)
class FileLoadingOptions:
    """The options every DataModule that reads an image-file dataset (CelebA, CheXpert) takes besides its own,
    with their defaults, declared once. Such a class takes them as ``**options``, completes them with
    :func:`file_loading_options` and lists them in its signature with :func:`with_file_loading_options`, so the
    config checks see one parameter list with these types and defaults.

    :param num_workers, pin_memory: of the DataLoaders.
    :param split_fractions: (train, val, test) fractions of a random split.
    :param seed: seed of the random split only (the sampling order follows the global RNG).
    :param balance_attribute: a binary attribute whose two classes the train loader draws equally often.
    :param cache: ``"auto"`` (cache a split if it fits in ``cache_max_bytes``), ``"always"`` or ``"never"``.
    :param builder: a synthetic builder (``build(root)``, ``true_counterfactual(root, indices, do)``); it writes
        the files in ``prepare_data`` and provides ground-truth counterfactuals.
    :param limit_per_split: keep only the first N rows (in file order) of each split.
    :param drop_last_train: drop the last incomplete train batch, unless that would leave no batch at all.
    """

    num_workers: int = 0
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1)
    seed: int = 0
    balance_attribute: str | None = None
    cache: str = "auto"
    cache_max_bytes: int = 4 * 1024**3
    builder: Any | None = None
    limit_per_split: int | None = None
    pin_memory: bool = False
    drop_last_train: bool = True


def file_loading_options(owner: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` completed with :class:`FileLoadingOptions`' defaults; a key that is none of them is named."""
    defaults = {f.name: f.default for f in dataclasses.fields(FileLoadingOptions)}
    unknown = [k for k in options if k not in defaults]
    if unknown:
        raise TypeError(f"{owner} got unexpected keyword arguments {unknown}; its loading options are "
                        f"{list(defaults)}")
    return {**defaults, **options}


def with_file_loading_options(cls: type) -> type:
    """Class decorator: ``cls``'s signature is its constructor's own parameters, then :class:`FileLoadingOptions`
    keyword-only with their types and defaults (the constructor takes them as ``**options``). Set on the class,
    not on ``__init__``: Lightning's ``save_hyperparameters`` reads ``__init__``'s real parameters."""
    own = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(FileLoadingOptions)
    params = [p for name, p in own.parameters.items() if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
               for f in dataclasses.fields(FileLoadingOptions)]
    cls.__signature__ = own.replace(parameters=params)
    return cls


def split_train_val(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted (train, val) row arrays with ``n_val`` validation rows."""
    if not 0 <= n_val <= n:
        raise ValueError(f"n_val must be between 0 and {n}, got {n_val}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def require_columns(path: Path | str, columns: Sequence[str], needed: Sequence[str], fix: str) -> None:
    """Raise a ``DatasetError`` naming the file, the missing columns and the fix."""
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DatasetError(f"{path} lacks the column(s) {missing} (it has {list(columns)}). {fix}")


def require_same_length(counts: Mapping[str, int], fix: str) -> None:
    """Raise a ``DatasetError`` when files that describe the same images disagree on their number."""
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise DatasetError(f"these files should describe the same images but their counts differ ({listed}). {fix}")


class ArrayDataset(Dataset):
    """A split held in memory: uint8 images [N, C, H, W], raw parents, and the rows in the dataset's files.

    Items follow the batch contract; parents are normalised on the way out by their ``Attribute``. One uint8
    tensor rather than many arrays, so forked DataLoader workers share its pages copy-on-write.
    """

    def __init__(self, images: Any, parents: Mapping[str, Any], rows: Any,
                 attributes: Sequence[Attribute]) -> None:
        self.images = torch.as_tensor(images)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        self.rows = torch.as_tensor(np.asarray(rows), dtype=torch.int64)
        self.attributes = tuple(attributes)
        missing = [a.name for a in self.attributes if a.name not in parents]
        if missing:
            raise ValueError(f"no values for parent(s) {missing}")
        self.raw = {a.name: torch.as_tensor(np.asarray(parents[a.name]), dtype=torch.float32)
                    for a in self.attributes}
        self.pa = {a.name: a.normalise(self.raw[a.name]) for a in self.attributes}
        for name, values in (("rows", self.rows), *self.raw.items()):
            if len(values) != len(self.images):
                raise ValueError(f"{name} has {len(values)} entries for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.images[i].to(torch.float32).div_(255.0),
                "pa": {n: v[i] for n, v in self.pa.items()},
                "index": self.rows[i]}


class DecodedImages(Dataset):
    """The uint8 images of a dataset with a ``load_uint8(i)`` method, for filling its in-memory cache with
    DataLoader workers (decoding JPEGs in parallel)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.dataset.load_uint8(i))


class CounterfactualDataModule(pl.LightningDataModule):
    """Base of every DataModule: attribute metadata, seeded loaders, and the optional ground-truth oracle.

    Subclasses set ``attributes`` and ``image_shape`` and implement ``_build_split(split) -> Dataset``; the
    base calls it in ``setup`` (once per split) and builds the loaders. A builder, when given, writes the
    dataset's files in ``prepare_data`` (``builder.build(root)``) so that ``setup`` reads real and synthetic
    data through the same code.
    """

    attributes: tuple[Attribute, ...] = ()

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, pin_memory: bool = False,
                 drop_last_train: bool = True) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.drop_last_train = bool(drop_last_train)
        self._datasets: dict[str, Dataset] = {}
        self._checking = False  # check_split: build a split without caching it
        self._cached_bytes = 0  # of cache_decoded's budget, over all splits

    def _set_split_and_cache(self, split: str, split_fractions: Sequence[float], cache: str, cache_max_bytes: int,
                             limit_per_split: int | None) -> None:
        """Check and keep the options of a DataModule that reads image files: the split mode (``official`` or
        ``random``), the (train, val, test) fractions of a random split, the cache mode of ``cache_decoded``
        with its byte budget, and ``limit_per_split``."""
        check_choice(split, SPLIT_MODES, "split")
        fractions = tuple(float(f) for f in split_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be three non-negative numbers (train, val, test) summing "
                             f"to 1, got {list(split_fractions)}")
        check_choice(cache, CACHE_MODES, "cache")
        check_limit_per_split(limit_per_split)
        self.split = split
        self.split_fractions = fractions
        self.cache = cache
        self.cache_max_bytes = int(cache_max_bytes)
        self.limit_per_split = limit_per_split

    @property
    def attribute_names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def attribute(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(f"no attribute {name!r}; this dataset's attributes are {self.attribute_names}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def has_true_counterfactuals(self) -> bool:
        """True when the data came from a builder that can re-render any image under an intervention."""
        return False

    def true_counterfactual(self, index: torch.Tensor, do: dict[str, torch.Tensor]) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1]: the images at ``index`` re-rendered with the attributes in ``do``
        set to the given values and every other generative factor unchanged, after the same preprocessing
        as the batches."""
        raise NotImplementedError(f"{type(self).__name__} has no ground-truth counterfactuals")

    # -- splits ----------------------------------------------------------------------------------------

    def _build_split(self, split: str) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        for split in _STAGE_SPLITS.get(stage or "", SPLIT_NAMES):
            if split not in self._datasets:
                self._datasets[split] = self._build_split(split)

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (``train``, ``val`` or ``test``), set up on first use."""
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        if split not in self._datasets:
            self._datasets[split] = self._build_split(split)
        return self._datasets[split]

    def check_split(self, split: str) -> None:
        """Read ``split`` once, decoding every image, and drop it: a missing, truncated or corrupt file then fails
        now rather than when the split is first used (the test split: after training). Nothing is kept or
        cached, and no random number generator moves (DataLoader workers draw their seeds from torch's), so a
        run that checks first trains exactly as one that does not."""
        if split in self._datasets:
            return
        with _rngs_untouched():
            self._checking = True
            try:
                dataset = self._build_split(split)
            finally:
                self._checking = False
            if hasattr(dataset, "load_uint8") and getattr(dataset, "cache", None) is None:
                for _ in DataLoader(DecodedImages(dataset), batch_size=256, num_workers=self.num_workers):
                    pass

    # -- loaders ---------------------------------------------------------------------------------------

    # -- in-memory cache of decoded images ---------------------------------------------------------------

    def cache_decoded(self, dataset: Any, split: str, item_shape: Sequence[int], label: str) -> bool:
        """Decode ``dataset``'s images once (``dataset.load_uint8(i)``, in parallel over ``num_workers``) into
        ``dataset.cache``, a uint8 tensor [N, *item_shape], if the mode allows it: ``self.cache`` is
        ``"always"``, or ``"auto"`` and the split fits in what is left of ``self.cache_max_bytes`` (a budget
        shared by all splits). Returns whether it cached."""
        nbytes = len(dataset) * int(np.prod(item_shape))
        used = self._cached_bytes
        if self._checking or not (self.cache == "always" or (self.cache == "auto" and used + nbytes <= self.cache_max_bytes)):
            return False
        cache = torch.empty((len(dataset), *item_shape), dtype=torch.uint8)
        loader = DataLoader(DecodedImages(dataset), batch_size=256, num_workers=self.num_workers)
        pos = 0
        # Below this many images the cache fills in well under a second; a progress bar would only be noise.
        for batch in tqdm(loader, desc=f"Caching {label} {split} images", unit="batch", disable=len(dataset) < 2000):
            cache[pos:pos + len(batch)] = batch.reshape(len(batch), *item_shape)
            pos += len(batch)
        dataset.cache = cache
        self._cached_bytes = used + nbytes
        return True

    def train_sampler_weights(self) -> torch.Tensor | None:
        """Per-example draw weights for the train loader (``None``: a plain seeded shuffle)."""
        return None

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        # A private generator for the loader's per-iterator worker seed: otherwise each new iterator draws from
        # the global RNG, at a point that differs between an uninterrupted and a resumed run.
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        # Dropping the only (incomplete) batch of a tiny split would leave an epoch with nothing to train on.
        drop_last = self.drop_last_train and len(dataset) >= self.batch_size
        # Each epoch's order depends on (seed, epoch) only, so resumed runs see the same batches.
        sampler = EpochSampler(len(dataset), self.seed, weights=self.train_sampler_weights())
        return self._loader(dataset, sampler=sampler, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)


@contextlib.contextmanager
def _rngs_untouched() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU) global generators on exit."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles (or draws with replacement by ``weights``) with a generator seeded by ``seed + epoch``.

    The order of every epoch is then a function of the seed and the epoch number alone, as with
    ``DistributedSampler``: it does not depend on how much of the global RNG something else consumed, so a run
    resumed from a checkpoint sees exactly the batches the uninterrupted run would have. Lightning calls
    ``set_epoch`` at the start of every epoch.
    """

    def __init__(self, n: int, seed: int = 0, weights: torch.Tensor | None = None):
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            return iter(torch.randperm(self.n, generator=g).tolist())
        return iter(torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist())
