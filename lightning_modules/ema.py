"""Exponential moving average (EMA) of a network's weights, for evaluation and checkpoints.

VDVAE-style models (the benchmark's HVAE, App. A.3; the reference code's VAEs) are evaluated with an EMA of
their weights, W_ema <- d·W_ema + (1 − d)·W after every update (d = 0.999): the raw weights of a model trained
with a large learning rate jitter from step to step, their average does not.

* :class:`ExponentialMovingAverage` holds the averaged copy (``torch.optim.swa_utils.AveragedModel`` with
  ``get_ema_multi_avg_fn``; buffers such as BatchNorm statistics are averaged too). It is an ``nn.Module``,
  so the copy is part of the owner's ``state_dict``: every checkpoint holds it, ``load_from_checkpoint`` and
  resuming restore it. Its parameters never require grad and belong to no optimizer.
* :class:`EMAMixin` wires it into a LightningModule: ``init_ema("net", decay)`` in ``__init__``,
  ``update_ema()`` after each optimizer step that was taken (a manual-optimization module calls it itself,
  so that skipped updates are not averaged in; an automatic-optimization module gets it from
  ``on_train_batch_end``), and ``ema_network()`` picks the network to run: the raw one in training mode,
  the average in eval mode. Lightning puts the module in eval mode for validation, test and prediction, and
  every metric callback runs the model under ``evaluating(...)``, so counterfactuals after training come from
  the average. A checkpoint written without an average (``decay=None``) loads into a module that keeps one:
  the average starts from the raw weights.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class ExponentialMovingAverage(nn.Module):
    """An EMA copy of ``model`` (see the module docstring).

    :param model: the network to average; deep-copied once, so the copy starts at its current weights.
    :param decay: d in W_ema <- d·W_ema + (1 − d)·W, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged network (same class and call signature as the source)."""
        return self.averaged.module

    @property
    def n_updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average ``model``'s current weights in (the first update copies them)."""
        self.averaged.update_parameters(model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class EMAMixin:
    """EMA of one network of a LightningModule (see the module docstring). Put it before the LightningModule
    base: ``class Model(EMAMixin, CounterfactualModule)``."""

    # Annotations only: a class attribute named like a submodule would shadow it (nn.Module keeps submodules in
    # _modules, which attribute lookup consults after the class).
    ema: ExponentialMovingAverage | None
    _ema_source: str

    def init_ema(self, attribute: str, decay: float | None) -> None:
        """Average ``getattr(self, attribute)`` with ``decay``; ``None`` or 0 disables the average."""
        self._ema_source = attribute
        self.ema = ExponentialMovingAverage(getattr(self, attribute), decay) if decay else None

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update(getattr(self, self._ema_source))

    def ema_network(self) -> nn.Module:
        """The raw network in training mode, its average in eval mode (the raw one when there is none)."""
        raw = getattr(self, self._ema_source)
        return raw if self.training or self.ema is None else self.ema.module

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.automatic_optimization:
            self.update_ema()
        super().on_train_batch_end(outputs, batch, batch_idx)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        if self.ema is not None and not any(k.startswith("ema.") for k in state):
            rank_zero_warn("the checkpoint holds no EMA weights: the average starts from its raw weights")
            prefix = f"{self._ema_source}."
            for key, value in list(state.items()):
                if key.startswith(prefix):
                    state[f"ema.averaged.module.{key[len(prefix):]}"] = value.clone()
            state["ema.averaged.n_averaged"] = torch.tensor(1, dtype=torch.long)
        super().on_load_checkpoint(checkpoint)
