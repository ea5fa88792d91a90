"""The reference counterfactuals of a run (``lightning_modules.references``), fitted once, shared by the metrics.

``ReferenceCounterfactuals`` is a callback that holds no metric of its own. The metric callbacks
(``AttributeEditingMetrics``, ``CounterfactualMetrics``) ask it for the fitted references with
:func:`references_of` and evaluate each of them under exactly the model's protocol (same images, same
interventions, same judges), logging ``{stage}/reference/{name}/<the model's key>`` beside the model's
``{stage}/<key>``. The training pool is read once, on first use, from ``trainer.datamodule.dataset("train")``, so a
run that never evaluates pays nothing.

References are deterministic and do not change during training, so in validation they are evaluated on the first
validated epoch only and their values are logged again at later epochs (``callbacks.editing_metrics
.StagedEvaluation``); in test they are evaluated once, as the model is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from lightning_modules.references import (
    IdentityCounterfactual,
    MeanImageCounterfactual,
    NearestTrainingImage,
    ReferenceCounterfactual,
    TrainingPool,
)

__all__ = ["ReferenceCounterfactuals", "references_of"]


class ReferenceCounterfactuals(pl.Callback):
    """The reference counterfactuals named in the config, fitted on the training split on first use.

    :param models: name -> a ``ReferenceCounterfactual`` (built from its ``_target_`` entry); names become the
        ``reference/<name>/`` part of the logged keys. Default (None): ``identity``, ``mean`` and ``retrieval``.
    :param pool_size: read a seeded random subset of this many training images (None: the whole split).
    :param retrieval_resolution: side of the retrieval baseline's pixel features (None: full resolution).
    :param seed: seed of the pool subset.
    """

    def __init__(self, models: Mapping[str, ReferenceCounterfactual] | None = None, pool_size: int | None = None,
                 retrieval_resolution: int | None = 16, seed: int = 0) -> None:
        super().__init__()
        if models is None:
            models = {"identity": IdentityCounterfactual(), "mean": MeanImageCounterfactual(),
                      "retrieval": NearestTrainingImage()}
        bad = {k: type(v).__name__ for k, v in models.items() if not isinstance(v, ReferenceCounterfactual)}
        if bad:
            raise TypeError(f"references must be lightning_modules.references models, got {bad}")
        for name in models:
            if not name or "/" in name or name == "model":
                raise ValueError(f"reference names must be non-empty, without '/', and not 'model'; got {name!r}")
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be null or >= 1, got {pool_size}")
        self.models = dict(models)
        self.pool_size, self.retrieval_resolution, self.seed = pool_size, retrieval_resolution, seed
        self._fitted = False

    def get(self, trainer: pl.Trainer) -> dict[str, ReferenceCounterfactual]:
        """The fitted references (the pool is read on the first call)."""
        if not self._fitted and self.models:
            if any(m.needs_pool for m in self.models.values()):
                datamodule = trainer.datamodule
                train = datamodule.dataset("train")
                if len(train) == 0:
                    # e.g. an evaluation of the real MorphoMNIST test digits alone: nothing to average or retrieve
                    dropped = [n for n, m in self.models.items() if m.needs_pool]
                    rank_zero_info(f"[ReferenceCounterfactuals] the training split is empty: no {', '.join(dropped)} "
                                   "reference")
                    self.models = {n: m for n, m in self.models.items() if not m.needs_pool}
                else:
                    pool = TrainingPool(train, datamodule.attributes, self.pool_size, self.seed,
                                        self.retrieval_resolution)
                    rank_zero_info(f"[ReferenceCounterfactuals] {', '.join(self.models)} fitted on {len(pool)} "
                                   "training images")
                    for model in self.models.values():
                        model.fit(pool)
            self._fitted = True
        return self.models


def references_of(trainer: pl.Trainer | None) -> dict[str, Any]:
    """The fitted references of the trainer's ``ReferenceCounterfactuals`` callback; {} without one."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, ReferenceCounterfactuals):
            return callback.get(trainer)
    return {}
