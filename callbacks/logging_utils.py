"""Logger-agnostic helpers: send images and tables through whichever Lightning loggers are attached.

Callbacks call these helpers and never a backend API, so the same callback works with W&B, TensorBoard, CSV
or no logger at all. Backends that cannot show a kind of object (CSVLogger and images) are skipped silently.
Only global rank zero logs: other ranks would log the same object again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

__all__ = ["image_to_uint8", "log_image", "log_table", "save_png"]


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """A [C, H, W] image in [0, 1] as a [H, W, C] (or [H, W] for one channel) uint8 array.

    Rounds like ``torchvision.utils.save_image`` (×255, +0.5, clamp), so files and logged images agree.
    """
    if image.ndim != 3:
        raise ValueError(f"expected one image [C, H, W], got shape {tuple(image.shape)}")
    array = image.detach().float().mul(255).add(0.5).clamp(0, 255).to("cpu", torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a [C, H, W] image in [0, 1] to ``path`` as PNG, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_to_uint8(image)).save(path)
    return path


def log_image(trainer: pl.Trainer, key: str, image: torch.Tensor, step: int | None = None) -> list[str]:
    """Log one [C, H, W] image in [0, 1] to every attached logger that supports images.

    :return: the class names of the loggers that received it (empty on ranks other than zero).
    """
    if not trainer.is_global_zero:
        return []
    sent = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            # A uint8 array leaves wandb nothing to guess about the value range.
            logger.log_image(key=key, images=[image_to_uint8(image)], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image.detach().float().clamp(0, 1).cpu(), global_step=step)
        else:
            continue
        sent.append(type(logger).__name__)
    return sent


def log_table(
    trainer: pl.Trainer,
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    step: int | None = None,
) -> list[str]:
    """Log a table to every attached logger that supports tables (W&B table; TensorBoard markdown text).

    :return: the class names of the loggers that received it (empty on ranks other than zero).
    """
    if not trainer.is_global_zero:
        return []
    rows = [list(row) for row in rows]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"table {key!r}: row {row} has {len(row)} cells for {len(columns)} columns")
    sent = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=rows, step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, _markdown_table(columns, rows), global_step=step)
        else:
            continue
        sent.append(type(logger).__name__)
    return sent


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
