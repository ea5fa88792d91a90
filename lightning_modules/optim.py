"""The VAE family's optimiser discipline (counterfactual_benchmark App. A.2, after VDVAE): a linear learning-rate
warm-up, gradient-norm clipping, and skipping an update whose gradient norm is not finite or too large.

The conditional VAE and the HVAE train with it; they differ only in the norm's scale (the VAE compares the norm
divided by the number of pixels, the published thresholds being per pixel there, the HVAE the norm itself) and
in whether the warm-up counts skipped updates (the VAE steps its schedule on every batch, the HVAE on applied
updates only), which stays with each method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["clip_or_skip", "linear_warmup", "warmup_schedule"]


def linear_warmup(warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor min(1, (step + 1) / warmup_steps): linear warm-up, then constant (1 when
    ``warmup_steps`` <= 0)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`linear_warmup` as a scheduler of ``optimizer``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(int(warmup_steps)))


def clip_or_skip(params: Iterable[nn.Parameter], grad_clip: float | None, grad_skip: float | None,
                 scale: float = 1.0) -> tuple[torch.Tensor, bool]:
    """Clip the gradient norm of ``params`` (those with a gradient) at ``grad_clip · scale``; return the norm
    before clipping divided by ``scale``, and whether the update should be applied: not when that norm is not
    finite or is at least ``grad_skip``. ``None`` disables clipping or the threshold (non-finite norms are
    always skipped). The caller drops the gradients of a skipped update and counts it."""
    with_grad = [p for p in params if p.grad is not None]
    max_norm = math.inf if grad_clip is None else grad_clip * scale
    norm = torch.nn.utils.clip_grad_norm_(with_grad, max_norm) / scale if with_grad else torch.zeros(())
    apply = bool(torch.isfinite(norm)) and (grad_skip is None or float(norm) < grad_skip)
    return norm.detach(), apply
