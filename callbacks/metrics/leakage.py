"""How much of an attribute is left in a model's abducted code: a cross-validated linear probe.

IFcVAE-GAN's auxiliary network A_ψ (eq. 5) is trained *during* the adversarial game, so its accuracy near
chance only says that the current A_ψ cannot read the attribute from ẑ, not that ẑ is free of it: an encoder
that keeps moving the information (or flips its sign, which maximising the unbounded L_aux rewards) defeats a
lagging adversary while the decoder can still read it. The test that settles it is a *fresh* classifier fitted
after training on frozen codes (Elazar and Goldberg, 2018, "Adversarial Removal of Demographic Attributes
from Text Data", found the same gap). :class:`LinearProbeLeakage` fits an L2-regularised logistic regression
on the codes of one half of the evaluated set and reports its balanced accuracy on the other half (0.5: no
linearly readable attribute; 1.0: fully readable), averaged over the two folds.

Samples are assigned to folds by the parity of their dataset index and sorted by it before fitting, and the
fit is a deterministic full-batch L-BFGS in float64, so the value does not depend on the batch order or on
the number of processes (the codes are gathered with torchmetrics' ``cat`` reduction).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["LinearProbeLeakage", "fit_logistic_regression", "linear_probe_balanced_accuracy"]


def fit_logistic_regression(codes: Tensor, labels: Tensor, l2: float = 1e-3, max_iter: int = 500
                            ) -> tuple[Tensor, Tensor]:
    """Weights and bias minimising mean BCE + l2/2 ‖w‖² (the bias is not penalised), by L-BFGS in float64."""
    # Lightning evaluates under torch.inference_mode, whose tensors cannot enter autograd: leave it and clone.
    with torch.inference_mode(False), torch.enable_grad():
        codes, labels = codes.to(torch.float64).clone(), labels.to(torch.float64).clone()
        params = torch.zeros(codes.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                      tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            w, b = params[:-1], params[-1]
            loss = F.binary_cross_entropy_with_logits(codes @ w + b, labels) + 0.5 * l2 * w.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return params[:-1].detach(), params[-1].detach()


def _balanced_accuracy(predicted: Tensor, labels: Tensor) -> Tensor:
    """Mean of the true-positive and true-negative rates; NaN when a class is absent."""
    positive = labels > 0.5
    if positive.all() or not positive.any():
        return torch.tensor(float("nan"), dtype=torch.float64)
    tpr = predicted[positive].double().mean()
    tnr = (~predicted[~positive]).double().mean()
    return (tpr + tnr) / 2


def linear_probe_balanced_accuracy(codes: Tensor, labels: Tensor, index: Tensor, l2: float = 1e-3) -> Tensor:
    """Two-fold balanced accuracy of a logistic-regression probe reading ``labels`` from ``codes`` [N, D].

    Folds are the even and the odd ``index`` values; features are standardised with the training fold's
    statistics. NaN when a fold lacks one of the two classes.
    """
    if codes.shape[0] != labels.shape[0] or codes.shape[0] != index.shape[0]:
        raise ValueError(f"codes, labels and index must have the same length, got {codes.shape[0]}, "
                         f"{labels.shape[0]} and {index.shape[0]}")
    order = torch.argsort(index)
    codes, labels, index = codes[order].flatten(1).double().cpu(), labels[order].double().cpu(), index[order].cpu()
    even = index % 2 == 0
    scores = []
    for train, held_out in ((even, ~even), (~even, even)):
        if labels[train].unique().numel() < 2:
            return torch.tensor(float("nan"), dtype=torch.float64)
        mean, std = codes[train].mean(0), codes[train].std(0).clamp_min(1e-8)
        w, b = fit_logistic_regression((codes[train] - mean) / std, labels[train], l2)
        predicted = ((codes[held_out] - mean) / std) @ w + b > 0
        scores.append(_balanced_accuracy(predicted, labels[held_out]))
    return torch.stack(scores).mean()


class LinearProbeLeakage(Metric):
    """:func:`linear_probe_balanced_accuracy` over every code seen (gathered across processes)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, l2: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.l2 = l2
        self.add_state("codes", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, codes: Tensor, labels: Tensor, index: Tensor) -> None:
        self.codes.append(codes.detach().flatten(1).to(torch.float32))
        self.labels.append(labels.detach().to(torch.float32).reshape(-1))
        self.index.append(index.detach().to(torch.long).reshape(-1))

    def compute(self) -> Tensor:
        if isinstance(self.codes, list) and not self.codes:  # after a DDP sync the state is one tensor
            return torch.tensor(float("nan"), dtype=torch.float64)
        return linear_probe_balanced_accuracy(
            dim_zero_cat(self.codes), dim_zero_cat(self.labels), dim_zero_cat(self.index), self.l2
        )
