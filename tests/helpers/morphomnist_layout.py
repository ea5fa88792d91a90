"""Tiny MorphoMNIST folders in the published layout, for DataModule tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.idx import write_idx


def write_morphomnist(root: Path, n_train: int = 30, n_test: int = 12, seed: int = 0,
                      prefixes: tuple[str, ...] = ("train", "t10k")) -> dict[str, dict[str, np.ndarray]]:
    """Write random 28x28 digits, labels and morpho CSVs; returns what was written per prefix."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        if prefix not in prefixes:
            continue
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        thickness = rng.uniform(1.0, 6.0, n)
        intensity = rng.uniform(70.0, 250.0, n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        rows = zip(thickness, intensity, strict=True)
        lines = ["index,thickness,intensity"] + [f"{i},{float(t)!r},{float(v)!r}" for i, (t, v) in enumerate(rows)]
        (root / f"{prefix}-morpho.csv").write_text("\n".join(lines) + "\n")
        written[prefix] = {"images": images, "labels": labels, "thickness": thickness, "intensity": intensity}
    return written
