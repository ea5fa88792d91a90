"""Effectiveness of counterfactuals: does the counterfactual image show the parent values it was asked for?

The benchmark's eq. (8) (Melistas et al., "Benchmarking Counterfactual Image Generation", §3.3):
``effectiveness_i(x*, pa_i*) = d(pa_i*, g_θ^i(x*))`` with an anti-causal predictor ``g_θ^i`` of parent ``i``
applied to the counterfactual ``x*``. The targets are *all* counterfactual parents: the intervened one and
those its mechanisms changed downstream. Tables 3–4 report one value per (intervened parent, measured parent):

* continuous parent: mean absolute error in the parent's **original units** (both sides denormalised with the
  :class:`~datamodules.base.Attribute`), ``MAE = Σ|ŷ - y| / n``;
* categorical parent: accuracy, ``Σ[ŷ = y] / n``;
* binary parent: F1 over the **whole set**, ``F1 = 2·TP / (2·TP + FP + FN)`` from set-level counts (a mean of
  per-batch F1 scores is not the F1 of the set and depends on the batch size).

Every value is a ratio of set-level sums (float64 for absolute errors, long for counts), so it is the same on
one process or many. An empty set gives NaN; a set with no positive target and no positive prediction has F1
0, as ``sklearn.metrics.f1_score`` with its default ``zero_division``.

Predictions and targets are in *batch units* (the batch contract of ``datamodules.base``: continuous
normalised to [-1, 1], binary 0./1., categorical class index as float). :class:`Predictor` turns a network's
output into those units and :func:`predict_parents` runs a set of predictors the way a metric must: eval mode,
no gradients, train flags restored afterwards (BatchNorm running statistics untouched, dropout off).

:class:`MorphometricEffectiveness` replaces learned predictors by measurements (Morpho-MNIST's thickness and
intensity, ``datamodules.synthetic.morphomnist.oracle_measure``), reported as MAE in original units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from datamodules.base import Attribute
from lightning_modules.networks.frozen import evaluating

__all__ = [
    "Effectiveness",
    "MorphometricEffectiveness",
    "Predictor",
    "absolute_error_sums",
    "accuracy_counts",
    "effectiveness_score",
    "evaluating",
    "f1_counts",
    "f1_from_counts",
    "anti_causal_predictors",
    "predict_parents",
]


def _ratio(numerator: Tensor, count: Tensor) -> Tensor:
    """``numerator / count`` as float64, NaN for an empty set."""
    if count == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=numerator.device)
    return numerator.to(torch.float64) / count.to(torch.float64)


def _flat(values: Any, name: str) -> Tensor:
    t = torch.as_tensor(values)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape [B] (or [B, 1]), got {tuple(t.shape)}")
    return t


def _check_pair(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    preds, target = _flat(preds, "predictions"), _flat(target, "targets")
    if preds.shape != target.shape:
        raise ValueError(f"predictions and targets must have the same shape, got {tuple(preds.shape)} and "
                         f"{tuple(target.shape)}")
    return preds, target.to(preds.device)


# -- functional cores -------------------------------------------------------------------------------------
def absolute_error_sums(preds: Tensor, target: Tensor, attribute: Attribute, preds_raw: bool = False
                        ) -> tuple[Tensor, Tensor]:
    """Σ|ŷ - y| in the attribute's original units (float64) and the number of values (long).

    :param preds, target: values [B] in batch units (continuous: normalised to [-1, 1]).
    :param preds_raw: the predictions are already in original units (e.g. morphometric measurements).
    """
    preds, target = _check_pair(preds, target)
    raw_pred = preds.to(torch.float64) if preds_raw else _denormalise64(attribute, preds)
    diff = raw_pred - _denormalise64(attribute, target)
    return diff.abs().sum(), torch.tensor(diff.numel(), dtype=torch.long, device=diff.device)


def _denormalise64(attribute: Attribute, value: Tensor) -> Tensor:
    # Attribute.denormalise works in float32; errors of ~0.1 units on a 0–255 scale deserve float64.
    value = value.to(torch.float64)
    if attribute.kind != "continuous":
        return value
    return (value + 1.0) * 0.5 * (attribute.high - attribute.low) + attribute.low


def accuracy_counts(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Number of predicted class indices equal to the targets, and number of values (both long)."""
    preds, target = _check_pair(preds, target)
    hits = preds.round().long() == target.round().long()
    return hits.sum().long(), torch.tensor(hits.numel(), dtype=torch.long, device=hits.device)


