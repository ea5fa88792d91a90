"""Callbacks the runner adds to every run so that a fault never costs the work already done.

* ``FiniteGuard``: weights that stop being finite (an absurd learning rate, an exploding loss) stop the run at
  that step with ``TrainingDiverged``, before a checkpoint of them can overwrite the last good one. A model that
  skips a non-finite update itself (the HVAE's ``guarded_step``) keeps finite weights and trains on.
* ``CheckpointOnInterrupt``: Ctrl-C or SIGTERM mid-epoch saves the current state to ``last.ckpt``, so
  ``resume=`` continues from the interrupted step rather than from the last epoch end (or from nothing, when
  the first epoch was interrupted).

Neither draws from any RNG or changes what is trained.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

__all__ = ["CheckpointOnInterrupt", "FiniteGuard", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The weights are no longer finite; the message names the step, the first bad weight and the fix."""


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    named = [(n, t) for n, t in named if torch.is_floating_point(t) and t.numel()]
    if not named:
        return None
    # One sum per tensor and one device sync: a NaN or an infinity anywhere makes the total non-finite, and
    # summing is about ten times cheaper than an elementwise isfinite (this runs after every training step).
    # A total can also overflow with finite weights, so only the tensor-by-tensor look decides.
    if bool(torch.isfinite(torch.stack([t.detach().sum() for _, t in named]).sum())):
        return None
    return next((n for n, t in named if not torch.isfinite(t).all()), None)


class FiniteGuard(pl.Callback):
    """Stop training when the module's parameters stop being finite; refuse to checkpoint such parameters."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        bad = first_non_finite(pl_module.named_parameters())
        if bad is not None:
            losses = {k: float(v) for k, v in trainer.callback_metrics.items()
                      if k.startswith("train/") and "loss" in k and torch.is_tensor(v) and not torch.isfinite(v).all()}
            said = f" ({', '.join(f'{k} = {v}' for k, v in sorted(losses.items())[:2])})" if losses else ""
            raise TrainingDiverged(
                f"training diverged at step {trainer.global_step} (epoch {trainer.current_epoch}): weight {bad} is "
                f"no longer finite{said}. No checkpoint of these weights was written. Lower the learning rate "
                f"(e.g. model.lr) or clip gradients, and train again or resume from the last good checkpoint."
            )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Buffers may legitimately hold NaN (``hvae_finetune``'s "not measured yet" eps0); parameters may not.
        params = {n for n, _ in pl_module.named_parameters()}
        bad = first_non_finite((n, t) for n, t in checkpoint.get("state_dict", {}).items() if n in params)
        if bad is not None:
            raise TrainingDiverged(
                f"refusing to write a checkpoint at step {trainer.global_step}: weight {bad} is not finite. The last "
                f"good checkpoint is kept. Lower the learning rate (e.g. model.lr) or clip gradients."
            )


class CheckpointOnInterrupt(pl.Callback):
    """On Ctrl-C (KeyboardInterrupt) or SIGTERM during fitting, save the current state to ``path``.

    Resuming from it restores the weights, optimizers, RNG states and step counters of the interrupted step; the
    interrupted epoch's batches then start over (the loaders' order depends on the epoch only).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.saved_step: int | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.saved_step = int(checkpoint.get("global_step", trainer.global_step))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.global_step == 0 or trainer.global_step == self.saved_step or trainer.fast_dev_run:
            return  # nothing trained since the last checkpoint
        try:
            trainer.save_checkpoint(self.path)
        except Exception as err:  # the interruption is what gets reported; the run stays resumable from before
            print(f"warning: could not save the interrupted state to {self.path}: {err}", file=sys.stderr)
