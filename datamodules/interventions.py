"""Which interventions the counterfactual metrics ask for: single-parent, multi-parent and random, seeded.

An ``Intervention`` holds, per intervened parent, the new values (normalised, as batches carry them) and a
boolean mask of the samples it applies to; parents absent from it are not intervened on, so a model's causal
graph may change them as descendants (do(thickness) moves intensity). For a sample whose mask is False the
value equals the factual one and must be ignored, not applied as do(X = x).

How a new value is drawn for one parent (the benchmark's protocol, §3.3 and its code):

* binary: the flip ``1 - v``;
* categorical with K classes: uniformly among the K - 1 other classes;
* continuous: a value drawn uniformly from ``pool`` (the parent's values over the test set) among those in a
  different bin of ``Attribute.bins`` from the factual value, so that the intervention changes the parent by
  more than noise. A bin that holds the whole pool leaves nothing to draw from and raises an error.

Randomness comes only from the ``torch.Generator`` passed in, never from the global RNG, so evaluations are
reproducible and training RNG streams are untouched. Alternatively each sample's draw comes from its own
uniform number (``uniforms``, e.g. :func:`per_sample_uniforms` of the dataset row): the intervention on an
image then does not depend on the batch it sits in or on the number of processes, so a distributed
evaluation draws exactly the interventions of a single-process one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from datamodules.base import Attribute

__all__ = ["Intervention", "draw_new_values", "multi_parent", "per_sample_uniforms", "random_parents", "single_parent"]


@dataclass(frozen=True)
class Intervention:
    """New parent values ``values[name]`` [B] applied where ``mask[name]`` [B] is True."""

    values: dict[str, Tensor]
    mask: dict[str, Tensor]

    @property
    def names(self) -> list[str]:
        return list(self.values)

    def apply(self, pa: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The parents after the intervention, before any propagation to descendants."""
        out = dict(pa)
        for name, value in self.values.items():
            out[name] = torch.where(self.mask[name], value.to(pa[name].dtype), pa[name])
        return out


def per_sample_uniforms(index: Tensor, seed: int, stream: int = 0) -> Tensor:
    """One uniform number in [0, 1) per dataset row in ``index``, a function of (seed, stream, row) only."""
    rows = torch.as_tensor(index).detach().cpu().reshape(-1).tolist()
    return torch.tensor([torch.rand((), generator=torch.Generator().manual_seed(
        (int(seed) * 1_000_003 + int(stream)) * 1_000_000_007 + int(r))).item() for r in rows])


def _choose(n: int | Tensor, count: int, generator: torch.Generator | None, uniforms: Tensor | None) -> Tensor:
    """``count`` indices in [0, n): from ``uniforms`` when given, else drawn from ``generator``."""
    if uniforms is not None:
        return (uniforms * n).floor().long().clamp(max=torch.as_tensor(n) - 1)
    return torch.randint(int(n), (count,), generator=generator)


def draw_new_values(attribute: Attribute, values: Tensor, generator: torch.Generator | None,
                    pool: Tensor | None = None, uniforms: Tensor | None = None) -> Tensor:
    """A new value for every entry of ``values`` (normalised), different from it as the module docstring says;
    ``uniforms`` [B] in [0, 1), when given, replace the generator (one per entry)."""
    values = values.detach().to("cpu", torch.float32)
    if uniforms is not None and uniforms.shape != values.shape:
        raise ValueError(f"need one uniform per value, got {tuple(uniforms.shape)} for {tuple(values.shape)}")
    if attribute.kind == "binary":
        return 1.0 - values
    if attribute.kind == "categorical":
        k = int(attribute.num_classes)
        shift = 1 + _choose(k - 1, len(values), generator, uniforms)
        return ((values.round().long() + shift) % k).to(torch.float32)
    if pool is None or attribute.bins is None:
        raise ValueError(f"continuous parent {attribute.name!r} needs a pool of values and bins to draw from")
    pool = pool.detach().to("cpu", torch.float32).reshape(-1)
    pool_bins = attribute.bin_index(attribute.denormalise(pool))
    value_bins = attribute.bin_index(attribute.denormalise(values))
    out = torch.empty_like(values)
    for b in value_bins.unique().tolist():
        rows = torch.nonzero(value_bins == b).reshape(-1)
        candidates = pool[pool_bins != b]
        if len(candidates) == 0:
            raise ValueError(f"every pool value of {attribute.name!r} lies in bin {b}; no value from another bin "
                             f"exists. Use more bins or a wider pool.")
        u = None if uniforms is None else uniforms[rows]
        out[rows] = candidates[_choose(len(candidates), len(rows), generator, u)]
    return out


