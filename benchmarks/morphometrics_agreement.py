"""Does our Morpho-MNIST measurement agree with the published Deep-SCM MorphoMNIST test split?

``python -m benchmarks.morphometrics_agreement [--data DIR] [--limit N] [--processes P]`` measures every
image of ``t10k-images-idx3-ubyte.gz`` (10,000 by default) with ``datamodules.morphometrics.measure_batch``
and compares the measured intensity and thickness with the values the SCM sampled (``t10k-morpho.csv``):
mean absolute error, mean bias and Pearson r. Acceptance targets: intensity MAE < 1.0 and thickness
r > 0.95. Exit status 0 when both hold, 1 when not, 2 when the data are missing.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from datamodules.idx import read_idx
from datamodules.morphometrics import measure_batch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "morphomnist"
TARGETS = {"intensity_mae": 1.0, "thickness_r": 0.95}


def read_morpho_csv(path: str | Path) -> dict[str, np.ndarray]:
    """A ``*-morpho.csv`` (``index,thickness,intensity``, possibly more columns) -> column name -> array."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {name: np.array([float(r[name]) for r in rows]) for name in rows[0]}


def agreement(measured: dict[str, np.ndarray], sampled: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for name in ("intensity", "thickness"):
        diff = measured[name] - sampled[name]
        out[f"{name}_mae"] = float(np.abs(diff).mean())
        out[f"{name}_bias"] = float(diff.mean())
        out[f"{name}_r"] = float(np.corrcoef(measured[name], sampled[name])[0, 1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"default: {DEFAULT_DATA}")
    parser.add_argument("--limit", type=int, default=None, help="measure only the first N images")
    parser.add_argument("--processes", type=int, default=None, help="default: every usable core")
    args = parser.parse_args(argv)
    images_path, csv_path = args.data / "t10k-images-idx3-ubyte.gz", args.data / "t10k-morpho.csv"
    if not images_path.is_file() or not csv_path.is_file():
        print(f"needs {images_path} and {csv_path} (the published Deep-SCM MorphoMNIST test split)")
        return 2
    images = read_idx(images_path, 3)
    sampled = read_morpho_csv(csv_path)
    n = len(images) if args.limit is None else min(args.limit, len(images))
    sampled = {k: v[:n] for k, v in sampled.items()}
    start = time.perf_counter()
    measured = measure_batch(images[:n], processes=args.processes)
    seconds = time.perf_counter() - start
    stats = agreement(measured, sampled)
    passed = stats["intensity_mae"] < TARGETS["intensity_mae"] and stats["thickness_r"] > TARGETS["thickness_r"]
    print(f"\nMorphometrics vs the sampled values of {csv_path} ({n:,} images, {seconds:.1f} s, "
          f"{1000 * seconds / n:.1f} ms/image wall)")
    print("| quantity | MAE | bias (measured - sampled) | Pearson r |\n|---|---|---|---|")
    for name in ("intensity", "thickness"):
        print(f"| {name} | {stats[f'{name}_mae']:.3f} | {stats[f'{name}_bias']:+.3f} | {stats[f'{name}_r']:.4f} |")
    print(f"targets: intensity MAE < {TARGETS['intensity_mae']}, thickness r > {TARGETS['thickness_r']}: "
          f"{'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
