"""Axiomatic counterfactual metrics: Composition and Reversibility (Monteiro et al. 2023; Melistas et al. 2024 §3.3).

**Composition** (eq. 7): the null intervention ``f_∅`` abducts the noise of ``x`` and predicts again with the
factual parents (no action step); applying it ``m`` times should leave the image unchanged::

    x_0 = x,   x_{k+1} = f_∅(x_k, pa) = model.counterfactual(x_k, pa, do={}),
    composition^m(x, pa) = d(x, x_m)            for each m in m_values (the benchmark uses 1 and 10)

**Reversibility**: intervening and then intervening back should return the original image::

    x* = model.counterfactual(x, pa, do),   pa* = pa with the values of do,
    x** = model.counterfactual(x*, pa*, do={a: pa[a] for a in do}),
    reversibility(x, pa, do) = d(x, x**)

``d`` is any per-image distance of :mod:`callbacks.metrics.distances` (pixel L1 on 0–255, LPIPS, embedding L1).

Differences from the benchmark's code (gulnazaki/counterfactual-benchmark, ``evaluation/metrics/composition.py``),
on purpose:

* Its cycle abducts *and re-predicts the parents* through the parent mechanisms and feeds both back. Under our
  contract (``lightning_modules.base``) models expose only the image mechanism, so the factual parents are kept;
  a parent SCM with exact abduction reproduces them, so the two agree when abduction is exact.
* Set-level values are means over images of per-image distances (float64 sums / counts, the same on one or
  many processes), not means of per-batch means (its LPIPS is one mean per batch, and batch sizes differ by
  model); the standard deviation reported next to each mean (the paper's subscripts) is the population std
  over images, from float64 sums of squares.
* The model runs in eval mode under ``no_grad`` and its ``training`` flags are restored; the distances'
  networks likewise (:func:`~lightning_modules.base.evaluating`).

Reversibility with the image-mechanism contract: parents downstream of an intervened parent are not recomputed;
if a model's intervention also changes other parents (e.g. do(thickness) changes intensity in MorphoMNIST),
pass all changed parents in ``do`` so that the way back restores them too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from callbacks.metrics.distances import PixelL1
from lightning_modules.networks.frozen import evaluating

__all__ = [
    "Composition",
    "Reversibility",
    "composition_cycles",
    "composition_key",
    "null_intervention_chain",
    "reversibility",
]

Distance = Callable[[Tensor, Tensor], Tensor]


def composition_key(distance: str, m: int) -> str:
    """Key of composition^m under ``distance``: ``"<distance>/<m>"``, e.g. ``"l1/10"``."""
    return f"{distance}/{m}"


def _default_distances(distances: Mapping[str, Distance] | None) -> Mapping[str, Distance]:
    if distances is None:
        return {"l1": PixelL1()}
    if not distances:
        raise ValueError("at least one distance is needed")
    for name in distances:
        if not name or "/" in name:
            raise ValueError(f"distance names must be non-empty and contain no '/', got {name!r}")
    return distances


def _distance_modules(distances: Mapping[str, Distance]) -> list[nn.Module]:
    return [d for d in distances.values() if isinstance(d, nn.Module)]


def _check_m_values(m_values: Sequence[int]) -> tuple[int, ...]:
    ms = tuple(sorted({int(m) for m in m_values}))
    if not ms or ms[0] < 1 or any(int(m) != m for m in m_values):
        raise ValueError(f"m_values must be positive integers, got {tuple(m_values)}")
    return ms


# -- functional cores -------------------------------------------------------------------------------------
def null_intervention_chain(
    model: nn.Module, x: Tensor, pa: Mapping[str, Tensor], m_max: int
) -> list[Tensor]:
    """``[x_1, ..., x_{m_max}]``, ``x_{k+1} = model.counterfactual(x_k, pa, do={})``, in eval mode, no grad."""
    images, current = [], x
    with evaluating(model):
        for _ in range(m_max):
            current = model.counterfactual(current, pa, {})
            images.append(current)
    return images


def composition_cycles(
    model: nn.Module,
    x: Tensor,
    pa: Mapping[str, Tensor],
    m_values: Sequence[int] = (1, 10),
    distances: Mapping[str, Distance] | None = None,
) -> dict[str, Tensor]:
    """Per-image composition^m for every ``m`` and distance: ``{composition_key(name, m): [B]}``.

    One chain of ``max(m_values)`` null interventions serves every ``m``.

    :param model: anything with ``counterfactual(x, pa, do)`` (the ``CounterfactualModule`` contract).
    :param x: images [B, C, H, W] in [0, 1]; ``pa``: the factual parents, name -> [B].
    :param distances: name -> ``d(x, y) -> [B]``; default ``{"l1": PixelL1()}``.
    """
    distances = _default_distances(distances)
    ms = _check_m_values(m_values)
    chain = null_intervention_chain(model, x, pa, ms[-1])
    with evaluating(*_distance_modules(distances)):
        return {composition_key(name, m): d(x, chain[m - 1]) for m in ms for name, d in distances.items()}


def reversibility(
    model: nn.Module,
    x: Tensor,
    pa: Mapping[str, Tensor],
    do: Mapping[str, Tensor],
    distances: Mapping[str, Distance] | None = None,
    x_star: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-image ``d(x, x**)`` after do(pa*) and back to do(pa): ``{name: [B]}``.

    :param do: the intervention, name -> value [B]; its names must be parents.
    :param x_star: the counterfactual ``model.counterfactual(x, pa, do)`` when the caller has already made it
        (the metrics callback judges that same x* for effectiveness, minimality and realism): only the way back
        is then computed. ``None`` makes x* here. For a stochastic model the two differ: a second x* is another
        draw of the model's noise, and the way back then starts from an image no other metric saw.
    """
    distances = _default_distances(distances)
    if not do:
        raise ValueError("reversibility needs a non-empty intervention")
    unknown = set(do) - set(pa)
    if unknown:
        raise KeyError(f"intervention on unknown attribute(s) {sorted(unknown)}; parents are {sorted(pa)}")
    if x_star is not None and x_star.shape != x.shape:
        raise ValueError(f"x_star must have the images' shape {tuple(x.shape)}, got {tuple(x_star.shape)}")
    with evaluating(model):
        if x_star is None:
            x_star = model.counterfactual(x, pa, do)
        x_back = model.counterfactual(x_star, {**pa, **do}, {name: pa[name] for name in do})
    with evaluating(*_distance_modules(distances)):
        return {name: d(x, x_back) for name, d in distances.items()}


