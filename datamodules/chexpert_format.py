"""CheXpert-v1.0-small's on-disk format, read and written in one place: the CSV columns, the label and
uncertainty policies, the patient-level split and how ``Path`` values find their images.

Layout (Irvin et al., AAAI 2019, as Stanford ships ``CheXpert-v1.0-small.zip``)::

    CheXpert-v1.0-small/
      train.csv, valid.csv    Path,Sex,Age,Frontal/Lateral,AP/PA,<the 14 observations in OBSERVATIONS>
      train/patient00001/study1/view1_frontal.jpg ...
      valid/patient64541/study1/view1_frontal.jpg ...

``Path`` values start with ``CheXpert-v1.0-small/``, so they are relative to the root's parent; paths relative
to the root itself, with or without that first folder, are accepted too (checked once on the first rows).

Labels. An observation cell holds 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or nothing (the report does
not mention it). Blank is read as 0 (negative), as CheXpert's own baselines do. Uncertain cells follow
``uncertainty``, the policies of Irvin et al. §4: ``zeros`` (U-Zeros, -1 -> 0), ``ones`` (U-Ones, -1 -> 1) or
``ignore`` (U-Ignore: rows uncertain in any column the task uses are dropped).

The task of CVQVAE (Zou et al., §3.2 and Table 3): "y = 1 is associated to a pathology (cardiomegaly,
atelectasis or consolidation) and y = 0 is related to the 'no finding' label". With
``task="pathology_vs_no_finding"`` (the default) the rows kept are exactly, after the uncertainty policy:

* y = 1: a chosen finding is 1 (other pathologies may be present too, as the paper does not exclude them);
* y = 0: ``No Finding`` is 1 and every chosen finding is 0 (CheXpert's labeller sets No Finding only when no
  pathology is positive or uncertain);
* dropped: rows with neither (other pathologies only, or a chosen finding uncertain under ``zeros``), and rows
  that claim both (CheXpert never writes these; a hand-edited CSV might).

``task="all"`` keeps every row and reads the finding columns as they are. The paper states neither the view nor
the uncertainty handling; we use frontal views (``frontal_only``) and U-Zeros by default, and say so in configs.

Both the CheXpert DataModule and the chest-phantom builder go through these functions, so the phantom is
read by exactly the code that reads the real data.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from datamodules.base import DatasetError, check_choice, require_columns

OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)  # fmt: skip
CSV_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS)
DEMOGRAPHICS = ("Sex", "Age")
PARENT_NAMES: tuple[str, ...] = (*OBSERVATIONS, *DEMOGRAPHICS)
SEX_CODES = {"Male": 0.0, "Female": 1.0}
TRAIN_CSV, VALID_CSV = "train.csv", "valid.csv"
RELEASE_DIR = "CheXpert-v1.0-small"
UNCERTAINTY_POLICIES = ("zeros", "ones", "ignore")
TASKS = ("pathology_vs_no_finding", "all")
SPLITS = {"train": 0, "val": 1, "test": 2}

HOW_TO_GET_CHEXPERT = (
    "Register and download CheXpert-v1.0-small.zip from the Stanford ML Group "
    "(https://stanfordmlgroup.github.io/competitions/chexpert/), unzip it, then set "
    "CHEXPERT_ROOT=<.../CheXpert-v1.0-small> or pass data.root=<folder>. To run without CheXpert, use the "
    "embedded chest phantom instead: data=chest_phantom."
)

_PATIENT = re.compile(r"(?:^|/)patient(\d+)(?:/|$)")


# ------------------------------------------------------------------------------------------------ CSV format


def _format_label(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if float(value) not in (1.0, 0.0, -1.0):
        raise ValueError(f"observation values must be 1, 0, -1 or blank, got {value!r}")
    return f"{float(value):.1f}"


def write_chexpert_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``train.csv``/``valid.csv`` as CheXpert does: the columns of ``CSV_COLUMNS`` in that order,
    observations as ``1.0``/``0.0``/``-1.0`` or blank (``None`` or nan; a missing key is blank too)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            age = row.get("Age")
            writer.writerow([row["Path"], row.get("Sex", ""), "" if age is None else int(age),
                             row.get("Frontal/Lateral", ""), row.get("AP/PA", "") or "",
                             *(_format_label(row.get(o)) for o in OBSERVATIONS)])


@dataclass
class CheXpertTable:
    """The columns of one CheXpert CSV that a DataModule asked for.

    ``labels`` maps an observation to float32 values in {1, 0, -1} with nan for a blank cell; ``sex`` and
    ``view`` are the raw strings; ``age`` is float32 (nan when blank).
    """

    path: Path
    paths: list[str]
    labels: dict[str, np.ndarray]
    sex: np.ndarray | None = None
    age: np.ndarray | None = None
    view: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)


def read_chexpert_csv(path: str | Path, columns: Sequence[str] = CSV_COLUMNS) -> CheXpertTable:
    """Parse a CheXpert CSV, reading ``Path`` and ``columns``; malformed cells raise a ``DatasetError`` with the
    file and line number."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CheXpert label file not found: {path}. {HOW_TO_GET_CHEXPERT}")
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path} is empty; expected a header line ({', '.join(CSV_COLUMNS[:5])}, ...). "
                               f"Re-download or regenerate it.")
        header = [h.strip() for h in header]
        needed = ["Path", *dict.fromkeys(c for c in columns if c != "Path")]
        require_columns(path, header, needed, f"Is this CheXpert's train.csv/valid.csv? Re-download or "
                                              f"regenerate it. {HOW_TO_GET_CHEXPERT}")
        col = {name: header.index(name) for name in needed}
        obs = [c for c in needed if c in OBSERVATIONS]
        paths: list[str] = []
        labels: dict[str, list[float]] = {o: [] for o in obs}
        sex: list[str] = []
        age: list[float] = []
        view: list[str] = []
        for line_no, fields in enumerate(reader, start=2):
            if not fields or not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise DatasetError(f"{path}, line {line_no}: expected {len(header)} fields, found {len(fields)}; "
                                   f"the file is truncated or corrupt. Re-download or regenerate it.")
            paths.append(fields[col["Path"]].strip())
            for o in obs:
                cell = fields[col[o]].strip()
                if cell == "":
                    labels[o].append(np.nan)
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    value = 2.0  # reported below with the cell
                if value not in (1.0, 0.0, -1.0):
                    raise DatasetError(f"{path}, line {line_no}, column {o!r}: expected 1.0, 0.0, -1.0 or blank, "
                                       f"found {cell[:30]!r}.")
                labels[o].append(value)
            if "Sex" in col:
                sex.append(fields[col["Sex"]].strip())
            if "Age" in col:
                cell = fields[col["Age"]].strip()
                try:
                    age.append(float(cell) if cell else np.nan)
                except ValueError:
                    raise DatasetError(f"{path}, line {line_no}: Age must be a number, found {cell[:30]!r}."
                                       ) from None
            if "Frontal/Lateral" in col:
                view.append(fields[col["Frontal/Lateral"]].strip())
    return CheXpertTable(
        path=path, paths=paths, labels={o: np.asarray(v, np.float32) for o, v in labels.items()},
        sex=np.asarray(sex) if "Sex" in col else None,
        age=np.asarray(age, np.float32) if "Age" in col else None,
        view=np.asarray(view) if "Frontal/Lateral" in col else None)


