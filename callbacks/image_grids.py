"""Counterfactual image grids: the same few images, edited by the model, after every validation and test.

:class:`CounterfactualGrid` keeps the first ``n_images`` images of the first validation (and test) batch, so
every epoch shows the same faces, and draws one row per image with the columns

    factual | reconstruction | do(attr=0) | do(attr=1) | true counterfactual of do(attr=1-y)

(the last column only when the DataModule renders ground-truth counterfactuals). The grid is saved as PNG
under ``<default_root_dir>/images/`` and sent to every attached logger that shows images
(``callbacks.logging_utils``).

At test it also draws one **intervention grid per parent** in ``intervene`` (``test_do_<parent>.png``): the same
rows, with the columns

    factual | do(parent = v_1) ... do(parent = v_k) | true counterfactuals of the same do's (when rendered)

where the values v are, by the parent's kind (:func:`intervention_values`): binary 0 and 1; categorical every
class; continuous ``values_per_parent`` raw values spread over its bins' centres (or over its normalised range
when it has no bins). Downstream effects of an SCM (do(thickness) changing intensity) are the model's own:
the grid calls ``counterfactual`` and shows what it predicts. The model runs inside ``evaluation_mode``: no gradients, and the global RNG is
left untouched, so adding this callback does not change the training run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torchvision.utils import make_grid

from callbacks.editing_metrics import evaluation_mode
from callbacks.logging_utils import log_image, save_png
from datamodules.base import Attribute

__all__ = ["CounterfactualGrid", "counterfactual_grid", "intervention_values"]


def intervention_values(attribute: Attribute, k: int = 5) -> list[float]:
    """The values (batch units) an intervention grid sets ``attribute`` to: binary 0 and 1, categorical every
    class, continuous ``k`` values spread evenly over its bin centres (over [-1, 1] without bins)."""
    if attribute.kind == "binary":
        return [0.0, 1.0]
    if attribute.kind == "categorical":
        return [float(c) for c in range(int(attribute.num_classes))]
    if attribute.bins is None:
        return [float(v) for v in np.linspace(-1.0, 1.0, k)]
    edges = np.asarray(attribute.bins, dtype=np.float64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    picks = centres[np.unique(np.round(np.linspace(0, len(centres) - 1, min(k, len(centres)))).astype(int))]
    return [float(attribute.normalise(v)) for v in picks]


def counterfactual_grid(columns: Sequence[Tensor], padding: int = 2) -> Tensor:
    """One row per image, one column per entry of ``columns`` (each [N, C, H, W] in [0, 1]).

    The result is a [3, N·(H+p)+p, K·(W+p)+p] image for K columns and padding p (one-channel images become
    three-channel, as ``torchvision.utils.make_grid`` does).
    """
    shapes = {tuple(c.shape) for c in columns}
    if len(shapes) != 1:
        raise ValueError(f"all columns must have the same shape, got {sorted(shapes)}")
    # [K, N, C, H, W] -> [N, K, C, H, W] -> rows of K images, the order make_grid fills its rows in.
    tiles = torch.stack([c.detach().float().clamp(0, 1) for c in columns]).transpose(0, 1).flatten(0, 1)
    return make_grid(tiles.cpu(), nrow=len(columns), padding=padding)


class CounterfactualGrid(pl.Callback):
    """Save and log a grid of factual, reconstructed and counterfactual images for one binary attribute.

    :param attribute: the binary attribute of the main grid (``None``: no main grid, only intervention grids).
    :param n_images: number of rows (fewer if the first batch is smaller).
    :param every_n_epochs: during ``fit``, draw after every n-th epoch's validation (test always draws).
    :param seed: seed of the (forked) RNG used by the model while drawing, so every grid uses the same noise.
    :param intervene: parents that get an intervention grid at test (``None``: none).
    :param values_per_parent: number of values of a continuous parent in its intervention grid.
    """

    def __init__(self, attribute: str | None = None, n_images: int = 8, every_n_epochs: int = 1, seed: int = 0,
                 intervene: Sequence[str] | None = None, values_per_parent: int = 5) -> None:
        super().__init__()
        if n_images < 1 or every_n_epochs < 1 or values_per_parent < 2:
            raise ValueError(f"n_images and every_n_epochs must be >= 1 and values_per_parent >= 2, got "
                             f"{n_images}, {every_n_epochs} and {values_per_parent}")
        self.attribute = attribute
        self.intervene = list(intervene or [])
        self.values_per_parent = values_per_parent
        self.n_images = n_images
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self._cache: dict[str, dict[str, Any]] = {}
        self._reported: set[str] = set()
        #: stage -> path of the last grid written.
        self.last_paths: dict[str, Path] = {}

    def _active(self, trainer: pl.Trainer, stage: str) -> bool:
        if not trainer.is_global_zero:
            return False
        if stage == "test":
            return True
        if trainer.sanity_checking:
            return False
        return trainer.state.fn != TrainerFn.FITTING or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _remember(self, stage: str, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int) -> None:
        if stage in self._cache or batch_idx != 0 or dataloader_idx != 0:
            return
        n = self.n_images
        self._cache[stage] = {
            "x": batch["x"][:n].detach().cpu(),
            "pa": {k: v[:n].detach().cpu() for k, v in batch["pa"].items()},
            "index": batch["index"][:n].detach().cpu() if "index" in batch else None,
        }

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Mapping[str, Any],
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if self._active(trainer, "val"):
            self._remember("val", batch, batch_idx, dataloader_idx)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Mapping[str, Any],
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if self._active(trainer, "test"):
            self._remember("test", batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer, "val") and self.attribute is not None:
            self._draw("val", trainer, pl_module, f"val_cf_grid_epoch{trainer.current_epoch:03d}.png")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer, "test"):
            if self.attribute is not None:
                self._draw("test", trainer, pl_module, "test_cf_grid.png")
            for parent in self.intervene:
                self._draw_interventions(trainer, pl_module, parent)

    # -- drawing -------------------------------------------------------------------------------------------
    def _report_once(self, reason: str) -> None:
        if reason not in self._reported:
            self._reported.add(reason)
            rank_zero_info(f"[{type(self).__name__}] {reason}")

    def _draw(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule, filename: str) -> None:
        if not getattr(pl_module, "can_abduct", True):
            self._report_once(f"{type(pl_module).__name__} cannot abduct: no counterfactual grid")
            return
        cached = self._cache.get(stage)
        if cached is None:
            return
        device, attr = pl_module.device, self.attribute
        x = cached["x"].to(device)
        pa = {k: v.to(device) for k, v in cached["pa"].items()}
        y = pa[attr]
        with evaluation_mode(pl_module, self.seed):
            columns = [
                x,
                pl_module.reconstruct(x, pa),
                pl_module.counterfactual(x, pa, {attr: torch.zeros_like(y)}),
                pl_module.counterfactual(x, pa, {attr: torch.ones_like(y)}),
            ]
        datamodule = trainer.datamodule
        if getattr(datamodule, "has_true_counterfactuals", False) and cached["index"] is not None:
            columns.append(datamodule.true_counterfactual(cached["index"], {attr: 1.0 - cached["pa"][attr]}))
        grid = counterfactual_grid([c.cpu() for c in columns])
        path = save_png(grid, Path(trainer.default_root_dir) / "images" / filename)
        self.last_paths[stage] = path
        log_image(trainer, f"{stage}/cf_grid/{attr}", grid, step=trainer.global_step)

    def _draw_interventions(self, trainer: pl.Trainer, pl_module: pl.LightningModule, parent: str) -> None:
        cached = self._cache.get("test")
        if cached is None or not getattr(pl_module, "can_abduct", True):
            return
        datamodule = trainer.datamodule
        values = intervention_values(datamodule.attribute(parent), self.values_per_parent)
        device = pl_module.device
        x = cached["x"].to(device)
        pa = {k: v.to(device) for k, v in cached["pa"].items()}
        with evaluation_mode(pl_module, self.seed):
            columns = [x] + [pl_module.counterfactual(x, pa, {parent: torch.full_like(pa[parent], v)})
                             for v in values]
        columns = [c.cpu() for c in columns]
        if getattr(datamodule, "has_true_counterfactuals", False) and cached["index"] is not None:
            try:
                columns += [datamodule.true_counterfactual(cached["index"], {parent: torch.full_like(
                    cached["pa"][parent], v)}) for v in values]
            except ValueError as err:  # the builder cannot re-render this parent (e.g. MorphoMNIST's digit)
                self._report_once(f"no true counterfactuals in the do({parent}) grid: {err}")
        grid = counterfactual_grid(columns)
        self.last_paths[f"test_do_{parent}"] = save_png(grid, Path(trainer.default_root_dir) / "images"
                                                         / f"test_do_{parent}.png")
        log_image(trainer, f"test/do_grid/{parent}", grid, step=trainer.global_step)
