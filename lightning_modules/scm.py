"""Training the attribute mechanisms of a deep structural causal model (counterfactual_benchmark §3, App. A.1).

The mechanisms themselves (flows for continuous parents, Gumbel-max for discrete ones, abduction-action-prediction
over the graph) are the network ``lightning_modules.networks.scm.AttributeSCM``; this module is the method that
fits them by maximum likelihood. Image models attach the fitted SCM (``CounterfactualModule.attach_scm``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_modules.base import SameStepEveryStage
from lightning_modules.networks.blocks import build_network, network_config

# Checkpoints written before the SCM moved to networks/ name ``lightning_modules.scm.AttributeSCM`` in their
# hyperparameters: the name stays importable from here.
from lightning_modules.networks.scm import AttributeSCM


class AttributeMechanisms(SameStepEveryStage):
    """Trains every mechanism of an ``AttributeSCM`` by maximum likelihood (App. A.1: Adam, lr 1e-3).

    Logged: ``{stage}/loss`` (the NLL of all parents per sample, the checkpoint monitor) and
    ``{stage}/nll/<variable>``. The batch's images are not used.

    :param scm: the ``AttributeSCM`` (module or ``_target_`` dict).
    :param lr: Adam learning rate.
    """

    def __init__(self, scm: nn.Module | Mapping[str, Any], lr: float = 1e-3):
        super().__init__()
        self.scm = build_network(scm)
        if not isinstance(self.scm, AttributeSCM):
            raise TypeError(f"AttributeMechanisms trains an AttributeSCM, got {type(self.scm).__name__}")
        self.save_hyperparameters(ignore=["scm"])
        self.save_hyperparameters({"scm": network_config(self.scm)})

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        declared = {a.name: a for a in getattr(datamodule, "attributes", None) or ()}
        if not declared:
            return
        for name, mine in self.scm.attributes.items():
            theirs = declared.get(name)
            if theirs is None or (theirs.kind, theirs.num_classes) != (mine.kind, mine.num_classes):
                raise ValueError(f"AttributeSCM variable {name!r} ({mine.kind}) does not match the data's "
                                 f"attributes {[(a.name, a.kind) for a in declared.values()]}")

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        nll = {name: -lp for name, lp in self.scm.log_probs(batch["pa"]).items()}
        loss = torch.stack(list(nll.values())).sum(dim=0).mean()
        on_step = stage == "train"
        kw = {"batch_size": len(next(iter(nll.values()))), "on_step": on_step, "on_epoch": True,
              "sync_dist": not on_step}
        self.log(f"{stage}/loss", loss, **kw)
        for name, value in nll.items():
            self.log(f"{stage}/nll/{name}", value.mean(), **kw)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
