"""CelebA's on-disk text formats, read and written in one place.

The official layout (what ``torchvision.datasets.CelebA`` reads from ``<root>/celeba/``)::

    img_align_celeba/000001.jpg ...
    list_attr_celeba.txt        line 1: image count; line 2: the 40 attribute names;
                                then ``<file> <40 values in {1, -1}>`` per image
    list_eval_partition.txt     ``<file> <0|1|2>`` per image (0 train, 1 valid, 2 test)

Both the CelebA DataModule and the synthetic-faces builder go through these functions, so the synthetic
data is read by exactly the code that reads the real data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import DatasetError

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
SPLITS = {"train": 0, "val": 1, "test": 2}

HOW_TO_GET_CELEBA = (
    "Download 'Align&Cropped Images' (img_align_celeba.zip), list_attr_celeba.txt and "
    "list_eval_partition.txt from the CelebA website (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html) "
    "and unzip them into one folder, then set CELEBA_ROOT=<folder> or pass data.root=<folder>. To run without "
    "CelebA, use the embedded synthetic faces instead: an experiment ending in _synth (e.g. `make train "
    "EXP=ifcvae_smiling_synth`) or data=synthetic_faces."
)


def write_attributes(path: Path, filenames: list[str], attrs: np.ndarray) -> None:
    """Write ``list_attr_celeba.txt``; ``attrs`` is [N, 40] in {1, -1} in CelebA's column order."""
    attrs = np.asarray(attrs)
    if attrs.shape != (len(filenames), len(CELEBA_ATTRIBUTES)):
        raise ValueError(f"attrs must be [{len(filenames)}, 40], got {attrs.shape}")
    if not np.isin(attrs, (-1, 1)).all():
        raise ValueError("attribute values must be 1 or -1")
    lines = [str(len(filenames)), " ".join(CELEBA_ATTRIBUTES) + " "]
    lines += [f"{f} " + " ".join(f"{int(v):2d}" for v in row) for f, row in zip(filenames, attrs, strict=True)]
    Path(path).write_text("\n".join(lines) + "\n")


def write_partition(path: Path, filenames: list[str], partition: np.ndarray) -> None:
    """Write ``list_eval_partition.txt``; ``partition`` holds 0 (train), 1 (valid) or 2 (test)."""
    Path(path).write_text("".join(f"{f} {int(p)}\n" for f, p in zip(filenames, partition, strict=True)))


def read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt`` -> (filenames, attribute names, int8 array [N, n_attr] in {1, -1}).

    Every malformed line is reported with its line number, never as a bare ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CelebA attribute file not found: {path}. {HOW_TO_GET_CELEBA}")
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise DatasetError(f"{path} is truncated: expected a count line and a header line of attribute names.")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DatasetError(
            f"{path}, line 1: expected the number of images, found {lines[0][:60]!r}. Is this CelebA's "
            f"list_attr_celeba.txt?"
        ) from None
    names = lines[1].split()
    rows = [ln for ln in lines[2:] if ln.strip()]
    if len(rows) != count:
        raise DatasetError(f"{path} declares {count} images on line 1 but lists {len(rows)}; the file is "
                           f"truncated or corrupt. Re-download or regenerate it.")
    filenames: list[str] = []
    values = np.empty((count, len(names)), dtype=np.int8)
    for i, line in enumerate(rows):
        parts = line.split()
        if len(parts) != len(names) + 1:
            raise DatasetError(f"{path}, line {i + 3}: expected a file name and {len(names)} values, found "
                               f"{len(parts)} fields.")
        try:
            row = [int(v) for v in parts[1:]]
        except ValueError:
            raise DatasetError(f"{path}, line {i + 3}: attribute values must be 1 or -1, found "
                               f"{' '.join(parts[1:])[:60]!r}.") from None
        if any(v not in (1, -1) for v in row):
            raise DatasetError(f"{path}, line {i + 3}: attribute values must be 1 or -1.")
        filenames.append(parts[0])
        values[i] = row
    return filenames, names, values


def read_partition(path: Path) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` -> {file name: 0|1|2}."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CelebA partition file not found: {path}. {HOW_TO_GET_CELEBA}")
    out: dict[str, int] = {}
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DatasetError(f"{path}, line {i + 1}: expected '<file> <0|1|2>', found {line[:60]!r}.")
        out[parts[0]] = int(parts[1])
    return out
