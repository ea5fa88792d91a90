"""What every synthetic builder shares: its sampling options, the build manifest, the factors sidecar,
intervention values and the preview grid."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from datamodules.base import DatasetError

Options = TypeVar("Options")

#: std of the sum of two independent uniform bytes: the renderers' pixel noise is that sum, scaled to the
#: wanted std (cheaper than Gaussian sampling, which would dominate the render time)
TRIANGULAR_STD = float(np.sqrt((256**2 - 1) / 6))


def check_probabilities(values: Mapping[str, float], what: str) -> None:
    """Raise a ``ValueError`` for the first of ``values`` outside [0, 1]."""
    for name, p in values.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{what} {name}={p} is not a probability in [0, 1]")


def options_from(cls: type[Options], value: Mapping[str, float] | Options | None, what: str) -> Options:
    """A builder's sampling options (a dataclass ``cls`` of floats) from a config's partial dict of its fields
    (``None``: every default); unknown keys are refused, so a misspelt option is not silently ignored."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    known = asdict(cls())
    unknown = set(value) - set(known)
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**{k: float(v) for k, v in dict(value).items()})


def read_manifest(root: str | Path, manifest_file: str, format_version: int, params: dict[str, Any],
                  files: Iterable[str]) -> bool:
    """True when ``root/manifest_file`` records exactly this format version and these parameters, and every
    file of ``files`` exists: a complete build that can be reused. The manifest is written last, so an
    interrupted build never passes."""
    root = Path(root)
    try:
        manifest = json.loads((root / manifest_file).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("format_version") == format_version and manifest.get("params") == params
            and all((root / f).is_file() for f in files))


def read_factors_npz(path: str | Path, how_to_build: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A builder's factors sidecar -> (per-row arrays, builder parameters stored under ``_params``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} not found: {how_to_build}")
    with np.load(path, allow_pickle=False) as z:
        factors = {k: z[k] for k in z.files if not k.startswith("_")}
        params = json.loads(str(z["_params"]))
    return factors, params


def row_indices(indices: Any, n_rows: int, where: str) -> np.ndarray:
    """``true_counterfactual``'s indices (numpy, lists or tensors) as int64 [N], each a row of the ``n_rows``
    of the dataset ``where`` names."""
    idx = np.asarray(indices.detach().cpu().numpy() if hasattr(indices, "detach") else indices,
                     np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
        raise IndexError(f"indices must lie in [0, {n_rows}) for {where}")
    return idx


def intervention_values(name: str, value: Any, n: int) -> np.ndarray:
    """``do[name]`` as float64 [n]: a scalar is broadcast, a tensor or array must have ``n`` entries."""
    v = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    v = np.broadcast_to(v.astype(np.float64), (n,)) if v.ndim == 0 else v.astype(np.float64).reshape(-1)
    if v.shape != (n,):
        raise ValueError(f"do[{name!r}] must be a scalar or have length {n}, got shape {v.shape}")
    return v


def save_grid(path: str | Path, tiles: Sequence[np.ndarray], cols: int) -> np.ndarray:
    """Tile equally sized images row by row, ``cols`` to a row (the last padded with black), and save the PNG."""
    tiles = list(tiles) + [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
    grid = np.concatenate([np.concatenate(tiles[r:r + cols], 1) for r in range(0, len(tiles), cols)], 0)
    Image.fromarray(grid).save(path)
    return grid
