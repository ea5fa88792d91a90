"""The counterfactual-model contract every method implements, and manual-optimization helpers.

Callbacks and metrics use only this interface:

* ``abduct(x, pa) -> noise``: the exogenous noise (latent code) that explains ``x`` under parents ``pa``;
* ``predict(noise, pa) -> x``: the image mechanism;
* ``counterfactual(x, pa, do) -> x*``: abduction-action-prediction, ``do`` a dict name -> value tensor [B];
* ``reconstruct(x, pa) -> x̂`` and ``sample(pa) -> x``;
* ``predict_attributes(x) -> dict name -> probability [B]`` for methods with their own attribute classifier.

Images are in [0, 1] as in the data contract (``datamodules.base``). Methods that cannot abduct set
``can_abduct = False``; metrics that need abduction then skip them and log why.

Deep structural causal models (counterfactual_benchmark §3) put an image mechanism under attribute mechanisms:
``counterfactual_parents(pa, do)`` abducts the attributes' noise, applies ``do`` and re-runs the attribute
mechanisms of the intervened variables' descendants (do(thickness) changes intensity), and ``counterfactual``
predicts the image from those parents. A method gets its attribute mechanisms with :meth:`attach_scm`
(``lightning_modules.networks.scm.AttributeSCM``, trained by its own experiment and frozen here); without one,
``counterfactual_parents`` is ``pa`` with ``do`` applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_modules.networks.blocks import network_config
from lightning_modules.networks.scm import resolve_scm


def network_configs(module: nn.Module, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The ``_target_`` configs of ``module``'s networks ``names`` (``networks.blocks.network_config``), to be
    saved as hyperparameters so that ``load_from_checkpoint`` rebuilds them; a network that records none is left
    out with a warning (it must then be passed to ``load_from_checkpoint`` again)."""
    configs = {}
    for name in names:
        config = network_config(getattr(module, name))
        if config is None:
            rank_zero_warn(f"{type(module).__name__}: the {name} does not record its config; pass it again to "
                           "load_from_checkpoint")
        else:
            configs[name] = config
    return configs


def binary_label_matrix(pa: Mapping[str, torch.Tensor], names: Sequence[str], owner: str) -> torch.Tensor:
    """y [B, len(names)] in float: the binary attributes ``names`` of a batch's ``pa``, in that order.

    A missing attribute fails with one message naming it and ``owner`` (the model that needs it)."""
    missing = [a for a in names if a not in pa]
    if missing:
        raise KeyError(f"{owner} needs attributes {missing} in pa; got {sorted(pa)}")
    return torch.stack([pa[a].float().reshape(-1) for a in names], dim=1)


class CounterfactualModule(pl.LightningModule):
    can_abduct: bool = True
    #: submodules that stay in eval mode (frozen BatchNorm, no dropout) whatever ``train()`` asks: the pretrained
    #: parts of a fine-tuning, its frozen judges. Lightning calls ``train()`` at every epoch.
    frozen_parts: tuple[str, ...] = ()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_parts:
            part = getattr(self, name, None)
            if part is not None:
                part.eval()
        return self

    def attach_scm(self, scm: nn.Module | Mapping[str, Any] | None, scm_checkpoint: str | None = None) -> None:
        """Give this model attribute mechanisms: ``scm`` an ``AttributeSCM`` or its ``_target_`` config,
        ``scm_checkpoint`` the file of a trained one (an ``AttributeMechanisms`` checkpoint, e.g.
        ``runs/scm_morphomnist/latest/checkpoints/best.ckpt``). Call it in ``__init__`` after
        ``save_hyperparameters``.

        The mechanisms are frozen (they are trained by their own experiment) and become part of this model's
        state, so its checkpoint alone rebuilds the whole SCM: the hyperparameters keep the SCM's config and
        drop the checkpoint path, which ``load_from_checkpoint`` therefore does not need.
        """
        self.scm = None
        if scm is not None or scm_checkpoint is not None:
            self.scm = resolve_scm(scm, scm_checkpoint)
            self.scm.requires_grad_(False)
        self.save_hyperparameters({"scm": network_config(self.scm) if self.scm is not None else None,
                                   "scm_checkpoint": None})

    def counterfactual_parents(
        self, pa: Mapping[str, torch.Tensor], do: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The parents after ``do``, propagated to the intervened variables' descendants when this model has
        attribute mechanisms."""
        unknown = set(do) - set(pa)
        if unknown:
            raise KeyError(f"intervention on unknown attribute(s) {sorted(unknown)}; parents are {sorted(pa)}")
        scm = getattr(self, "scm", None)  # set by attach_scm; a submodule, so not a class attribute
        if scm is None:
            return {**pa, **do}
        return scm.counterfactual_parents(pa, do)

    def abduct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]):
        raise NotImplementedError

    def predict(self, noise, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def counterfactual(
        self, x: torch.Tensor, pa: Mapping[str, torch.Tensor], do: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.predict(self.abduct(x, pa), self.counterfactual_parents(pa, do))

    def reconstruct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.predict(self.abduct(x, pa), pa)

    def sample(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def predict_attributes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no attribute classifier of its own")

    # -- manual optimization -------------------------------------------------------------------------
    def _step(self, optimizer, loss: torch.Tensor) -> None:
        """zero_grad, backward, step for one player whose parameters alone require grad."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()


class only_trainable:
    """Context manager: inside it, only ``modules`` have ``requires_grad=True``.

    This is ``toggled_optimizer`` for a block that steps several players after one backward pass: parameters
    outside the players receive no gradient (under DDP they are not marked as used), and every parameter's
    flag is restored on exit.
    """

    def __init__(self, root: nn.Module, modules: Iterable[nn.Module]):
        self.root = root
        self.keep = {id(p) for m in modules for p in m.parameters()}

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.root.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(id(p) in self.keep)
        return self

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)
        return False


class SameStepEveryStage(pl.LightningModule):
    """A single-loss model (the evaluation models, the attribute mechanisms) whose training, validation and
    test steps are one ``_step(batch, stage)`` that computes and logs the loss under ``{stage}/...``."""

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")
