"""Conditional hierarchical VAE image mechanism of a deep SCM (counterfactual_benchmark §3.2, App. A.3).

The network (``networks.hvae.ConditionalHVAENetwork``) is a VDVAE-style top-down HVAE with the parents injected
at every top-down layer (eq. 2) and a parent-free prior over the latents z_{1:L} (eq. 3). Pixels follow a
discretized Gaussian with per-pixel mean μ(z, pa) and scale σ(z, pa) on [-1, 1] (``likelihoods``).

**Training** minimises the negative β-ELBO per pixel, as published (and as the gradient thresholds assume):

    L = [ −log p(x | z, pa) + β Σ_i KL[q(z_i | z_<i, x, pa) ‖ p(z_i | z_<i)] ] / (C·H·W),   z ~ q   (eqs. 3-4)

with AdamW (lr 1e-3, betas (0.9, 0.9), weight decay 0.01), a linear warm-up over ``warmup_steps`` updates,
gradient-norm clipping at ``grad_clip`` (350) and **update skipping**: an update whose loss is not finite, or
whose gradient norm (before clipping) is not finite or is at least ``grad_skip`` (500), is not applied; the
count is kept in the checkpoint and logged as ``train/skipped_updates``. An exponential moving average of the
weights (``lightning_modules.ema``, decay 0.999) is updated after every applied update; validation, test and
everything run in eval mode (counterfactuals, samples, the metric callbacks) use it, and checkpoints hold it.

Logged per stage: ``loss`` (the objective above), ``nelbo`` (−ELBO per image in nats, β = 1), ``nelbo_per_pixel``,
``nll`` and ``kl`` (per image) and ``kl/layer_{i}`` (per image, layer 0 the coarsest).

**Counterfactuals** (abduction-action-prediction, §3.2):

1. abduction of the latents: z_i = q_loc + t_z·σ_q·n_i, n_i ~ N(0, I), layer by layer, with the LATENT
   temperature t_z (``latent_temperature``; 0 gives the posterior means, deterministic; the reference
   abducts with t_z = 0.1 on MorphoMNIST), then of the pixel residual ε = (x − μ(z, pa)) / σ(z, pa);
2. action: pa* = ``counterfactual_parents(pa, do)`` (propagated to descendants by the attached SCM);
3. prediction: x* = clip(μ(z, pa*) + t_r·σ(z, pa*)·ε, −1, 1) with the RESIDUAL temperature t_r
   (``residual_temperature``).

t_r = 1 is the published setting, and it makes **composition trivially perfect**: under the null intervention
pa* = pa and x* = μ + σ·(x − μ)/σ = x exactly, whatever the latents, so composition and reversibility then
measure nothing about the model. Evaluations should therefore report both t_r = 1 and t_r = 0 (x* = μ(z, pa*),
the mechanism's own prediction); the benchmark reports only the former. Both temperatures are constructor
arguments, so an evaluation overrides them (``model.residual_temperature=0``) without retraining.
``reconstruct`` returns μ(z, pa) (no residual) and ``sample`` the mean image of a prior sample at
``sample_temperature``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from datamodules.base import condition_vector, parents_from_spec
from lightning_modules.base import CounterfactualModule
from lightning_modules.ema import EMAMixin
from lightning_modules.likelihoods import discretized_gaussian_nll, to_signed, to_unit
from lightning_modules.networks.blocks import _plain, build_network, network_config
from lightning_modules.networks.hvae import HVAEOutput
from lightning_modules.optim import clip_or_skip, warmup_schedule


@dataclass
class HVAENoise:
    """Abducted exogenous noise: the latents z_{1:L} (coarsest first) and the pixel residual ε [B, C, H, W]."""

    z: list[torch.Tensor]
    eps: torch.Tensor


@dataclass
class ELBOTerms:
    """Per-image terms [B] of one posterior pass, and the objective (a scalar, per pixel)."""

    nll: torch.Tensor
    kl_layers: list[torch.Tensor]
    n_pixels: int
    beta: float
    output: HVAEOutput

    @property
    def kl(self) -> torch.Tensor:
        return torch.stack(self.kl_layers, 0).sum(0)

    @property
    def loss(self) -> torch.Tensor:
        """The negative β-ELBO per pixel, averaged over the batch (the module docstring's L)."""
        return ((self.nll + self.beta * self.kl) / self.n_pixels).mean()


def counterfactual_image(
    mean_cf: torch.Tensor, logscale_cf: torch.Tensor, eps: torch.Tensor, residual_temperature: float
) -> torch.Tensor:
    """x* = clip(μ(z, pa*) + t_r·σ(z, pa*)·ε, −1, 1) in [-1, 1] units (§3.2)."""
    if residual_temperature == 0:
        return mean_cf.clamp(-1.0, 1.0)
    return (mean_cf + residual_temperature * torch.exp(logscale_cf) * eps).clamp(-1.0, 1.0)


class ConditionalHVAE(EMAMixin, CounterfactualModule):
    """The conditional HVAE (see the module docstring).

    :param network: ``ConditionalHVAENetwork`` or its ``_target_`` dict; a dict without ``context_dim`` gets the
        parents' width.
    :param parents: the parents as the data configs give them (``{name: {kind, ...}}`` or a list of binary names).
    :param beta: KL weight β (1 on MorphoMNIST, 5 on CelebA in the paper).
    :param lr, betas, weight_decay: AdamW.
    :param warmup_steps: linear learning-rate warm-up over this many applied updates (0: none).
    :param grad_clip: clip the gradient norm to this (None: no clipping).
    :param grad_skip: skip updates whose gradient norm is at least this (None: only non-finite ones).
    :param ema_decay: decay of the weights' EMA (None: no EMA, evaluation uses the raw weights).
    :param latent_temperature: t_z of the counterfactuals' abduction.
    :param residual_temperature: t_r of the counterfactuals' prediction.
    :param sample_temperature: prior temperature of ``sample``.
    :param scm, scm_checkpoint: attribute mechanisms (``CounterfactualModule.attach_scm``).
    """

    def __init__(
        self,
        network: nn.Module | Mapping[str, Any],
        parents: Mapping[str, Mapping[str, Any]] | Sequence[str],
        beta: float = 1.0,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.9),
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        grad_clip: float | None = 350.0,
        grad_skip: float | None = 500.0,
        ema_decay: float | None = 0.999,
        latent_temperature: float = 0.1,
        residual_temperature: float = 1.0,
        sample_temperature: float = 1.0,
        scm: Mapping[str, Any] | None = None,
        scm_checkpoint: str | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.attributes = parents_from_spec(_plain(parents))
        context_dim = sum(a.dim for a in self.attributes)
        if isinstance(network, Mapping) and network.get("context_dim") is None:
            network = {**network, "context_dim": context_dim}
        self.net = build_network(network)
        if getattr(self.net, "context_dim", context_dim) != context_dim:
            raise ValueError(f"network.context_dim={self.net.context_dim}, but the parents "
                             f"{[a.name for a in self.attributes]} make a conditioning vector of {context_dim}")
        config = network_config(self.net)
        if config is None:
            raise ValueError("ConditionalHVAE needs a network that records its config (ConditionalHVAENetwork or a "
                             "{'_target_': ...} dict), so that the checkpoint alone rebuilds it")
        self.init_ema("net", ema_decay)
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long))
        self.save_hyperparameters(ignore=["network", "parents", "scm", "scm_checkpoint"])
        self.save_hyperparameters({"network": config, "parents": _plain(parents)})
        self.attach_scm(scm, scm_checkpoint)

    # -- the model ---------------------------------------------------------------------------------------
    def context(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The parents' conditioning vector [B, Σ dim] (categorical one-hot), on the model's device."""
        return condition_vector(pa, self.attributes).to(self.device)

    def elbo_terms(self, net: nn.Module, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> ELBOTerms:
        """One posterior pass (t = 1) of ``net`` on x in [0, 1]: per-image NLL and KL per layer."""
        xs = to_signed(x)
        out = net(xs, self.context(pa), latent_temperature=1.0)
        return ELBOTerms(
            nll=discretized_gaussian_nll(xs, out.loc, out.logscale),
            kl_layers=[layer.kl() for layer in out.layers],
            n_pixels=math.prod(x.shape[1:]),
            beta=float(self.hparams.beta),
            output=out,
        )

    # -- the counterfactual contract ---------------------------------------------------------------------
    def abduct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> HVAENoise:
        """z ~ q(z | x, pa) at the latent temperature, then ε = (x − μ(z, pa)) / σ(z, pa)."""
        return self.abduct_with(self.ema_network(), x, pa, self.hparams.latent_temperature)

    def abduct_with(
        self, net: nn.Module, x: torch.Tensor, pa: Mapping[str, torch.Tensor], latent_temperature: float
    ) -> HVAENoise:
        xs = to_signed(x)
        # The posterior pass decodes exactly the z it samples, so its output is μ(z, pa), σ(z, pa) for ε.
        out = net(xs, self.context(pa), latent_temperature=latent_temperature)
        return HVAENoise(z=[layer.z for layer in out.layers], eps=(xs - out.loc) * torch.exp(-out.logscale))

    def predict(self, noise: HVAENoise, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x* = clip(μ(z, pa) + t_r·σ(z, pa)·ε) in [0, 1] at the residual temperature."""
        return self.predict_with(self.ema_network(), noise, pa, self.hparams.residual_temperature)

    def predict_with(
        self, net: nn.Module, noise: HVAENoise, pa: Mapping[str, torch.Tensor], residual_temperature: float
    ) -> torch.Tensor:
        out = net.decode(noise.z, self.context(pa))
        return to_unit(counterfactual_image(out.loc, out.logscale, noise.eps, residual_temperature))

    def reconstruct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """μ(z, pa) at the abducted latents, without the pixel residual, in [0, 1]."""
        return self.predict_with(self.ema_network(), self.abduct(x, pa), pa, 0.0)

    def sample(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mean image μ(z, pa) of z ~ p(z) at the sample temperature, in [0, 1]."""
        out = self.ema_network().sample(self.context(pa), temperature=self.hparams.sample_temperature)
        return to_unit(out.loc)

    # -- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        terms = self.elbo_terms(self.net, batch["x"], batch["pa"])
        if self.guarded_step(opt, terms.loss, self.net.parameters()):
            sched.step()
            self.update_ema()
        self._log_terms("train", terms)

    def guarded_step(self, optimizer, loss: torch.Tensor, params: Iterable[nn.Parameter]) -> bool:
        """zero_grad, backward, clip the gradient norm of ``params`` at ``grad_clip``, step; unless the loss or the
        norm is not finite or the norm is at least ``grad_skip``: then the gradients are dropped, the step is not
        taken and ``skipped_updates`` grows. Returns whether the step was taken."""
        hp = self.hparams
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            self.manual_backward(loss)
            norm, ok = clip_or_skip(params, hp.grad_clip, hp.grad_skip)
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        else:
            ok = False
        if ok:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
        self.log("train/skipped_updates", self.skipped_updates.float(), on_step=True, on_epoch=False)
        return ok

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_terms("val", self.elbo_terms(self.ema_network(), batch["x"], batch["pa"]))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_terms("test", self.elbo_terms(self.ema_network(), batch["x"], batch["pa"]))

    def _log_terms(self, stage: str, terms: ELBOTerms, objective: str = "loss") -> None:
        """The ELBO's terms; the objective L under ``{stage}/{objective}``."""
        nelbo = (terms.nll + terms.kl).detach()
        metrics = {
            f"{stage}/{objective}": terms.loss.detach(),
            f"{stage}/nelbo": nelbo.mean(),
            f"{stage}/nelbo_per_pixel": (nelbo / terms.n_pixels).mean(),
            f"{stage}/nll": terms.nll.detach().mean(),
            f"{stage}/kl": terms.kl.detach().mean(),
        }
        metrics.update({f"{stage}/kl/layer_{i:02d}": kl.detach().mean() for i, kl in enumerate(terms.kl_layers)})
        on_step = stage == "train"
        self.log_dict(metrics, batch_size=terms.nll.shape[0], on_step=on_step, on_epoch=True,
                      sync_dist=not on_step)

    def configure_optimizers(self):
        """AdamW on the network with a linear warm-up (stepped per applied update)."""
        opt = self._adamw(self.net.parameters(), self.hparams.lr)
        return [opt], [self._warmup(opt)]

    def _adamw(self, params, lr: float) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.AdamW(params, lr=lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)

    def _warmup(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return warmup_schedule(opt, max(int(self.hparams.warmup_steps), 0))