def patient_ids(table: CheXpertTable) -> np.ndarray:
    """The patient number of every row (int64), from the ``patientNNNNN`` folder of ``Path``."""
    out = np.empty(len(table), np.int64)
    for i, p in enumerate(table.paths):
        m = _PATIENT.search(p)
        if m is None:
            raise DatasetError(f"{table.path}, line {i + 2}: Path {p!r} has no 'patientNNNNN' folder, so the "
                               f"patient-level split cannot place it. Is this CheXpert's layout?")
        out[i] = int(m.group(1))
    return out


def apply_uncertainty(values: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw cells (1, 0, -1, nan) -> (float32 labels in {0, 1}, bool "was uncertain").

    Blank is 0; -1 becomes 0 (``zeros`` and ``ignore``, whose rows the caller drops) or 1 (``ones``).
    """
    check_choice(policy, UNCERTAINTY_POLICIES, "uncertainty")
    uncertain = values == -1.0
    labels = (values == 1.0) | (uncertain & (policy == "ones"))
    return labels.astype(np.float32), uncertain


def select_task(table: CheXpertTable, findings: Sequence[str], task: str, uncertainty: str
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(bool keep mask, finding -> float32 0/1 labels) for the rows of one CSV; see the module docstring."""
    check_choice(task, TASKS, "task")
    n = len(table)
    keep = np.ones(n, bool)
    used = list(findings) + (["No Finding"] if task == "pathology_vs_no_finding" else [])
    labels: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(used):
        labels[name], uncertain = apply_uncertainty(table.labels[name], uncertainty)
        if uncertainty == "ignore":
            keep &= ~uncertain
    if task == "pathology_vs_no_finding":
        positive = np.zeros(n, bool)
        for name in findings:
            positive |= labels[name] == 1
        keep &= positive ^ (labels["No Finding"] == 1)
    return keep, {f: labels[f] for f in findings}


def patient_split(patients: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split code per row (0 train, 1 val, 2 test): the distinct patients, shuffled with ``seed``, are cut by
    ``fractions`` (of patients), so every image of a patient lands in the same split."""
    unique = np.unique(patients)
    order = np.random.default_rng(seed).permutation(len(unique))
    n_train = int(round(fractions[0] * len(unique)))
    n_val = min(int(round(fractions[1] * len(unique))), len(unique) - n_train)
    code = np.full(len(unique), 2, np.int64)
    code[order[:n_train]] = 0
    code[order[n_train:n_train + n_val]] = 1
    return code[np.searchsorted(unique, patients)]


def image_resolver(root: Path, table: CheXpertTable) -> Callable[[str], Path]:
    """Map a CSV ``Path`` to a file under ``root`` (the folder holding the CSV): relative to the root's parent
    (the release), the root, or the root without the first folder (a release folder under another name);
    decided on the first rows."""
    forms = (lambda p: root.parent / p, lambda p: root / p, lambda p: root.joinpath(*PurePosixPath(p).parts[1:]))
    probe = table.paths[:20]
    for p in probe:
        for form in forms:
            if len(PurePosixPath(p).parts) > 1 and form(p).is_file():
                return form
    tried = ", ".join(str(form(probe[0])) for form in forms) if probe else "(no rows)"
    raise DatasetError(f"none of the first {len(probe)} images listed in {table.path} exist (for its first "
                       f"row, looked for {tried}). Point data.root at the folder holding {table.path.name} "
                       f"and train/, valid/ (or regenerate the phantom). {HOW_TO_GET_CHEXPERT}")
