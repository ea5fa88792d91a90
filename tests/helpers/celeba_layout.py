"""A tiny CelebA in the official on-disk layout, for tests that must not need the licensed data.

``write_tiny_celeba(tmp_path)`` writes ``img_align_celeba/000001.jpg ...``, ``list_attr_celeba.txt`` and
``list_eval_partition.txt`` through the same ``celeba_format`` writers the synthetic builder uses, so the
real ``CelebADataModule`` code path reads it. Twenty 218x178 JPEGs take a few tens of milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.celeba_format import (
    ATTR_FILE,
    CELEBA_ATTRIBUTES,
    IMAGE_DIR,
    PARTITION_FILE,
    SPLITS,
    write_attributes,
    write_partition,
)


def tiny_celeba_attributes(n_train: int, n_val: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(attributes [N, 40] in {1, -1}, partition [N] in {0, 1, 2}), deterministic from ``seed``.

    Every attribute has both values in every non-empty split, and each attribute has its own base rate
    (0.2 to 0.8), so some are imbalanced, as in CelebA. The partition is interleaved rather than contiguous,
    so code that assumes CelebA's contiguous train/val/test blocks fails on it.
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    if any(n == 1 or n < 0 for n in sizes.values()):
        raise ValueError(f"each split needs 0 or at least 2 images (to hold both classes), got {sizes}")
    rng = np.random.default_rng(seed)
    partition = rng.permutation(np.repeat([SPLITS[s] for s in sizes], list(sizes.values())))
    rates = rng.uniform(0.2, 0.8, size=len(CELEBA_ATTRIBUTES))
    positive = rng.random((len(partition), len(CELEBA_ATTRIBUTES))) < rates
    for code in SPLITS.values():
        rows = np.flatnonzero(partition == code)
        if len(rows) == 0:
            continue
        # A split whose column is constant gets its first image flipped, so both classes appear.
        constant = positive[rows].all(axis=0) | ~positive[rows].any(axis=0)
        positive[rows[0], constant] = ~positive[rows[0], constant]
    return np.where(positive, 1, -1).astype(np.int8), partition


def write_tiny_celeba(
    root: Path,
    n_train: int = 12,
    n_val: int = 4,
    n_test: int = 4,
    image_size: tuple[int, int] | int = (218, 178),
    seed: int = 0,
    torchvision_layout: bool = False,
    smiling_pattern: bool = True,
) -> Path:
    """Write a tiny CelebA under ``root`` and return the folder holding ``list_attr_celeba.txt``.

    :param root: where to write (created if needed).
    :param n_train, n_val, n_test: images per official split (0 or >= 2 each); rows are interleaved.
    :param image_size: (height, width) like real CelebA's aligned 218x178, or an int for square images
        (use ``crop_size=None`` in the DataModule for images smaller than its crop).
    :param seed: fixes images, attributes and partition.
    :param torchvision_layout: write into ``root/celeba/`` as ``torchvision.datasets.CelebA`` expects.
        Both ``root`` and the returned folder are valid ``CelebADataModule`` roots.
    :param smiling_pattern: draw a bright horizontal bar at mouth height in the images with Smiling = 1
        (inside the default 140-pixel centre crop), so a tiny classifier or generator can learn Smiling.
    :return: the data folder (``root`` or ``root/celeba``).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    data_dir = Path(root) / "celeba" if torchvision_layout else Path(root)
    image_dir = data_dir / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)

    attrs, partition = tiny_celeba_attributes(n_train, n_val, n_test, seed)
    filenames = [f"{i + 1:06d}.jpg" for i in range(len(partition))]
    smiling = attrs[:, CELEBA_ATTRIBUTES.index("Smiling")] > 0
    rng = np.random.default_rng(seed + 1)
    for name, smile in zip(filenames, smiling, strict=True):
        # Smooth random blobs (an 8x8 grid upsampled) compress well and keep the writer fast; the dark
        # range leaves contrast for the bar.
        coarse = rng.integers(0, 160, size=(8, 8, 3), dtype=np.uint8)
        img = np.array(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
        if smiling_pattern and smile:
            img[int(0.62 * height): max(int(0.70 * height), int(0.62 * height) + 1),
                int(0.3 * width): int(0.7 * width)] = 255
        Image.fromarray(img).save(image_dir / name, quality=90)
    write_attributes(data_dir / ATTR_FILE, filenames, attrs)
    write_partition(data_dir / PARTITION_FILE, filenames, partition)
    return data_dir