def single_parent(attributes: Sequence[Attribute], pa: Mapping[str, Tensor], target: str,
                  generator: torch.Generator | None, pools: Mapping[str, Tensor] | None = None,
                  uniforms: Tensor | None = None) -> Intervention:
    """do(target = a new value) for every sample (``uniforms``: one per sample instead of ``generator``)."""
    by_name = {a.name: a for a in attributes}
    if target not in by_name:
        raise ValueError(f"targets must be parents among {list(by_name)}, got {[target]}")
    pool = None if pools is None else pools.get(target)
    value = draw_new_values(by_name[target], pa[target], generator, pool, uniforms)
    return Intervention({target: value}, {target: torch.ones(len(value), dtype=torch.bool)})


def multi_parent(attributes: Sequence[Attribute], pa: Mapping[str, Tensor], targets: Sequence[str],
                 generator: torch.Generator | None, pools: Mapping[str, Tensor] | None = None,
                 uniforms: Callable[[int], Tensor] | None = None) -> Intervention:
    """do(each target = a new value) jointly, for every sample; targets are drawn in the order given.

    ``uniforms(stream)``, when given, returns one uniform per sample for a stream number (e.g.
    :func:`per_sample_uniforms` of the rows); target ``i`` is drawn from stream ``i`` instead of ``generator``.
    """
    by_name = {a.name: a for a in attributes}
    unknown = [t for t in targets if t not in by_name]
    if unknown or not targets:
        raise ValueError(f"targets must be parents among {list(by_name)}, got {list(targets)}")
    values, mask = {}, {}
    for i, name in enumerate(targets):
        pool = None if pools is None else pools.get(name)
        u = None if uniforms is None else uniforms(i)
        values[name] = draw_new_values(by_name[name], pa[name], generator, pool, u)
        mask[name] = torch.ones(len(values[name]), dtype=torch.bool)
    return Intervention(values, mask)


def random_parents(attributes: Sequence[Attribute], pa: Mapping[str, Tensor], generator: torch.Generator | None,
                   pools: Mapping[str, Tensor] | None = None, p: float = 0.5,
                   uniforms: Callable[[int], Tensor] | None = None) -> Intervention:
    """Each parent intervened on with probability ``p``, independently per sample, at least one per sample
    (a sample that drew none gets one parent chosen uniformly).

    With ``uniforms(stream)`` (one uniform per sample and stream) instead of ``generator``: parent ``j``'s new
    value comes from stream ``j``, whether it is chosen from stream ``K + j`` and the fallback parent from
    stream ``2K`` (``K`` parents), so a sample's intervention depends on its row only.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    names = [a.name for a in attributes]
    n, k = len(pa[names[0]]), len(names)
    if uniforms is None:
        chosen = torch.rand((n, k), generator=generator) < p
        empty = torch.nonzero(~chosen.any(1)).reshape(-1)
        chosen[empty, torch.randint(k, (len(empty),), generator=generator)] = True
    else:
        chosen = torch.stack([uniforms(k + j) < p for j in range(k)], dim=1)
        empty = torch.nonzero(~chosen.any(1)).reshape(-1)
        chosen[empty, _choose(k, len(empty), None, uniforms(2 * k)[empty])] = True
    full = multi_parent(attributes, pa, names, generator, pools, uniforms)
    return Intervention(full.values, {name: chosen[:, j] for j, name in enumerate(names)})
