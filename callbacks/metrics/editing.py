"""Attribute-editing metrics: reconstruction error, edit success rate and error against true counterfactuals.

These are the quantities of IFcVAE-GAN (Creswell et al., "Adversarial Information Factorization"), §4.1–4.2 and Tables 1–3:

* ``MSE``: mean squared error between an image ``x`` and its reconstruction ``x̂`` (images in [0, 1], so the
  paper's values are about 0.01–0.03) → :class:`ReconstructionMSE`;
* ``Ĉ_Smiling`` / ``Ĉ_Not-Smiling``: the fraction of images edited with ``do(y=1)`` / ``do(y=0)`` that an
  *independent* classifier (the oracle) assigns to the requested class → :class:`EditSuccessRate`;
* for synthetic data, where the true counterfactual can be rendered, pixel MSE and L1 between the model's
  counterfactual and the ground truth → :class:`TrueCounterfactualError`.

Every metric is a pure functional core (``*_counts``/``*_sums`` for one batch, a plain function for a whole
tensor) plus a torchmetrics ``Metric`` whose states are sums and counts reduced with ``sum``. Set-level values
are therefore ratios of set-level sums, never means of per-batch values, and they are the same on one process
or many (sums of floating-point values can differ in the last bit with the summation order; the sums of
squared/absolute errors are kept in float64 to make that negligible, so these metrics need a device with
float64 support: CPU or CUDA, not Apple MPS).

Thresholding follows torchmetrics' ``BinaryAccuracy``: a probability ``p`` is classified positive iff
``p > threshold`` (strictly), so ``p == 0.5`` counts as *negative* with the default threshold.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "EditSuccessRate",
    "FlipSuccessRate",
    "ReconstructionMSE",
    "TrueCounterfactualError",
    "edit_success_counts",
    "edit_success_rate",
    "error_sums",
    "reconstruction_mse",
    "true_counterfactual_error",
]


def _check_same_shape(preds: Tensor, target: Tensor) -> None:
    if preds.shape != target.shape:
        raise ValueError(f"predictions and targets must have the same shape, got {tuple(preds.shape)} and "
                         f"{tuple(target.shape)}")


def _ratio(numerator: Tensor, count: Tensor) -> Tensor:
    """``numerator / count`` as float64, NaN for an empty set (no samples is not a perfect score)."""
    if count == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=numerator.device)
    return numerator.to(torch.float64) / count.to(torch.float64)


# -- functional cores -------------------------------------------------------------------------------------
def error_sums(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sum of squared errors, sum of absolute errors (both float64) and number of elements (long)."""
    _check_same_shape(preds, target)
    diff = preds.to(torch.float64) - target.to(torch.float64)
    count = torch.tensor(diff.numel(), dtype=torch.long, device=diff.device)
    return diff.square().sum(), diff.abs().sum(), count


def reconstruction_mse(preds: Tensor, target: Tensor) -> Tensor:
    """Mean over all elements of all images of ``(preds - target)²``: the paper's MSE for ``preds = x̂``."""
    squared, _, count = error_sums(preds, target)
    return _ratio(squared, count)


def true_counterfactual_error(preds: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Pixel ``mse`` and ``l1`` (means over all elements) between counterfactuals and true counterfactuals."""
    squared, absolute, count = error_sums(preds, target)
    return {"mse": _ratio(squared, count), "l1": _ratio(absolute, count)}


def edit_success_counts(
    probs: Tensor, target: float | Tensor, threshold: float = 0.5, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Number of edits the classifier assigns to the target class, and number of edits considered.

    :param probs: the oracle's probabilities of the attribute on the edited images, shape [B].
    :param target: the intervened value, 0 or 1 (a float, or a tensor [B] for per-sample targets such as a flip).
    :param threshold: ``probs > threshold`` is positive; exactly ``threshold`` is negative.
    :param mask: optional boolean [B]; only edits where it is true count (e.g. inputs whose true label is
        positive, the protocol of the paper's Table 1).
    """
    if probs.ndim != 1:
        raise ValueError(f"probs must have shape [B], got {tuple(probs.shape)}")
    target = torch.as_tensor(target, device=probs.device).expand_as(probs)
    hit = (probs > threshold) == (target > 0.5)
    if mask is not None:
        if mask.shape != probs.shape:
            raise ValueError(f"mask must have shape {tuple(probs.shape)}, got {tuple(mask.shape)}")
        mask = mask.to(device=probs.device, dtype=torch.bool)
        hit = hit & mask
        total = mask.sum()
    else:
        total = torch.tensor(probs.numel(), device=probs.device)
    return hit.sum().long(), total.long()


def edit_success_rate(
    probs: Tensor, target: float | Tensor, threshold: float = 0.5, mask: Tensor | None = None
) -> Tensor:
    """The fraction of edits classified as ``target`` (the paper's Ĉ); NaN when no edit is considered."""
    hits, total = edit_success_counts(probs, target, threshold, mask)
    return _ratio(hits, total)


# -- torchmetrics wrappers --------------------------------------------------------------------------------
class ReconstructionMSE(Metric):
    """The paper's MSE over a whole set: sum of squared errors / number of elements (NaN if empty).

    The absolute errors are accumulated too, so that :class:`TrueCounterfactualError` only adds an L1 output.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_squared_error", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_absolute_error", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        squared, absolute, count = error_sums(preds, target)
        self.sum_squared_error += squared
        self.sum_absolute_error += absolute
        self.total += count

    def compute(self) -> Tensor:
        return _ratio(self.sum_squared_error, self.total)


class EditSuccessRate(Metric):
    """Ĉ over a whole set: edits classified as ``target`` / edits considered (NaN if none was considered).

    ``EditSuccessRate(target=1)`` fed with the oracle's probabilities on ``do(y=1)`` edits is Ĉ_Smiling,
    ``EditSuccessRate(target=0)`` on ``do(y=0)`` edits is Ĉ_Not-Smiling. ``update(probs, mask)`` restricts the
    count to a subset, e.g. ``mask = y == 1`` for the paper's protocol (inputs from the positive class only).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, target: float, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if target not in (0, 1):
            raise ValueError(f"target must be 0 or 1, got {target}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.target = float(target)
        self.threshold = float(threshold)
        self.add_state("hits", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, mask: Tensor | None = None) -> None:
        hits, total = edit_success_counts(probs, self.target, self.threshold, mask)
        self.hits += hits
        self.total += total

    def compute(self) -> Tensor:
        return _ratio(self.hits, self.total)


class FlipSuccessRate(EditSuccessRate):
    """The oracle's accuracy on the flips do(a = 1 − y) over a whole set (CDVAE-GAN Table 3):
    ``update(probs, target)`` with the oracle's probabilities on each input's flipped edit and the flipped
    label ``1 − y`` per sample."""

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(target=1, threshold=threshold, **kwargs)

    def update(self, probs: Tensor, target: Tensor) -> None:  # type: ignore[override]
        hits, total = edit_success_counts(probs, target, self.threshold)
        self.hits += hits
        self.total += total


class TrueCounterfactualError(ReconstructionMSE):
    """Pixel MSE and L1 between the model's counterfactuals and the ground-truth ones, over a whole set.

    ``compute()`` returns ``{"mse": ..., "l1": ...}`` (NaN if empty).
    """

    def compute(self) -> dict[str, Tensor]:
        return {
            "mse": _ratio(self.sum_squared_error, self.total),
            "l1": _ratio(self.sum_absolute_error, self.total),
        }
