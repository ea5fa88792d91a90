"""Reference counterfactuals: what a trivial "model" scores under exactly the protocol a method is judged by.

A metric means something only beside what a counterfactual that ignores its task scores. These three are
ordinary counterfactual models behind the ``CounterfactualModule`` contract (``counterfactual`` and
``reconstruct``), so every metric callback evaluates them unchanged, on the same images, with the same
interventions and the same judges as the model (``callbacks.references`` fits them and hands them out):

* :class:`IdentityCounterfactual`: x* = x, "do nothing". It preserves everything and changes nothing: a model
  whose *effect* (error against the true counterfactual where the intervention acts, an oracle's verdict on the
  intervened attribute) is not better than this one has not made the edit.
* :class:`MeanImageCounterfactual`: x* = the mean training image among those whose intervened parents have the
  counterfactual values (binary and categorical parents equal, continuous parents in the same bin); the mean of
  the whole pool for the null intervention. It ignores x: a model whose *preservation* (error against x where the
  intervention does not act, the non-intervened attributes an oracle reads) is not better than this one has lost
  the image.
* :class:`NearestTrainingImage`: the retrieval baseline, the training image nearest to x among those whose parents
  (all of them, after the intervention) equal the counterfactual parents. Distance: pixel L2 after area-averaging
  both images to ``resolution`` × ``resolution`` (16 by default: cheap, and it compares layout and colour rather
  than pixel noise); ``resolution=None`` compares full-resolution pixels. A real image with the requested parents
  that looks like x: a model should beat it on preservation and on the ground truth.

Parents are compared after discretisation (``Attribute.codes``): binary and categorical values as they are,
continuous values by the bin of their attribute's ``bins`` (10 equal-width bins over [low, high] when it has none),
so "equal parents" is defined for thickness and intensity too. When no training image has every requested value
(e.g. a rare combination of 38 face attributes), both the mean and the retrieval use the images whose codes differ
from the request in the fewest parents, a rule that reduces to exact matching whenever a match exists.

The training images come from a :class:`TrainingPool`: one pass over the training split (or a seeded subset of
``pool_size`` images), kept in memory as uint8 with the parents' codes and the retrieval features. References have
no exogenous noise: ``abduct`` raises, and metrics that read a model's code (the leakage probe) or its own
classifier skip them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from datamodules.base import Attribute
from lightning_modules.base import CounterfactualModule

__all__ = [
    "IdentityCounterfactual",
    "MeanImageCounterfactual",
    "NearestTrainingImage",
    "ReferenceCounterfactual",
    "TrainingPool",
    "parent_codes",
    "retrieval_features",
]

def parent_codes(pa: Mapping[str, Tensor], attributes: Sequence[Attribute]) -> Tensor:
    """Discrete codes [B, len(attributes)] (long, on the CPU) of parents in batch units (``Attribute.codes``)."""
    missing = [a.name for a in attributes if a.name not in pa]
    if missing:
        raise KeyError(f"parent codes need the parent(s) {missing}; pa has {sorted(pa)}")
    return torch.stack([a.codes(torch.as_tensor(pa[a.name]).detach().cpu()) for a in attributes], dim=1)


def retrieval_features(x: Tensor, resolution: int | None) -> Tensor:
    """[B, D] float32: images area-averaged to ``resolution`` (when larger) and flattened."""
    x = x.float()
    if resolution is not None and max(x.shape[-2:]) > resolution:
        x = F.adaptive_avg_pool2d(x, (resolution, resolution))
    return x.flatten(1)


def _closest(codes: Tensor, wanted: Tensor) -> Tensor:
    """[B, N] bool: for each request (row of ``wanted`` [B, k]) the rows of ``codes`` [N, k] that differ from it
    in the fewest parents (all rows when k = 0)."""
    mismatch = (codes[None, :, :] != wanted[:, None, :]).sum(-1)
    return mismatch == mismatch.min(dim=1, keepdim=True).values


class TrainingPool:
    """Training images (uint8 [N, C, H, W]), their parents' codes [N, k] and retrieval features [N, D].

    :param dataset: the training split (batch-contract items ``{"x", "pa", ...}``, ``x`` in [0, 1] from uint8
        files, so ``round(255 x)`` recovers the stored bytes).
    :param attributes: the DataModule's attributes, in its order.
    :param pool_size: keep a seeded random subset of this many images (None: all of them).
    :param resolution: side of the retrieval features (see :func:`retrieval_features`).
    """

    def __init__(self, dataset: Dataset, attributes: Sequence[Attribute], pool_size: int | None = None,
                 seed: int = 0, resolution: int | None = 16, batch_size: int = 512) -> None:
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be None or >= 1, got {pool_size}")
        n = len(dataset)
        if n == 0:
            raise ValueError("the reference counterfactuals need training images, but the training split is empty")
        if pool_size is not None and pool_size < n:
            chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:pool_size].sort().values
            dataset = Subset(dataset, chosen.tolist())
        self.attributes = tuple(attributes)
        self.resolution = resolution
        images, codes, features = [], [], []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        for batch in tqdm(loader, desc="Reference counterfactuals: reading the training images", unit="batch",
                          disable=len(dataset) < 5000):
            x = batch["x"]
            images.append(x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8))
            codes.append(parent_codes(batch["pa"], self.attributes))
            features.append(retrieval_features(x, resolution))
        self.images = torch.cat(images)
        self.codes = torch.cat(codes)
        self.features = torch.cat(features)

    def __len__(self) -> int:
        return len(self.images)

    def position(self, name: str) -> int:
        for i, a in enumerate(self.attributes):
            if a.name == name:
                return i
        raise KeyError(f"no parent {name!r}; the pool's parents are {[a.name for a in self.attributes]}")


class ReferenceCounterfactual(CounterfactualModule):
    """Base of the reference counterfactuals: ``fit(pool)`` once, then ``counterfactual`` / ``reconstruct``.

    ``reconstruct(x, pa)`` is the null intervention ``counterfactual(x, pa, {})``. There is no noise to abduct.
    """

    #: whether ``fit`` needs a TrainingPool (the identity does not).
    needs_pool: bool = True

    def fit(self, pool: TrainingPool) -> ReferenceCounterfactual:
        return self

    def abduct(self, x: Tensor, pa: Mapping[str, Tensor]) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is a reference counterfactual: it has no exogenous noise")

    def reconstruct(self, x: Tensor, pa: Mapping[str, Tensor]) -> Tensor:
        return self.counterfactual(x, pa, {})

    def sample(self, pa: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a reference counterfactual: it does not sample")

    def _require_fit(self) -> TrainingPool:
        pool = getattr(self, "_pool", None)
        if pool is None:
            raise RuntimeError(f"{type(self).__name__}.fit(pool) must be called before counterfactual()")
        return pool


class IdentityCounterfactual(ReferenceCounterfactual):
    """x* = x: the counterfactual of doing nothing."""

    needs_pool = False

    def counterfactual(self, x: Tensor, pa: Mapping[str, Tensor], do: Mapping[str, Tensor]) -> Tensor:
        unknown = set(do) - set(pa)
        if unknown:
            raise KeyError(f"intervention on unknown attribute(s) {sorted(unknown)}; parents are {sorted(pa)}")
        return x.clone()


class MeanImageCounterfactual(ReferenceCounterfactual):
    """x* = the mean pool image among those whose intervened parents have the requested codes (see the module
    docstring); the whole pool's mean for ``do = {}``. Group means are computed once per set of intervened
    parents, in float64."""

    def fit(self, pool: TrainingPool) -> MeanImageCounterfactual:
        self._pool = pool
        self._groups: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] = {}
        return self

    def _group_means(self, columns: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """(keys [G, k], sums [G, D] float64, counts [G]) of the pool grouped by the codes in ``columns``."""
        if columns not in self._groups:
            pool = self._pool
            if columns:
                keys, inverse = torch.unique(pool.codes[:, list(columns)], dim=0, return_inverse=True)
            else:  # the null intervention: one group, the whole pool
                keys, inverse = torch.zeros((1, 0), dtype=torch.long), torch.zeros(len(pool), dtype=torch.long)
            sums = torch.zeros(len(keys), pool.images[0].numel(), dtype=torch.float64)
            for start in range(0, len(pool), 1024):
                chunk = pool.images[start:start + 1024].flatten(1).to(torch.float64)
                sums.index_add_(0, inverse[start:start + 1024], chunk)
            counts = torch.bincount(inverse, minlength=len(keys)).to(torch.float64)
            self._groups[columns] = (keys, sums, counts)
        return self._groups[columns]

    def counterfactual(self, x: Tensor, pa: Mapping[str, Tensor], do: Mapping[str, Tensor]) -> Tensor:
        pool = self._require_fit()
        names = [a.name for a in pool.attributes if a.name in do]
        unknown = set(do) - set(names)
        if unknown:
            raise KeyError(f"intervention on unknown attribute(s) {sorted(unknown)}; parents are "
                           f"{[a.name for a in pool.attributes]}")
        columns = tuple(pool.position(n) for n in names)
        keys, sums, counts = self._group_means(columns)
        wanted = (parent_codes({n: do[n] for n in names}, [pool.attributes[c] for c in columns]) if columns
                  else torch.zeros((x.shape[0], 0), dtype=torch.long))
        chosen = _closest(keys, wanted).to(torch.float64)  # [B, G]
        mean = (chosen @ sums) / (chosen @ counts)[:, None] / 255.0
        return mean.reshape(x.shape).to(device=x.device, dtype=x.dtype)


class NearestTrainingImage(ReferenceCounterfactual):
    """The retrieval baseline: the pool image nearest to x (pixel L2 of the pool's retrieval features) among
    those whose parents, all of them, have the counterfactual parents' codes (see the module docstring)."""

    def fit(self, pool: TrainingPool) -> NearestTrainingImage:
        self._pool = pool
        self._norms = pool.features.square().sum(1)
        return self

    def nearest(self, x: Tensor, cf_pa: Mapping[str, Tensor]) -> Tensor:
        """Pool positions [B] of the retrieved images."""
        pool = self._require_fit()
        candidates = _closest(pool.codes, parent_codes(cf_pa, pool.attributes))  # [B, N]
        query = retrieval_features(x.detach().cpu(), pool.resolution)
        distance = query.square().sum(1, keepdim=True) - 2.0 * query @ pool.features.T + self._norms[None]
        return distance.masked_fill(~candidates, float("inf")).argmin(dim=1)

    def counterfactual(self, x: Tensor, pa: Mapping[str, Tensor], do: Mapping[str, Tensor]) -> Tensor:
        unknown = set(do) - set(pa)
        if unknown:
            raise KeyError(f"intervention on unknown attribute(s) {sorted(unknown)}; parents are {sorted(pa)}")
        chosen = self.nearest(x, {**pa, **do})
        return self._pool.images[chosen].to(device=x.device, dtype=x.dtype).div_(255.0)
