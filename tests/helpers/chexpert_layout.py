"""A tiny CheXpert in the CheXpert-v1.0-small layout, for tests that must not need the licensed data.

``write_tiny_chexpert(tmp_path)`` writes ``train.csv``, ``valid.csv`` (through ``write_chexpert_csv``, the writer
the chest phantom uses) and small grayscale JPEGs under ``train/`` and ``valid/``. The first rows are written
by hand (``TRAIN_ROWS``, ``VALID_ROWS``) so tests can state the labels each policy must give; they hold 1.0,
0.0, -1.0 and blank cells, lateral views, an ``Unknown`` sex, a row with another pathology only and a row that
claims both a finding and No Finding. ``extra_patients`` appends seeded random patients (several studies,
some lateral views) for split tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.chexpert_format import OBSERVATIONS, RELEASE_DIR, TRAIN_CSV, VALID_CSV, write_chexpert_csv

_ = None  # a blank cell
# (patient, study, view, Sex, Age, No Finding, Cardiomegaly, Consolidation, Atelectasis, Edema); global index =
# position in this list (train.csv rows come first).
TRAIN_ROWS: list[tuple[Any, ...]] = [
    (1, 1, "frontal", "Male", 60, 1.0, _, 0.0, _, _),  # 0: No Finding
    (1, 1, "lateral", "Male", 60, 1.0, _, 0.0, _, _),  # 1: its lateral view
    (1, 2, "frontal", "Male", 61, _, 1.0, _, -1.0, _),  # 2: Cardiomegaly (Atelectasis uncertain)
    (2, 1, "frontal", "Female", 45, _, -1.0, 1.0, _, _),  # 3: Cardiomegaly uncertain, Consolidation
    (2, 2, "frontal", "Female", 46, 1.0, 0.0, _, _, _),  # 4: No Finding
    (3, 1, "frontal", "Female", 70, _, 1.0, _, 1.0, _),  # 5: Cardiomegaly and Atelectasis
    (3, 1, "lateral", "Female", 70, _, 1.0, _, 1.0, _),  # 6: its lateral view
    (4, 1, "frontal", "Male", 30, _, 0.0, _, _, 1.0),  # 7: Edema only: neither class
    (4, 2, "frontal", "Male", 31, 1.0, _, _, _, _),  # 8: No Finding
    (5, 1, "frontal", "Unknown", 55, _, -1.0, _, -1.0, _),  # 9: uncertain only, unknown sex
    (5, 2, "frontal", "Unknown", 56, 1.0, _, _, _, _),  # 10: No Finding, unknown sex
    (6, 1, "frontal", "Female", 80, _, 1.0, 0.0, _, _),  # 11: Cardiomegaly
    (6, 1, "lateral", "Female", 80, _, 1.0, 0.0, _, _),  # 12: its lateral view
    (6, 2, "frontal", "Female", 81, 1.0, 1.0, _, _, _),  # 13: contradictory: both
]
# valid.csv, like the release: radiologist consensus, every cell 1.0 or 0.0
VALID_ROWS: list[tuple[Any, ...]] = [
    (90, 1, "frontal", "Male", 50, 0.0, 1.0, 0.0, 0.0, 0.0),  # 14
    (91, 1, "frontal", "Female", 65, 1.0, 0.0, 0.0, 0.0, 0.0),  # 15
    (91, 1, "lateral", "Female", 65, 1.0, 0.0, 0.0, 0.0, 0.0),  # 16
]
_LABELS = ("No Finding", "Cardiomegaly", "Consolidation", "Atelectasis", "Edema")


def _csv_row(entry: tuple[Any, ...], folder: str, prefix: str, consensus: bool) -> dict[str, Any]:
    patient, study, view, sex, age, *labels = entry
    name = "view1_frontal.jpg" if view == "frontal" else "view2_lateral.jpg"
    row: dict[str, Any] = {
        "Path": f"{prefix}{folder}/patient{patient:05d}/study{study}/{name}", "Sex": sex, "Age": age,
        "Frontal/Lateral": "Frontal" if view == "frontal" else "Lateral",
        "AP/PA": ("AP" if patient % 2 else "PA") if view == "frontal" else "",
    }
    if consensus:  # every other observation 0.0, as in the release's valid.csv
        row.update(dict.fromkeys(OBSERVATIONS, 0.0))
    row.update(dict(zip(_LABELS, labels, strict=True)))
    return row


def _random_rows(n_patients: int, seed: int) -> list[tuple[Any, ...]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_patients):
        patient, sex = 100 + k, ("Male", "Female")[int(rng.integers(2))]
        for study in range(1, 1 + int(rng.integers(1, 4))):
            cells = [rng.choice([1.0, 0.0, -1.0, None], p=[0.3, 0.3, 0.1, 0.3]) for _ in range(4)]
            nf = 1.0 if all(c in (0.0, None) for c in cells) else None
            entry = (patient, study, "frontal", sex, int(rng.integers(20, 90)), nf, *cells)
            out.append(entry)
            if rng.random() < 0.3:
                out.append((patient, study, "lateral", *entry[3:]))
    return out


def write_tiny_chexpert(root: Path, folder_name: str = RELEASE_DIR, path_prefix: str | None = None,
                        extra_patients: int = 0, image_size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """Write the tiny CheXpert into ``root/folder_name`` and return that folder (the DataModule's root).

    :param folder_name: the release folder's name; another name exercises the "relative to root" path forms.
    :param path_prefix: what ``Path`` values start with (default ``CheXpert-v1.0-small/``; ``""`` makes them
        relative to the root itself).
    :param extra_patients: seeded random patients appended to train.csv after ``TRAIN_ROWS``.
    :param image_size: (height, width) of the JPEGs: portrait and not square, like the release's.
    """
    data_dir = Path(root) / folder_name
    prefix = f"{RELEASE_DIR}/" if path_prefix is None else path_prefix
    train = [_csv_row(e, "train", prefix, False) for e in TRAIN_ROWS + _random_rows(extra_patients, seed)]
    valid = [_csv_row(e, "valid", prefix, True) for e in VALID_ROWS]
    data_dir.mkdir(parents=True, exist_ok=True)
    write_chexpert_csv(data_dir / TRAIN_CSV, train)
    write_chexpert_csv(data_dir / VALID_CSV, valid)
    rng = np.random.default_rng(seed + 1)
    height, width = image_size
    for row in train + valid:
        path = data_dir / Path(row["Path"][len(prefix):])
        path.parent.mkdir(parents=True, exist_ok=True)
        # smooth random blobs (a 6x5 grid upsampled): small files, fast to write
        coarse = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR).save(path, quality=90)
    return data_dir


def image_path(data_dir: Path, index: int) -> Path:
    """The JPEG of hand-written row ``index`` (``TRAIN_ROWS`` then ``VALID_ROWS``, numbered as without
    ``extra_patients``)."""
    entries = [(e, "train") for e in TRAIN_ROWS] + [(e, "valid") for e in VALID_ROWS]
    entry, folder = entries[index]
    name = "view1_frontal.jpg" if entry[2] == "frontal" else "view2_lateral.jpg"
    return Path(data_dir) / folder / f"patient{entry[0]:05d}" / f"study{entry[1]}" / name