# -- torchmetrics wrappers --------------------------------------------------------------------------------
class _PerImageMeans(Metric):
    """Set-level mean and std of several per-image values, from float64 sums, sums of squares and a count.

    ``compute()`` returns ``{key: mean, key + "/std": population std}`` (NaN for an empty set). With
    ``keep_per_sample=True`` the per-image values (and the dataset indices passed to ``update``, -1 when none
    was given) are also kept in ``cat`` states for a per-sample CSV, read back with :meth:`per_sample`; they
    cost memory proportional to the set.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        keys: Sequence[str],
        distances: Mapping[str, Distance],
        keep_per_sample: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.keys = list(keys)
        self.keep_per_sample = keep_per_sample
        # Held as submodules so that ``metric.to(device)`` moves their networks too.
        self.distances = nn.ModuleDict({k: d for k, d in distances.items() if isinstance(d, nn.Module)})
        self._plain_distances = {k: d for k, d in distances.items() if not isinstance(d, nn.Module)}
        for i, _ in enumerate(self.keys):
            self.add_state(f"sum_{i}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"sumsq_{i}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            if keep_per_sample:
                self.add_state(f"values_{i}", [], dist_reduce_fx="cat")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if keep_per_sample:
            self.add_state("index", [], dist_reduce_fx="cat")

    def _distance_map(self) -> dict[str, Distance]:
        return {**dict(self.distances.items()), **self._plain_distances}

    def _accumulate(self, values: Mapping[str, Tensor], index: Tensor | None) -> None:
        batch = None
        for i, key in enumerate(self.keys):
            v = values[key].detach().to(torch.float64).flatten()
            if batch is None:
                batch = v.numel()
            elif v.numel() != batch:
                raise ValueError(f"{key}: {v.numel()} values for a batch of {batch}")
            setattr(self, f"sum_{i}", getattr(self, f"sum_{i}") + v.sum())
            setattr(self, f"sumsq_{i}", getattr(self, f"sumsq_{i}") + v.square().sum())
            if self.keep_per_sample:
                getattr(self, f"values_{i}").append(v)
        self.total += batch
        if self.keep_per_sample:
            if index is None:
                index = torch.full((batch,), -1, dtype=torch.long, device=self.total.device)
            elif index.numel() != batch:
                raise ValueError(f"index has {index.numel()} entries for a batch of {batch}")
            self.index.append(index.detach().to(device=self.total.device, dtype=torch.long).flatten())

    def compute(self) -> dict[str, Tensor]:
        out = {}
        n = self.total.to(torch.float64)
        for i, key in enumerate(self.keys):
            if self.total == 0:
                nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
                out[key], out[f"{key}/std"] = nan, nan.clone()
                continue
            mean = getattr(self, f"sum_{i}") / n
            var = (getattr(self, f"sumsq_{i}") / n - mean.square()).clamp_min(0.0)
            out[key], out[f"{key}/std"] = mean, var.sqrt()
        return out

    def per_sample(self) -> dict[str, Tensor]:
        """``{"index": [N], key: [N], ...}`` over everything seen (synchronised across processes like
        ``compute``); requires ``keep_per_sample=True``."""
        if not self.keep_per_sample:
            raise RuntimeError(f"{type(self).__name__}(keep_per_sample=False) keeps no per-sample values")
        with self.sync_context(should_sync=self.sync_on_compute):

            def cat(state: Any) -> Tensor:
                if isinstance(state, list) and not state:
                    return torch.empty(0, device=self.total.device)
                return dim_zero_cat(state)

            out = {"index": cat(self.index).long()}
            for i, key in enumerate(self.keys):
                out[key] = cat(getattr(self, f"values_{i}")).to(torch.float64)
        return out


class Composition(_PerImageMeans):
    """Composition^m over a set: mean (and std) over images of ``d(x, f_∅^m(x))`` for each m and distance.

    ``update(model, x, pa, index=None)`` runs the null-intervention chain (:func:`composition_cycles`);
    ``compute()`` returns ``{"l1/1": ..., "l1/1/std": ..., "l1/10": ..., ...}``.

    :param distances: name -> per-image distance; default ``{"l1": PixelL1()}``. ``nn.Module`` distances
        become submodules (moved by ``.to``); pass the same instances to several metrics to share them.
    :param m_values: numbers of null interventions (default 1 and 10, as in the benchmark).
    :param keep_per_sample: also keep per-image values for :meth:`per_sample` (memory grows with the set).
    """

    def __init__(
        self,
        distances: Mapping[str, Distance] | None = None,
        m_values: Sequence[int] = (1, 10),
        keep_per_sample: bool = False,
        **kwargs: Any,
    ) -> None:
        distances = _default_distances(distances)
        self.m_values = _check_m_values(m_values)
        keys = [composition_key(name, m) for m in self.m_values for name in distances]
        super().__init__(keys, distances, keep_per_sample, **kwargs)

    def update(
        self, model: nn.Module, x: Tensor, pa: Mapping[str, Tensor], index: Tensor | None = None
    ) -> None:
        self._accumulate(composition_cycles(model, x, pa, self.m_values, self._distance_map()), index)


class Reversibility(_PerImageMeans):
    """Reversibility over a set: mean (and std) over images of ``d(x, x**)``, x** = back from do(pa*) to pa.

    ``update(model, x, pa, do, index=None, x_star=None)``; ``compute()`` returns ``{"l1": ..., "l1/std": ...,
    ...}``. ``x_star``: the counterfactual already made from ``(x, pa, do)``, see :func:`reversibility`.
    One instance per kind of intervention (e.g. per intervened attribute) keeps the sets apart.
    """

    def __init__(
        self, distances: Mapping[str, Distance] | None = None, keep_per_sample: bool = False, **kwargs: Any
    ) -> None:
        distances = _default_distances(distances)
        super().__init__(list(distances), distances, keep_per_sample, **kwargs)

    def update(
        self,
        model: nn.Module,
        x: Tensor,
        pa: Mapping[str, Tensor],
        do: Mapping[str, Tensor],
        index: Tensor | None = None,
        x_star: Tensor | None = None,
    ) -> None:
        self._accumulate(reversibility(model, x, pa, do, self._distance_map(), x_star), index)
