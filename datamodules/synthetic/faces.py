"""Embedded synthetic faces: a deterministic procedural renderer that writes CelebA's on-disk layout.

Real CelebA is licensed, so experiments ending in ``_synth`` use these faces instead: the builder writes
``img_align_celeba/000001.jpg ...``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt`` exactly as
CelebA ships them (read back by the same code that reads CelebA), plus ``factors.npz``, every generative
factor of every image, from which the TRUE counterfactual of any image can be re-rendered.

The factors are sampled in ``datamodules.synthetic.faces_factors`` and drawn by
``datamodules.synthetic.faces_render``; this module writes them to disk (``SyntheticFacesBuilder``, also the
CLI ``python -m datamodules.synthetic.faces``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from datamodules.base import DatasetError
from datamodules.celeba_format import (
    ATTR_FILE,
    IMAGE_DIR,
    PARTITION_FILE,
    write_attributes,
    write_partition,
)
from datamodules.synthetic.common import (
    intervention_values,
    read_factors_npz,
    read_manifest,
    row_indices,
    save_grid,
)
from datamodules.synthetic.faces_factors import (
    MODELLED_ATTRIBUTES,
    as_correlations,
    celeba_attributes,
    factor_row,
    sample_factors,
)
from datamodules.synthetic.faces_render import render_face, render_faces

# Part of the cache key with the builder's parameters: bump it whenever the renderer draws anything differently,
# or a dataset built earlier would be reused while true_counterfactual renders with the new drawing.
# 2: wider mouth and thicker lips (Smiling visible at 64 px).
FORMAT_VERSION = 2
FACTORS_FILE = "factors.npz"
MANIFEST_FILE = "builder.json"


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """The one JPEG encoder of the dataset (Pillow, 4:4:4 chroma so thin coloured strokes survive)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality), subsampling=0)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode as a Pillow-based loader does (``Image.open(f).convert("RGB")``) -> uint8 [H, W, 3]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def load_factors(root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read ``<root>/factors.npz`` -> (factors, builder parameters); rows align with list_attr_celeba.txt."""
    return read_factors_npz(Path(root) / FACTORS_FILE, "build the synthetic faces first (SyntheticFacesBuilder.build).")


def _binary(name: str, value: Any, n: int) -> np.ndarray:
    v = intervention_values(name, value, n)
    if not np.isin(v, (-1.0, 0.0, 1.0)).all():
        raise ValueError(f"do[{name!r}] values must be bools, 0/1 or -1/1")
    return (v > 0).astype(np.int8)


class SyntheticFacesBuilder:
    """Writes (and caches) the synthetic faces in CelebA's layout and renders true counterfactuals.

    Files in ``root``: ``img_align_celeba/%06d.jpg`` (1-based, exactly ``image_size`` square, JPEG by
    ``encode_jpeg``), ``list_attr_celeba.txt`` (all 40 columns, unmodelled ones -1),
    ``list_eval_partition.txt`` (the first ``n_train`` rows 0, the next ``n_val`` 1, the last ``n_test`` 2;
    rows are i.i.d. so no shuffle is needed), ``factors.npz`` (one array per factor plus ``_params``, the
    parameters as JSON) and ``builder.json`` (parameters and format version, written last so that an
    interrupted build is never taken for a complete one). All arguments are JSON-serialisable.
    ``correlations`` is a partial dict of ``FaceCorrelations`` fields (None -> defaults).
    """

    def __init__(self, n_train: int = 20000, n_val: int = 2000, n_test: int = 2000, image_size: int = 64,
                 seed: int = 0, correlations: Mapping[str, float] | None = None, jpeg_quality: int = 95,
                 noise_std: float = 0.02) -> None:
        if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test == 0:
            raise ValueError("split sizes must be >= 0 with at least one image")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        self.n_train, self.n_val, self.n_test = int(n_train), int(n_val), int(n_test)
        self.image_size, self.seed = int(image_size), int(seed)
        self.correlations = as_correlations(correlations)
        self.jpeg_quality, self.noise_std = int(jpeg_quality), float(noise_std)
        self.render_count = 0  # images rendered by build(); tests use it to see the cache at work
        self._factors: dict[Path, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}

    @property
    def params(self) -> dict[str, Any]:
        return {"n_train": self.n_train, "n_val": self.n_val, "n_test": self.n_test,
                "image_size": self.image_size, "seed": self.seed, "correlations": asdict(self.correlations),
                "jpeg_quality": self.jpeg_quality, "noise_std": self.noise_std}

    @property
    def n_images(self) -> int:
        return self.n_train + self.n_val + self.n_test

    def filenames(self) -> list[str]:
        return [f"{i + 1:06d}.jpg" for i in range(self.n_images)]

    def sample_factors(self) -> dict[str, np.ndarray]:
        return sample_factors(self.n_images, self.seed, self.correlations)

    def is_built(self, root: str | Path) -> bool:
        """True when ``root`` holds a complete build with exactly these parameters."""
        root = Path(root)
        if not read_manifest(root, MANIFEST_FILE, FORMAT_VERSION, self.params, (ATTR_FILE, PARTITION_FILE, FACTORS_FILE)):
            return False
        names = self.filenames()
        img_dir = root / IMAGE_DIR
        return (img_dir.is_dir() and len(os.listdir(img_dir)) == len(names)
                and (img_dir / names[0]).is_file() and (img_dir / names[-1]).is_file())

    def build(self, root: str | Path) -> Path:
        """Write the dataset into ``root`` unless an identical build is already there; returns ``root``."""
        root = Path(root)
        if self.is_built(root):
            return root
        ours = (root / MANIFEST_FILE).exists() or (root / FACTORS_FILE).exists()
        if not ours and ((root / IMAGE_DIR).exists() or (root / ATTR_FILE).exists()):
            raise DatasetError(f"{root} holds a CelebA-like dataset that this builder did not write; "
                               f"refusing to overwrite it. Point the synthetic faces at an empty folder.")
        (root / MANIFEST_FILE).unlink(missing_ok=True)
        shutil.rmtree(root / IMAGE_DIR, ignore_errors=True)
        for name in (ATTR_FILE, PARTITION_FILE, FACTORS_FILE):
            (root / name).unlink(missing_ok=True)
        self._factors.pop(root.resolve(), None)

        # factors.npz first: from then on a partial build is recognisably ours and gets overwritten
        root.mkdir(parents=True, exist_ok=True)
        factors = self.sample_factors()
        np.savez(root / FACTORS_FILE, _params=np.array(json.dumps(self.params)), **factors)
        (root / IMAGE_DIR).mkdir()
        names = self.filenames()
        write_attributes(root / ATTR_FILE, names, celeba_attributes(factors))
        partition = np.repeat([0, 1, 2], [self.n_train, self.n_val, self.n_test])
        write_partition(root / PARTITION_FILE, names, partition)
        for i in tqdm(range(self.n_images), desc=f"Rendering synthetic faces into {root}", unit="img"):
            img = render_face(factor_row(factors, i), self.image_size, self.noise_std)
            (root / IMAGE_DIR / names[i]).write_bytes(encode_jpeg(img, self.jpeg_quality))
            self.render_count += 1
        manifest = {"format_version": FORMAT_VERSION, "params": self.params}
        (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return root

    def load_factors(self, root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``load_factors(root)``, cached on this instance."""
        key = Path(root).resolve()
        if key not in self._factors:
            self._factors[key] = load_factors(key)
        return self._factors[key]

    def render(self, factors: Mapping[str, Any]) -> np.ndarray:
        """Render a row (scalars -> [H, W, 3]) or a batch (arrays -> [N, H, W, 3]) with this builder's
        image size and noise; no JPEG."""
        if np.ndim(factors["Smiling"]) == 0:
            return render_face(factor_row({k: np.asarray(v)[None] for k, v in factors.items()}, 0),
                               self.image_size, self.noise_std)
        return render_faces(factors, self.image_size, self.noise_std)

    def true_counterfactual(self, root: str | Path, indices: Any, do: Mapping[str, Any],
                            jpeg_roundtrip: bool = True) -> np.ndarray:
        """The images at ``indices`` (0-based rows of list_attr_celeba.txt) re-rendered with the attributes
        in ``do`` set and every other factor, noise included, unchanged -> uint8 [N, H, W, 3] RGB.

        ``do`` maps a modelled attribute (``MODELLED_ATTRIBUTES``, CelebA meaning: ``No_Beard=0`` draws a
        beard) to a scalar or a length-N array of bools, 0/1 or -1/1 (numpy, lists or CPU tensors). The
        intervention sets only what it names: do(Smiling=1) leaves Mouth_Slightly_Open, although correlated
        with Smiling in the data, as it was, and do(Male=0) keeps a beard; the one exception is hair
        colour, a single categorical variable, so setting Black_Hair or Blond_Hair to 1 clears the other
        unless ``do`` sets it too (both 1 is an error). Rendering uses the parameters stored in ``root``.
        With ``jpeg_roundtrip`` the images go through the dataset's JPEG encoder and a Pillow decode, so an
        empty or no-op intervention returns exactly the stored file as ``Image.open(f).convert("RGB")``
        decodes it.
        """
        factors, params = self.load_factors(root)
        idx = row_indices(indices, len(factors["Smiling"]), f"the dataset in {root}")
        unknown = [k for k in do if k not in MODELLED_ATTRIBUTES]
        if unknown:
            raise ValueError(f"cannot intervene on {unknown}: the synthetic faces model only "
                             f"{', '.join(MODELLED_ATTRIBUTES)}")
        rows = {k: v[idx].copy() for k, v in factors.items()}
        values = {k: _binary(k, v, len(idx)) for k, v in do.items()}
        for mine, other in (("Black_Hair", "Blond_Hair"), ("Blond_Hair", "Black_Hair")):
            if mine in values and other in values and (values[mine] & values[other]).any():
                raise ValueError("Black_Hair and Blond_Hair cannot both be 1: hair colour is one variable")
            if mine in values and other not in values:
                rows[other] = np.where(values[mine] == 1, 0, rows[other]).astype(np.int8)
        rows.update(values)
        images = render_faces(rows, params["image_size"], params["noise_std"])
        if jpeg_roundtrip:
            for i in range(len(images)):
                images[i] = decode_jpeg(encode_jpeg(images[i], params["jpeg_quality"]))
        return images


def preview_grid(path: str | Path, n: int = 32, image_size: int = 64, seed: int = 0, pairs: int = 8
                 ) -> np.ndarray:
    """Save a PNG of ``n`` sampled faces followed by ``pairs`` factual | do(Smiling = flipped) pairs."""
    factors = sample_factors(n + pairs, seed)
    faces = list(render_faces({k: v[:n] for k, v in factors.items()}, image_size, 0.02))
    for i in range(n, n + pairs):
        row = factor_row(factors, i)
        flipped = dict(row, Smiling=1 - row["Smiling"])
        faces += [render_face(row, image_size, 0.02), render_face(flipped, image_size, 0.02)]
    return save_grid(path, faces, cols=8)


def main(argv: list[str] | None = None) -> int:
    """``python -m datamodules.synthetic.faces [--root DIR] [--n-train N] ...`` (``make data-faces``)."""
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic faces in CelebA's layout (cached).")
    parser.add_argument("--root", default=None, help="default: data/synthetic_faces_<size>px_<n-train>_seed<seed>, as data=synthetic_faces")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-val", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", default=None, help="also save a PNG grid of faces and Smiling flips here")
    args = parser.parse_args(argv)
    root = args.root or f"data/synthetic_faces_{args.image_size}px_{args.n_train}_seed{args.seed}"
    builder = SyntheticFacesBuilder(args.n_train, args.n_val, args.n_test, args.image_size, args.seed)
    print(f"synthetic faces in {builder.build(root)}")
    if args.preview:
        preview_grid(args.preview, image_size=args.image_size, seed=args.seed)
        print(f"preview: {args.preview}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
