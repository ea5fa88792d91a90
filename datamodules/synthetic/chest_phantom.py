"""Embedded chest-radiograph phantom: a deterministic renderer that writes CheXpert-v1.0-small's layout.

CheXpert needs registration, so ``data=chest_phantom`` uses these images instead: the builder writes
``train.csv``, ``valid.csv`` (``Path`` values start with ``CheXpert-v1.0-small/``, as in the release) and
``train/patientNNNNN/studyN/view1_frontal.jpg`` (+ ``view2_lateral.jpg``), read back by the very code that reads
CheXpert (``datamodules.chexpert_format``), plus ``factors.npz``: every generative factor of every image, from which
the TRUE counterfactual of any image can be re-rendered.

The factors are sampled in ``datamodules.synthetic.chest_phantom_factors`` and drawn by
``datamodules.synthetic.chest_phantom_render``; this module writes them to disk (``ChestPhantomBuilder``,
also the CLI ``python -m datamodules.synthetic.chest_phantom``).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from datamodules.base import DatasetError
from datamodules.chexpert_format import TRAIN_CSV, VALID_CSV, write_chexpert_csv
from datamodules.synthetic.chest_phantom_factors import (
    MODELLED_FINDINGS,
    as_population,
    factor_row,
    sample_phantom,
)
from datamodules.synthetic.chest_phantom_render import render
from datamodules.synthetic.common import (
    intervention_values,
    read_factors_npz,
    read_manifest,
    row_indices,
    save_grid,
)

# Part of the cache key with the builder's parameters: bump it whenever the renderer draws anything differently.
FORMAT_VERSION = 1
FACTORS_FILE = "factors.npz"
MANIFEST_FILE = "builder.json"
INTERVENABLE: tuple[str, ...] = (*MODELLED_FINDINGS, "Sex", "Age")


# ------------------------------------------------------------------------------------------------ files


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """The one JPEG encoder of the phantom (Pillow, 8-bit grayscale)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode as the CheXpert DataModule does (``Image.open(f).convert("L")``) -> uint8 [H, W]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def load_factors(root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read ``<root>/factors.npz`` -> (factors, builder parameters); rows follow train.csv then valid.csv."""
    return read_factors_npz(Path(root) / FACTORS_FILE, "build the chest phantom first (ChestPhantomBuilder.build).")


def _intervention(name: str, value: Any, n: int) -> np.ndarray:
    v = intervention_values(name, value, n)
    if name == "Age":
        if not ((v >= 0) & (v <= 120)).all():
            raise ValueError(f"do['Age'] must be in years (0-120), got {v.min()}..{v.max()}")
        # a DataModule hands back normalised ages converted to years in float32: round away that error, so
        # do(Age = own age) redraws the stored image exactly
        return np.round(v, 3).astype(np.float32)
    if not np.isin(v, (0.0, 1.0)).all():
        raise ValueError(f"do[{name!r}] values must be 0 or 1 (Sex: 1 = Female), got {np.unique(v)}")
    return v.astype(np.int8)


class ChestPhantomBuilder:
    """Writes (and caches) the chest phantom in CheXpert-v1.0-small's layout and renders true counterfactuals.

    Files in ``root``: ``train.csv`` (the ``n_train_patients`` patients' studies, frontal and lateral views),
    ``valid.csv`` (``n_valid_patients`` further patients, one frontal study each, consensus-style labels),
    ``train/`` and ``valid/`` JPEG trees (``image_size`` square, 8-bit grayscale), ``factors.npz`` (one array per
    factor plus ``_params``, rows in train.csv then valid.csv order, as the DataModule's ``index``) and
    ``builder.json`` (parameters and format version, written last so an interrupted build is never taken for
    a complete one). All arguments are JSON-serialisable; ``population`` is a partial dict of
    ``PhantomPopulation`` fields.
    """

    def __init__(self, n_train_patients: int = 3000, n_valid_patients: int = 300, image_size: int = 256,
                 seed: int = 0, population: Mapping[str, float] | None = None, jpeg_quality: int = 90,
                 noise_std: float = 0.012, clavicles: bool = True) -> None:
        if n_train_patients < 1 or n_valid_patients < 0:
            raise ValueError("need n_train_patients >= 1 and n_valid_patients >= 0")
        if image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {image_size}")
        self.n_train_patients, self.n_valid_patients = int(n_train_patients), int(n_valid_patients)
        self.image_size, self.seed = int(image_size), int(seed)
        self.population = as_population(population)
        self.jpeg_quality, self.noise_std, self.clavicles = int(jpeg_quality), float(noise_std), bool(clavicles)
        self.render_count = 0  # images rendered by build(); tests use it to see the cache at work
        self._factors: dict[Path, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}

    @property
    def params(self) -> dict[str, Any]:
        return {"n_train_patients": self.n_train_patients, "n_valid_patients": self.n_valid_patients,
                "image_size": self.image_size, "seed": self.seed, "population": asdict(self.population),
                "jpeg_quality": self.jpeg_quality, "noise_std": self.noise_std, "clavicles": self.clavicles}

    def sample(self) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        return sample_phantom(self.n_train_patients, self.n_valid_patients, self.seed, self.population)

    def is_built(self, root: str | Path) -> bool:
        """True when ``root`` holds a complete build with exactly these parameters."""
        root = Path(root)
        if not read_manifest(root, MANIFEST_FILE, FORMAT_VERSION, self.params, (TRAIN_CSV, VALID_CSV, FACTORS_FILE)):
            return False
        manifest = json.loads((root / MANIFEST_FILE).read_text())
        first, last = manifest.get("first_image", ""), manifest.get("last_image", "")
        return bool(first) and (root / first).is_file() and (root / last).is_file()

    def build(self, root: str | Path) -> Path:
        """Write the phantom into ``root`` unless an identical build is already there; returns ``root``."""
        root = Path(root)
        if self.is_built(root):
            return root
        ours = (root / MANIFEST_FILE).exists() or (root / FACTORS_FILE).exists()
        if not ours and any((root / n).exists() for n in (TRAIN_CSV, VALID_CSV, "train", "valid")):
            raise DatasetError(f"{root} holds a CheXpert-like dataset that this builder did not write; refusing to "
                               f"overwrite it. Point the chest phantom at an empty folder.")
        (root / MANIFEST_FILE).unlink(missing_ok=True)
        for name in ("train", "valid"):
            shutil.rmtree(root / name, ignore_errors=True)
        for name in (TRAIN_CSV, VALID_CSV, FACTORS_FILE):
            (root / name).unlink(missing_ok=True)
        self._factors.pop(root.resolve(), None)

        # factors.npz first: from then on a partial build is recognisably ours and gets overwritten
        root.mkdir(parents=True, exist_ok=True)
        factors, rows = self.sample()
        np.savez(root / FACTORS_FILE, _params=np.array(json.dumps(self.params)), **factors)
        write_chexpert_csv(root / TRAIN_CSV, [r for r, s in zip(rows, factors["source"], strict=True) if s == 0])
        write_chexpert_csv(root / VALID_CSV, [r for r, s in zip(rows, factors["source"], strict=True) if s == 1])
        files = [Path(*Path(r["Path"]).parts[1:]) for r in rows]  # without the release folder
        for i in tqdm(range(len(rows)), desc=f"Rendering the chest phantom into {root}", unit="img",
                      disable=len(rows) < 500):
            img = render(factor_row(factors, i), self.image_size, self.noise_std, self.clavicles)
            (root / files[i]).parent.mkdir(parents=True, exist_ok=True)
            (root / files[i]).write_bytes(encode_jpeg(img, self.jpeg_quality))
            self.render_count += 1
        manifest = {"format_version": FORMAT_VERSION, "params": self.params,
                    "first_image": files[0].as_posix(), "last_image": files[-1].as_posix()}
        (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return root

    def load_factors(self, root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``load_factors(root)``, cached on this instance."""
        key = Path(root).resolve()
        if key not in self._factors:
            self._factors[key] = load_factors(key)
        return self._factors[key]

    def render(self, factors: Mapping[str, Any]) -> np.ndarray:
        """Render a row (scalars -> [H, W]) or a batch (arrays -> [N, H, W]) with this builder's size and
        noise; no JPEG."""
        if np.ndim(factors["Cardiomegaly"]) == 0:
            return render(dict(factors), self.image_size, self.noise_std, self.clavicles)
        n = len(factors["Cardiomegaly"])
        return np.stack([render(factor_row(factors, i), self.image_size, self.noise_std, self.clavicles)
                         for i in range(n)]) if n else np.zeros((0, self.image_size, self.image_size), np.uint8)

    def true_counterfactual(self, root: str | Path, indices: Any, do: Mapping[str, Any],
                            jpeg_roundtrip: bool = True) -> np.ndarray:
        """The images at ``indices`` (the DataModule's ``index``: train.csv rows, then valid.csv rows) re-rendered
        with the factors in ``do`` set and every other factor, noise included, unchanged -> uint8 [N, H, W].

        ``do`` maps ``Cardiomegaly``/``Consolidation``/``Atelectasis`` (0/1), ``Sex`` (0 Male, 1 Female) or
        ``Age`` (years) to a scalar or a length-N array. A finding switched on appears where the row's latent
        factors put it (its zone, size and shape are drawn for every image); Cardiomegaly keeps the heart's CTR
        quantile. Rendering uses the parameters stored in ``root``. With ``jpeg_roundtrip`` the images go
        through the phantom's JPEG encoder and a Pillow decode, so a no-op intervention returns exactly the
        stored file.
        """
        factors, params = self.load_factors(root)
        idx = row_indices(indices, len(factors["Cardiomegaly"]), f"the phantom in {root}")
        unknown = [k for k in do if k not in INTERVENABLE]
        if unknown:
            raise ValueError(f"cannot intervene on {unknown}: the chest phantom models only {', '.join(INTERVENABLE)}")
        rows = {k: v[idx].copy() for k, v in factors.items()}
        rows.update({k: _intervention(k, v, len(idx)) for k, v in do.items()})
        size = params["image_size"]
        images = np.empty((len(idx), size, size), np.uint8)
        for i in range(len(idx)):
            images[i] = render(factor_row(rows, i), size, params["noise_std"], params["clavicles"])
            if jpeg_roundtrip:
                images[i] = decode_jpeg(encode_jpeg(images[i], params["jpeg_quality"]))
        return images


def preview_grid(path: str | Path, n: int = 16, image_size: int = 256, seed: int = 0) -> np.ndarray:
    """Save a PNG: ``n`` frontal images, then one row each of normal | do(finding = 1) for the three findings."""
    factors, _ = sample_phantom(4 * n, 0, seed)
    frontal = np.flatnonzero(factors["frontal"] == 1)
    tiles = [render(factor_row(factors, i), image_size, 0.012) for i in frontal[:n]]
    clean = [i for i in frontal if not any(factors[f][i] for f in MODELLED_FINDINGS)][:n // 2]
    for name in MODELLED_FINDINGS:
        for i in clean[: n // 2]:
            row = factor_row(factors, i)
            tiles += [render(row, image_size, 0.012), render(dict(row, **{name: 1}), image_size, 0.012)]
    return save_grid(path, tiles, cols=n)


def main(argv: list[str] | None = None) -> int:
    """``python -m datamodules.synthetic.chest_phantom [--root DIR] [--n-train-patients N] ... [--preview P]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write the chest phantom in CheXpert-v1.0-small's layout (cached).")
    parser.add_argument("--root", default=None,
                        help="default: data/chest_phantom_<size>px_<patients>_seed<seed>, as data=chest_phantom")
    parser.add_argument("--n-train-patients", type=int, default=3000)
    parser.add_argument("--n-valid-patients", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", default=None, help="only save a PNG grid of phantoms and finding toggles here")
    args = parser.parse_args(argv)
    if args.preview:
        preview_grid(args.preview, image_size=args.image_size, seed=args.seed)
        print(f"preview: {args.preview}")
        return 0
    root = args.root or f"data/chest_phantom_{args.image_size}px_{args.n_train_patients}_seed{args.seed}"
    builder = ChestPhantomBuilder(args.n_train_patients, args.n_valid_patients, args.image_size, args.seed)
    print(f"chest phantom in {builder.build(root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
