"""The data contract shared by every dataset, model and metric.

Batch: a dict with
  ``x``     float image tensor [B, C, H, W] in **[0, 1]** (the one range used project-wide; models that
            want [-1, 1] convert inside their networks),
  ``pa``    dict attribute name -> float tensor [B] (binary: 0./1.; continuous: normalised; categorical:
            class index as float) in the order of ``CounterfactualDataModule.attributes``,
  ``index`` long tensor [B], the row of the image in the dataset's own files (global, unique across splits),
            used to look up ground-truth counterfactuals.

Attribute metadata lives on the DataModule and reaches models and callbacks by config interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytorch_lightning as pl
import torch

AttributeKind = Literal["binary", "continuous", "categorical"]


class DatasetError(RuntimeError):
    """A dataset file is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class Attribute:
    name: str
    kind: AttributeKind = "binary"
    num_classes: int | None = None

    def flip(self, value: torch.Tensor) -> torch.Tensor:
        """The single-parent intervention of a binary attribute: 0 <-> 1."""
        if self.kind != "binary":
            raise ValueError(f"flip() is defined for binary attributes; {self.name!r} is {self.kind}")
        return 1.0 - value


class CounterfactualDataModule(pl.LightningDataModule):
    """Base of every DataModule: attribute metadata and the optional ground-truth counterfactual oracle."""

    attributes: tuple[Attribute, ...] = ()

    @property
    def attribute_names(self) -> list[str]:
        return [a.name for a in self.attributes]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def has_true_counterfactuals(self) -> bool:
        """True when the data came from a builder that can re-render any image under an intervention."""
        return False

    def true_counterfactual(self, index: torch.Tensor, do: dict[str, torch.Tensor]) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1]: the images at ``index`` re-rendered with the attributes in ``do``
        set to the given values and every other generative factor unchanged, after the same preprocessing
        as the batches."""
        raise NotImplementedError(f"{type(self).__name__} has no ground-truth counterfactuals")


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles (or draws with replacement by ``weights``) with a generator seeded by ``seed + epoch``.

    The order of every epoch is then a function of the seed and the epoch number alone, as with
    ``DistributedSampler``: it does not depend on how much of the global RNG something else consumed, so a run
    resumed from a checkpoint sees exactly the batches the uninterrupted run would have. Lightning calls
    ``set_epoch`` at the start of every epoch.
    """

    def __init__(self, n: int, seed: int = 0, weights: torch.Tensor | None = None):
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            return iter(torch.randperm(self.n, generator=g).tolist())
        return iter(torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist())
