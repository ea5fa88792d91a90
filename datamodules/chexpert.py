"""CheXpert (the CheXpert-v1.0-small release) and the chest phantom written in its layout, as a DataModule.

The files, labels, uncertainty policies and tasks are described in ``datamodules.chexpert_format``, which
reads them.

Parents ``pa`` (``attributes``, in order): any of the 14 observation names (binary), ``Sex`` (binary:
0 = Male, 1 = Female; rows with another value, e.g. ``Unknown``, are dropped when Sex is a parent) and ``Age``
(continuous, min-max normalised by ``age_range`` to [-1, 1]; rows without an age are dropped when Age is a
parent).

Splits are by patient (the ``patientNNNNN`` folder in ``Path``), so no patient has images in two splits:
``split="random"`` shuffles the patients of train.csv with ``seed`` and cuts them by ``split_fractions``
(train, val, test; the paper trains on 80%); ``split="official"`` makes valid.csv (radiologist-labelled) the
test split and cuts train.csv's patients into train and val in the ratio of the first two fractions. The cut
is over every patient of the CSV, before any row filter, so one seed gives the same test patients whatever the
task, finding or uncertainty policy.

``index`` (the batch contract's row number): row ``i`` of train.csv is ``i``; row ``j`` of valid.csv is
``len(train.csv) + j``.

Images: decoded as 8-bit grayscale, centre-cropped to the largest square (``center_crop``; CheXpert-small
images are 320 px on their short side with varying aspect), resized to ``image_size`` with PIL's antialiased
bicubic filter (its support grows with the downscale factor), one channel. ``cache="auto"`` keeps each split's
decoded images in memory while they fit in ``cache_max_bytes`` (shared by the splits; 128 px costs 16 KiB an
image, so 4 GiB holds every frontal image of CheXpert-small).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
    check_choice,
    check_name,
    distinct_names,
    equal_width_bins,
    file_loading_options,
    with_file_loading_options,
)
from datamodules.chexpert_format import (
    DEMOGRAPHICS,
    HOW_TO_GET_CHEXPERT,
    OBSERVATIONS,
    PARENT_NAMES,
    SEX_CODES,
    SPLITS,
    TASKS,
    TRAIN_CSV,
    UNCERTAINTY_POLICIES,
    VALID_CSV,
    image_resolver,
    patient_ids,
    patient_split,
    read_chexpert_csv,
    select_task,
)

# ----------------------------------------------------------------------------------------------- images


def preprocess(img: Image.Image, image_size: int, center_crop: bool = True) -> np.ndarray:
    """Grayscale, centre square crop (optional), antialiased bicubic resize -> uint8 [image_size, image_size]."""
    img = img.convert("L")
    if center_crop:
        w, h = img.size
        side = min(w, h)
        # torchvision's CenterCrop rounding
        top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
        img = img.crop((left, top, left + side, top + side))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.array(img, dtype=np.uint8)


@contextmanager
def _image_errors(path: Path, csv_name: str) -> Iterator[None]:
    """A missing or undecodable JPEG becomes a ``DatasetError`` naming it (also inside DataLoader workers)."""
    try:
        yield
    except FileNotFoundError:
        raise DatasetError(f"image {path} is listed in {csv_name} but missing. Re-download and unzip "
                           f"CheXpert-v1.0-small.zip, or regenerate the phantom. {HOW_TO_GET_CHEXPERT}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot decode image {path} ({type(err).__name__}: {err}); the file is corrupt or "
                           f"truncated. Re-download CheXpert-v1.0-small.zip, or regenerate the phantom.") from None


class CheXpertDataset(Dataset):
    """One split: items follow the batch contract (``datamodules.base``), x is [1, H, W] in [0, 1]."""

    def __init__(self, files: Sequence[Path], csv_names: Sequence[str], rows: np.ndarray,
                 parents: Mapping[str, np.ndarray], attributes: Sequence[Attribute], image_size: int,
                 center_crop: bool) -> None:
        self.files = list(files)
        self.csv_names = list(csv_names)
        self.rows = np.asarray(rows, np.int64)
        self.attributes = tuple(attributes)
        self.raw = {a.name: np.asarray(parents[a.name], np.float32) for a in self.attributes}
        self.pa = {a.name: a.normalise(self.raw[a.name]) for a in self.attributes}
        self.image_size = int(image_size)
        self.center_crop = bool(center_crop)
        self.cache: torch.Tensor | None = None  # uint8 [n, 1, H, W] once filled (shared copy-on-write)

    def __len__(self) -> int:
        return len(self.files)

    def load_uint8(self, i: int) -> np.ndarray:
        path = self.files[i]
        with _image_errors(path, self.csv_names[i]), Image.open(path) as img:
            return preprocess(img, self.image_size, self.center_crop)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = self.cache[i] if self.cache is not None else torch.from_numpy(self.load_uint8(i))[None]
        return {"x": img.to(torch.float32).div_(255.0),
                "pa": {n: v[i] for n, v in self.pa.items()},
                "index": torch.tensor(self.rows[i], dtype=torch.int64)}


def _check_parent_name(name: str) -> None:
    check_name(name, PARENT_NAMES, "CheXpert parent")


@dataclass
class _Metadata:
    files: list[Path]  # resolved image path of every row (train.csv rows, then valid.csv rows)
    csv_names: list[str]
    parents: dict[str, np.ndarray]  # raw parent values of every row (nan where a dropped row has none)
    keep: np.ndarray
    split: np.ndarray  # 0 train, 1 val, 2 test, per row


@with_file_loading_options
class CheXpertDataModule(CounterfactualDataModule):
    """CheXpert-v1.0-small (or a builder's phantom in its layout) as 1-channel images with chosen parents.

    :param root: the ``CheXpert-v1.0-small`` folder (holding train.csv and valid.csv).
    :param attributes: the parents, in order: observation names (e.g. ``Cardiomegaly``), ``Sex``, ``Age``.
    :param task: ``pathology_vs_no_finding`` (CVQVAE's task) or ``all`` (every row of the chosen views).
    :param uncertainty: ``zeros``, ``ones`` or ``ignore`` for -1 cells; blank cells are always 0.
    :param frontal_only: keep frontal views only (``Frontal/Lateral == Frontal``).
    :param age_range: raw ages mapped to -1 and +1 (CheXpert's ages run from 0 to 90).
    :param image_size: output side; :param center_crop: crop the largest centre square before resizing.
    :param split: ``random`` (train.csv's patients cut by ``split_fractions``) or ``official`` (valid.csv is the
        test split); both patient-level and seeded by ``seed``.
    :param balance_attribute: a binary parent whose two classes the train loader draws equally often.
    :param cache: ``auto`` (cache splits while they fit in ``cache_max_bytes``), ``always`` or ``never``.
    :param builder: a synthetic builder (``build(root)``, ``true_counterfactual(root, indices, do)``), e.g.
        ``datamodules.synthetic.chest_phantom.ChestPhantomBuilder``; it writes the files in ``prepare_data``.
    :param limit_per_split: keep only the first N rows (in file order) of each split.
    """

    def __init__(
        self,
        root: str,
        attributes: Sequence[str] = ("Cardiomegaly",),
        task: str = "pathology_vs_no_finding",
        uncertainty: str = "zeros",
        frontal_only: bool = True,
        age_range: Sequence[float] = (0.0, 90.0),
        image_size: int = 128,
        center_crop: bool = True,
        batch_size: int = 32,
        split: str = "random",
        **options: Any,
    ) -> None:
        options = file_loading_options(type(self).__name__, options)  # before save_hyperparameters: it saves them
        super().__init__(batch_size, options["num_workers"], options["seed"], options["pin_memory"],
                         options["drop_last_train"])
        self.save_hyperparameters(ignore=["builder"])
        balance_attribute, builder = options["balance_attribute"], options["builder"]
        names = distinct_names(attributes, _check_parent_name)
        if not names:
            raise ValueError("attributes must name at least one parent")
        check_choice(task, TASKS, "task")
        findings = [n for n in names if n in OBSERVATIONS]
        if task == "pathology_vs_no_finding":
            if not findings:
                raise ValueError("task=pathology_vs_no_finding needs at least one finding among the attributes "
                                 "(e.g. Cardiomegaly); use task=all for demographics only")
            if "No Finding" in findings:
                raise ValueError("'No Finding' defines the negative class of task=pathology_vs_no_finding; it "
                                 "cannot also be a parent (use task=all)")
        check_choice(uncertainty, UNCERTAINTY_POLICIES, "uncertainty")
        self._set_split_and_cache(split, options["split_fractions"], options["cache"], options["cache_max_bytes"],
                                  options["limit_per_split"])
        if split == "official" and self.split_fractions[0] + self.split_fractions[1] <= 0:
            raise ValueError("split=official cuts train.csv in the ratio of the first two split_fractions; "
                             "they cannot both be 0")
        age_lo, age_hi = (float(a) for a in age_range)
        if not age_hi > age_lo:
            raise ValueError(f"age_range must be [low, high] with low < high, got {list(age_range)}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if balance_attribute is not None:
            _check_parent_name(balance_attribute)
            if balance_attribute not in names or balance_attribute == "Age":
                raise ValueError(f"balance_attribute must be one of the binary attributes "
                                 f"{[n for n in names if n != 'Age']}, got {balance_attribute!r}")

        self.root = Path(root).expanduser()
        self._names = tuple(names)
        self.findings = tuple(findings)
        self.task = task
        self.uncertainty = uncertainty
        self.frontal_only = bool(frontal_only)
        self.age_range = (age_lo, age_hi)
        self.image_size = int(image_size)
        self.center_crop = bool(center_crop)
        self.balance_attribute = balance_attribute
        self.builder = builder
        self._metadata: _Metadata | None = None
        if builder is None:
            self.check_files()

    # -- metadata ------------------------------------------------------------------------------------

    @property
    def attributes(self) -> tuple[Attribute, ...]:
        out = []
        for n in self._names:
            if n == "Age":
                lo, hi = self.age_range
                out.append(Attribute("Age", "continuous", low=lo, high=hi, bins=equal_width_bins(lo, hi, 4),
                                     unit="years"))
            else:
                out.append(Attribute(n, "binary"))
        return tuple(out)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    @property
    def has_true_counterfactuals(self) -> bool:
        return self.builder is not None

    def _csv_files(self) -> list[str]:
        return [TRAIN_CSV, VALID_CSV] if self.split == "official" else [TRAIN_CSV]

    def check_files(self) -> None:
        """Raise one ``DatasetError`` naming the missing root or CSVs, with how to get CheXpert."""
        hint = " Call prepare_data() first: the builder writes them." if self.builder is not None else ""
        if not self.root.is_dir():
            raise DatasetError(f"CheXpert root folder not found: {self.root}.{hint} {HOW_TO_GET_CHEXPERT}")
        missing = [str(self.root / n) for n in self._csv_files() if not (self.root / n).is_file()]
        if missing:
            raise DatasetError(f"CheXpert files missing: {', '.join(missing)}.{hint} {HOW_TO_GET_CHEXPERT}")

    def _needed_columns(self) -> list[str]:
        cols = list(self.findings)
        if self.task == "pathology_vs_no_finding":
            cols.append("No Finding")
        cols += [n for n in DEMOGRAPHICS if n in self._names]
        if self.frontal_only:
            cols.append("Frontal/Lateral")
        return cols

    def _load_metadata(self) -> _Metadata:
        if self._metadata is not None:
            return self._metadata
        self.check_files()
        cols = self._needed_columns()
        tables = [read_chexpert_csv(self.root / name, cols) for name in self._csv_files()]
        files: list[Path] = []
        csv_names: list[str] = []
        keeps, splits = [], []
        parents: dict[str, list[np.ndarray]] = {n: [] for n in self._names}
        for t_idx, table in enumerate(tables):
            if len(table):
                resolve = image_resolver(self.root, table)
                files += [resolve(p) for p in table.paths]
            csv_names += [table.path.name] * len(table)
            keep, labels = select_task(table, self.findings, self.task, self.uncertainty)
            if self.frontal_only:
                keep &= table.view == "Frontal"
            for n in self._names:
                if n == "Sex":
                    sex = np.array([SEX_CODES.get(s, np.nan) for s in table.sex], np.float32)
                    keep &= ~np.isnan(sex)
                    parents[n].append(sex)
                elif n == "Age":
                    keep &= ~np.isnan(table.age)
                    parents[n].append(table.age)
                else:
                    parents[n].append(labels[n])
            keeps.append(keep)
            if t_idx == 1:
                splits.append(np.full(len(table), SPLITS["test"]))
        # The cut is over all patients of train.csv, before any filter (see the module docstring).
        train_patients = patient_ids(tables[0])
        fr = self.split_fractions
        if self.split == "official":
            ratio = fr[0] / (fr[0] + fr[1])
            split0 = patient_split(train_patients, (ratio, 1.0 - ratio, 0.0), self.seed)
            shared = np.intersect1d(train_patients, patient_ids(tables[1]))
            if len(shared):
                raise DatasetError(f"{tables[1].path} and {tables[0].path} share {len(shared)} patient(s) "
                                   f"(e.g. patient{shared[0]:05d}); the official split would put a patient in "
                                   f"two splits. Use split=random, or fix the CSVs.")
        else:
            split0 = patient_split(train_patients, fr, self.seed)
        splits.insert(0, split0)
        self._metadata = _Metadata(
            files=files, csv_names=csv_names,
            parents={n: np.concatenate(v) if v else np.zeros(0, np.float32) for n, v in parents.items()},
            keep=np.concatenate(keeps) if keeps else np.zeros(0, bool),
            split=np.concatenate(splits))
        return self._metadata

    def split_rows(self, split: str) -> np.ndarray:
        """Global rows (``index`` values) of ``split`` after the view, task and uncertainty filters."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        meta = self._load_metadata()
        rows = np.flatnonzero(meta.keep & (meta.split == SPLITS[split]))
        return rows[: self.limit_per_split] if self.limit_per_split is not None else rows

    def parent_values(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Raw (unnormalised) parent values of global ``rows``: findings and Sex 0/1, Age in years."""
        meta = self._load_metadata()
        return {n: meta.parents[n][rows] for n in self._names}

    def label_frequencies(self, split: str) -> dict[str, float]:
        """P(parent = 1) in ``split`` for each binary parent (nan for an empty split)."""
        values = self.parent_values(self.split_rows(split))
        return {n: float(v.mean()) if len(v) else float("nan") for n, v in values.items() if n != "Age"}

    # -- Lightning hooks -----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.builder is not None:
            self.builder.build(self.root)
        self.check_files()

    def _build_split(self, split: str) -> CheXpertDataset:
        meta = self._load_metadata()
        rows = self.split_rows(split)
        files = [meta.files[r] for r in rows]
        missing = [(f, meta.csv_names[r]) for f, r in zip(files, rows, strict=True) if not os.path.isfile(f)]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) of the {split} split listed in {missing[0][1]} are "
                               f"missing, e.g. {missing[0][0]}. Re-download and unzip CheXpert-v1.0-small.zip, "
                               f"or regenerate the phantom. {HOW_TO_GET_CHEXPERT}")
        dataset = CheXpertDataset(files, [meta.csv_names[r] for r in rows], rows, self.parent_values(rows),
                                  self.attributes, self.image_size, self.center_crop)
        self.cache_decoded(dataset, split, (1, self.image_size, self.image_size), "CheXpert")
        return dataset

    def train_sampler_weights(self) -> torch.Tensor | None:
        if self.balance_attribute is None:
            return None
        labels = self.dataset("train").raw[self.balance_attribute].astype(np.int64)
        counts = np.bincount(labels, minlength=2)
        if (counts == 0).any():
            raise DatasetError(f"cannot balance {self.balance_attribute!r}: the train split has no images with "
                               f"value {int(np.argmin(counts))}")
        return torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)

    # -- ground truth --------------------------------------------------------------------------------

    def true_counterfactual(self, index: torch.Tensor, do: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The builder's re-rendering of rows ``index`` under ``do``, preprocessed exactly like the batches.

        ``do`` maps parent names to values in batch units ([B] or scalar): 0/1 for binary parents, normalised
        [-1, 1] for Age (converted back to years for the builder). Returns float [B, 1, H, W] in [0, 1] on CPU.
        """
        if self.builder is None:
            return super().true_counterfactual(index, do)
        indices = torch.as_tensor(index).detach().cpu().to(torch.int64).reshape(-1).numpy()
        raw: dict[str, np.ndarray] = {}
        for name, value in do.items():
            attribute = self.attribute(name)
            v = torch.as_tensor(value).detach().cpu().to(torch.float32)
            v = np.broadcast_to(attribute.denormalise(v).numpy(), indices.shape)
            if attribute.kind == "binary" and not np.isin(v, (0, 1)).all():
                raise ValueError(f"do[{name!r}] must hold 0/1 values for a binary parent, got {np.unique(v)}")
            raw[name] = v.astype(np.float64)
        images = np.asarray(self.builder.true_counterfactual(self.root, indices, raw))
        out = [torch.from_numpy(preprocess(Image.fromarray(img), self.image_size, self.center_crop))[None]
               for img in images]
        return torch.stack(out).to(torch.float32).div_(255.0) if out else torch.empty((0, *self.image_shape))
