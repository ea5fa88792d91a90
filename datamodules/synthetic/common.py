"""What every synthetic builder shares: the build manifest, the factors sidecar, and intervention values."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.base import DatasetError


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


def intervention_values(name: str, value: Any, n: int) -> np.ndarray:
    """``do[name]`` as float64 [n]: a scalar is broadcast, a tensor or array must have ``n`` entries."""
    v = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    v = np.broadcast_to(v.astype(np.float64), (n,)) if v.ndim == 0 else v.astype(np.float64).reshape(-1)
    if v.shape != (n,):
        raise ValueError(f"do[{name!r}] must be a scalar or have length {n}, got shape {v.shape}")
    return v