def f1_counts(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(TP, FP, FN) of hard binary predictions (0./1., positive iff > 0.5) against 0./1. targets."""
    preds, target = _check_pair(preds, target)
    p, t = preds > 0.5, target > 0.5
    return (p & t).sum().long(), (p & ~t).sum().long(), (~p & t).sum().long()


def f1_from_counts(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    """``2·TP / (2·TP + FP + FN)`` (float64); 0 when there is no positive at all (sklearn's default)."""
    denominator = 2 * tp + fp + fn
    if denominator == 0:
        return torch.tensor(0.0, dtype=torch.float64, device=tp.device)
    return (2 * tp).to(torch.float64) / denominator.to(torch.float64)


def effectiveness_score(preds: Tensor, target: Tensor, attribute: Attribute) -> Tensor:
    """The benchmark's distance for one parent over a whole tensor: MAE (original units), accuracy or F1."""
    if attribute.kind == "continuous":
        return _ratio(*absolute_error_sums(preds, target, attribute))
    if attribute.kind == "categorical":
        return _ratio(*accuracy_counts(preds, target))
    if _flat(preds, "predictions").numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return f1_from_counts(*f1_counts(preds, target))


# -- predictors -------------------------------------------------------------------------------------------
@dataclass
class Predictor:
    """An anti-causal predictor ``g_θ^i`` of one parent, with the conventions the metric needs.

    ``net(x)`` (no ``context``) or ``net(x, c)`` with ``c`` the float tensor [B, len(context)] of the context
    parents in batch units, stacked in the order of ``context``. The output is

    * continuous: the normalised value, [B] or [B, 1];
    * binary: one logit per image (``logits=True``) or a probability, [B] or [B, 1]; positive iff p > 0.5;
    * categorical: class logits or probabilities [B, K]; the prediction is the argmax.

    :param context: parents the predictor is conditioned on (the published MorphoMNIST thickness predictor
        takes intensity: ``Predictor(net, thickness, context=("intensity",))``).
    :param context_from: where the context values come from: ``"target"`` (the counterfactual's requested
        parent values, as the published benchmark does) or ``"predicted"`` (read from the image by the context
        parents' own predictors, e.g. intensity predicted from ``x*``), see :func:`predict_parents`.
    """

    net: nn.Module
    attribute: Attribute
    context: tuple[str, ...] = ()
    context_from: Literal["target", "predicted"] = "target"
    logits: bool = True

    def __post_init__(self) -> None:
        if self.context_from not in ("target", "predicted"):
            raise ValueError(f"context_from must be 'target' or 'predicted', got {self.context_from!r}")
        self.context = tuple(self.context)
        if self.attribute.name in self.context:
            raise ValueError(f"predictor of {self.attribute.name!r} cannot take its own parent as context")

    def __call__(self, x: Tensor, context: Mapping[str, Tensor] | None = None) -> Tensor:
        """Predicted values [B] in batch units (continuous normalised, binary 0./1., categorical index)."""
        if self.context:
            missing = [c for c in self.context if context is None or c not in context]
            if missing:
                raise KeyError(f"predictor of {self.attribute.name!r} needs the context parent(s) {missing}")
            c = torch.stack([torch.as_tensor(context[n]).to(x.device, x.dtype).reshape(-1) for n in self.context],
                            dim=1)
            out = self.net(x, c)
        else:
            out = self.net(x)
        kind = self.attribute.kind
        if kind == "categorical":
            if out.ndim != 2:
                raise ValueError(f"categorical predictor of {self.attribute.name!r} must return [B, K], got "
                                 f"{tuple(out.shape)}")
            return out.argmax(dim=1).to(torch.float32)
        out = _flat(out, f"output of the predictor of {self.attribute.name!r}").to(torch.float32)
        if kind == "binary":
            return (out > 0.0 if self.logits else out > 0.5).to(torch.float32)
        return out


def anti_causal_predictors(model: Any, context_from: str = "target") -> dict[str, Predictor]:
    """Every target of an ``AntiCausalPredictor`` (``targets``, ``attributes``, ``conditions``, ``predictors``) as a
    :class:`Predictor`; the metric knows the model, the model does not know the metric."""
    return {
        t: Predictor(model.predictors[t], model.attributes[t], context=tuple(model.conditions.get(t, [])),
                     context_from=context_from, logits=True)
        for t in model.targets
    }


def predict_parents(predictors: Mapping[str, Predictor], x: Tensor, target: Mapping[str, Tensor] | None = None
                    ) -> dict[str, Tensor]:
    """Every predictor's values [B] on images ``x``, run under :func:`evaluating`.

    :param target: the counterfactual parents in batch units; the context of ``context_from="target"``
        predictors. ``context_from="predicted"`` predictors get the other predictors' outputs instead, so their
        context parents are predicted first (a cycle raises).
    """
    out: dict[str, Tensor] = {}
    pending = dict(predictors)
    with evaluating(*(p.net for p in predictors.values())):
        while pending:
            ready = [n for n, p in pending.items()
                     if p.context_from == "target" or all(c in out for c in p.context)]
            if not ready:
                raise ValueError(f"predicted contexts form a cycle or name a parent without predictor: "
                                 f"{ {n: p.context for n, p in pending.items()} }")
            for name in ready:
                p = pending.pop(name)
                out[name] = p(x, target if p.context_from == "target" else out)
    return out


# -- torchmetrics wrappers --------------------------------------------------------------------------------
class Effectiveness(Metric):
    """The benchmark's effectiveness table over a whole set: one value per (intervened, measured) parent.

    ``update(preds, target, intervened)``: ``preds`` and ``target`` map every measured parent to values [B] in
    batch units (predictions from :func:`predict_parents`, targets = the counterfactual parents);
    ``intervened`` is the parent name intervened upon in the whole batch, or a long tensor [B] of indices into
    ``intervened`` (one intervention per sample). ``compute()`` returns ``{(do, measured): value}`` with MAE
    (original units) for continuous, accuracy for categorical and set-level F1 for binary parents;
    :meth:`flatten` turns it into loggable ``"do_<do>/<measured>"`` keys.

    :param attributes: the measured parents (usually all the dataset's attributes).
    :param intervened: the parents interventions are made on (default: all of ``attributes``).
    """

    is_differentiable = False
    higher_is_better = None  # MAE is lower-is-better, accuracy and F1 higher-is-better
    full_state_update = False
    preds_raw = False

    def __init__(self, attributes: Sequence[Attribute], intervened: Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attributes = tuple(attributes)
        names = [a.name for a in self.attributes]
        self.intervened = tuple(intervened) if intervened is not None else tuple(names)
        if not self.attributes or not self.intervened:
            raise ValueError("Effectiveness needs at least one attribute and one intervened parent")
        # The intervened parents need not be measured: do(digit) is judged by the thickness it leaves.
        for do in self.intervened:
            for a in self.attributes:
                for state in self._state_names(a):
                    dtype = torch.float64 if state == "abs" else torch.long
                    self.add_state(self._key(do, a.name, state), torch.tensor(0, dtype=dtype), dist_reduce_fx="sum")

    @staticmethod
    def _key(do: str, measured: str, state: str) -> str:
        return f"do_{do}__{measured}__{state}"

    @staticmethod
    def _state_names(attribute: Attribute) -> tuple[str, ...]:
        return {"continuous": ("abs", "n"), "categorical": ("hits", "n"), "binary": ("tp", "fp", "fn", "n")
                }[attribute.kind]

    def _add(self, do: str, name: str, state: str, value: Tensor) -> None:
        key = self._key(do, name, state)
        setattr(self, key, getattr(self, key) + value)

    def _masks(self, intervened: str | Tensor, n: int, device: torch.device) -> list[tuple[str, Tensor | None]]:
        if isinstance(intervened, str):
            if intervened not in self.intervened:
                raise ValueError(f"intervened parent {intervened!r} is not among {self.intervened}")
            return [(intervened, None)]
        index = _flat(intervened, "intervened").to(device)
        if index.numel() != n:
            raise ValueError(f"intervened has {index.numel()} entries for {n} samples")
        return [(do, index == k) for k, do in enumerate(self.intervened)]

    def update(self, preds: Mapping[str, Tensor], target: Mapping[str, Tensor], intervened: str | Tensor) -> None:
        first = _flat(target[self.attributes[0].name], "targets")
        for do, mask in self._masks(intervened, first.numel(), first.device):
            if mask is not None and not mask.any():
                continue
            for a in self.attributes:
                if a.name not in preds or a.name not in target:
                    raise KeyError(f"no prediction or target for parent {a.name!r}")
                p, t = _check_pair(preds[a.name], target[a.name])
                if mask is not None:
                    p, t = p[mask.to(p.device)], t[mask.to(p.device)]
                self._update_one(do, a, p, t)

    def _update_one(self, do: str, a: Attribute, p: Tensor, t: Tensor) -> None:
        if a.kind == "continuous":
            absolute, n = absolute_error_sums(p, t, a, preds_raw=self.preds_raw)
            self._add(do, a.name, "abs", absolute)
        elif a.kind == "categorical":
            hits, n = accuracy_counts(p, t)
            self._add(do, a.name, "hits", hits)
        else:
            tp, fp, fn = f1_counts(p, t)
            for state, value in (("tp", tp), ("fp", fp), ("fn", fn)):
                self._add(do, a.name, state, value)
            n = torch.tensor(p.numel(), dtype=torch.long, device=p.device)
        self._add(do, a.name, "n", n)

    def compute(self) -> dict[tuple[str, str], Tensor]:
        out = {}
        for do in self.intervened:
            for a in self.attributes:
                state = {s: getattr(self, self._key(do, a.name, s)) for s in self._state_names(a)}
                if a.kind == "continuous":
                    out[(do, a.name)] = _ratio(state["abs"], state["n"])
                elif a.kind == "categorical":
                    out[(do, a.name)] = _ratio(state["hits"], state["n"])
                elif state["n"] == 0:
                    out[(do, a.name)] = torch.tensor(float("nan"), dtype=torch.float64, device=state["n"].device)
                else:
                    out[(do, a.name)] = f1_from_counts(state["tp"], state["fp"], state["fn"])
        return out

    @staticmethod
    def flatten(values: Mapping[tuple[str, str], Tensor], prefix: str = "") -> dict[str, Tensor]:
        """``{(do, measured): v}`` -> ``{f"{prefix}do_{do}/{measured}": v}`` for ``log_dict``."""
        return {f"{prefix}do_{do}/{measured}": v for (do, measured), v in values.items()}


class MorphometricEffectiveness(Effectiveness):
    """Effectiveness with measured instead of predicted parents: MAE in original units per (do, measured).

    ``update(measured, target, intervened)``: ``measured`` maps parent names to measurements [B] in
    **original units** (numpy or tensors, e.g. ``dict(zip(("thickness", "intensity"), oracle_measure(x_cf)))``),
    ``target`` the counterfactual parents in batch units. Measurements that are NaN (blank images) are left
    out of the MAE and counted in ``compute()["unmeasured"]``.

    :param attributes: the measured parents; all continuous.
    """

    preds_raw = True

    def __init__(self, attributes: Sequence[Attribute], intervened: Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        for a in attributes:
            if a.kind != "continuous":
                raise ValueError(f"morphometric effectiveness measures continuous parents; {a.name!r} is {a.kind}")
        super().__init__(attributes, intervened, **kwargs)
        self.add_state("unmeasured", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, measured: Mapping[str, Any], target: Mapping[str, Tensor], intervened: str | Tensor) -> None:
        first = _flat(target[self.attributes[0].name], "targets")
        values = {a.name: torch.as_tensor(np.asarray(measured[a.name]), dtype=torch.float64).to(first.device)
                  for a in self.attributes}
        finite = torch.stack([torch.isfinite(v) for v in values.values()]).all(dim=0)
        self.unmeasured += (~finite).sum()
        for do, mask in self._masks(intervened, first.numel(), first.device):
            keep = finite if mask is None else finite & mask
            for a in self.attributes:
                self._update_one(do, a, values[a.name][keep], _flat(target[a.name], "targets")[keep])

    def compute(self) -> dict[Any, Tensor]:
        out: dict[Any, Tensor] = dict(super().compute())
        out["unmeasured"] = self.unmeasured.clone()
        return out

    @staticmethod
    def flatten(values: Mapping[Any, Tensor], prefix: str = "") -> dict[str, Tensor]:
        return {(f"{prefix}do_{k[0]}/{k[1]}" if isinstance(k, tuple) else f"{prefix}{k}"): v
                for k, v in values.items()}
