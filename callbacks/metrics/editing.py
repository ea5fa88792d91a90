"""Attribute-editing metrics: reconstruction error, edit success rate and error against true counterfactuals.

These are the quantities of IFcVAE-GAN (Creswell et al., "Adversarial Information Factorization"), §4.1–4.2 and Tables 1–3:

* ``MSE``: mean squared error between an image ``x`` and its reconstruction ``x̂`` (images in [0, 1], so the
  paper's values are about 0.01–0.03) → :class:`ReconstructionMSE`;
* ``Ĉ_Smiling`` / ``Ĉ_Not-Smiling``: the fraction of images edited with ``do(y=1)`` / ``do(y=0)`` that an
  *independent* classifier (the oracle) assigns to the requested class → :class:`EditSuccessRate`;
* for synthetic data, where the true counterfactual can be rendered, pixel MSE and L1 between the model's
  counterfactual and the ground truth → :class:`TrueCounterfactualError`, and the same error split into the
  pixels the intervention changes and the rest → :class:`TrueCounterfactualSplitError`:

  - *effect*: the error of x* against the truth on the pixels where x and its true counterfactual differ (by
    more than ``tolerance`` in some channel): did the model make the change, and the right one?
  - *preservation*: the error of x* against x on all other pixels: did it keep what the intervention does not
    touch? ``changed_fraction`` is the share of pixels in the first set.

  Doing nothing (x* = x) scores a perfect preservation and the full size of the change as effect; an image
  that ignores x (the mean image) scores a poor preservation. A model is judged beside both
  (``lightning_modules.references``).

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
    "TrueCounterfactualSplitError",
    "changed_pixels",
    "edit_success_counts",
    "edit_success_rate",
    "error_sums",
    "reconstruction_mse",
    "split_error_sums",
    "true_counterfactual_error",
    "true_counterfactual_split_error",
]

#: a pixel is changed by the intervention when its true counterfactual differs from it by more than this in some
#: channel (images in [0, 1]): two grey levels, so that the JPEG ripple of one or two levels that an edit leaves in
#: the surrounding 8x8 blocks of the synthetic faces counts as preserved, not as the edit.
CHANGED_TOLERANCE = 2.0 / 255.0


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


def changed_pixels(x: Tensor, truth: Tensor, tolerance: float = CHANGED_TOLERANCE) -> Tensor:
    """bool [B, 1, H, W]: the pixels where ``truth`` differs from ``x`` by more than ``tolerance`` in some channel."""
    _check_same_shape(x, truth)
    if x.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(x.shape)}")
    return ((x.to(torch.float64) - truth.to(torch.float64)).abs() > tolerance).any(dim=1, keepdim=True)


def split_error_sums(preds: Tensor, x: Tensor, truth: Tensor, tolerance: float = CHANGED_TOLERANCE
                     ) -> dict[str, Tensor]:
    """Sums for the effect and preservation errors of counterfactuals ``preds`` of ``x`` with true counterfactuals
    ``truth`` (all [B, C, H, W]): squared and absolute errors against ``truth`` over the changed pixels' elements
    (``effect_*``) and against ``x`` over the others (``preservation_*``), float64, with their element counts
    (long) and the number of changed and of all pixels."""
    _check_same_shape(preds, x)
    changed = changed_pixels(x, truth, tolerance).expand_as(x)
    effect = (preds.to(torch.float64) - truth.to(torch.float64))[changed]
    kept = (preds.to(torch.float64) - x.to(torch.float64))[~changed]
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    device = x.device
    return {
        "effect_sq": effect.square().sum(), "effect_abs": effect.abs().sum(),
        "effect_n": torch.tensor(effect.numel(), dtype=torch.long, device=device),
        "preservation_sq": kept.square().sum(), "preservation_abs": kept.abs().sum(),
        "preservation_n": torch.tensor(kept.numel(), dtype=torch.long, device=device),
        "changed_pixels": torch.tensor(int(changed[:, 0].sum()), dtype=torch.long, device=device),
        "pixels": torch.tensor(pixels, dtype=torch.long, device=device),
    }


def true_counterfactual_split_error(preds: Tensor, x: Tensor, truth: Tensor,
                                    tolerance: float = CHANGED_TOLERANCE) -> dict[str, Tensor]:
    """Whole-image ``mse``/``l1`` against ``truth``, ``effect_mse``/``effect_l1`` (changed pixels, against the
    truth), ``preservation_mse``/``preservation_l1`` (the other pixels, against ``x``) and ``changed_fraction``;
    NaN for an empty set."""
    s = split_error_sums(preds, x, truth, tolerance)
    return {**true_counterfactual_error(preds, truth), **_split_values(s)}


def _split_values(s: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        "effect_mse": _ratio(s["effect_sq"], s["effect_n"]), "effect_l1": _ratio(s["effect_abs"], s["effect_n"]),
        "preservation_mse": _ratio(s["preservation_sq"], s["preservation_n"]),
        "preservation_l1": _ratio(s["preservation_abs"], s["preservation_n"]),
        "changed_fraction": _ratio(s["changed_pixels"], s["pixels"]),
    }


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


class TrueCounterfactualSplitError(TrueCounterfactualError):
    """:class:`TrueCounterfactualError` plus the effect / preservation split of the module docstring, over a whole
    set from float64 sums and element counts (the same on one process or many).

    ``update(preds, truth, x)``; ``compute()`` returns ``{"mse", "l1", "effect_mse", "effect_l1",
    "preservation_mse", "preservation_l1", "changed_fraction"}`` (NaN where a set is empty: an intervention that
    changes no pixel has no effect to measure).
    """

    _SPLIT_STATES = ("effect_sq", "effect_abs", "effect_n", "preservation_sq", "preservation_abs",
                     "preservation_n", "changed_pixels", "pixels")

    def __init__(self, tolerance: float = CHANGED_TOLERANCE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.tolerance = float(tolerance)
        for name in self._SPLIT_STATES:
            integer = name.endswith("_n") or name in ("changed_pixels", "pixels")
            self.add_state(name, torch.tensor(0, dtype=torch.long) if integer
                           else torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, x: Tensor) -> None:  # type: ignore[override]
        super().update(preds, target)
        for name, value in split_error_sums(preds, x, target, self.tolerance).items():
            setattr(self, name, getattr(self, name) + value)

    def compute(self) -> dict[str, Tensor]:
        return {**super().compute(), **_split_values({n: getattr(self, n) for n in self._SPLIT_STATES})}
