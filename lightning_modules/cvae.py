"""The conditional VAE image mechanism of the Deep-SCM benchmark.

Melistas et al., "Benchmarking Counterfactual Image Generation" (counterfactual_benchmark §3, App. A.2,
Tables 7-10), after Pawlowski et al. (2020) and Ribeiro et al. (2023). The image mechanism is
x = f(z, ε; pa) with

    q(z | x, pa) = N(μ_φ(x, pa), diag σ²_φ(x, pa))                  ``ConditionalEncoder``
    p(z)         = N(0, I)
    p(x | z, pa) = discretized Gaussian(loc_θ(z, pa), σ_θ(z, pa))     ``ConditionalDecoder``, pixels in [-1, 1]

trained on the negative ELBO per image (nats), with β weighting the KL (β-VAE; 1 on MorphoMNIST, 5 on CelebA):

    L(x, pa) = Σ_pixels −log p(x | z, pa) + β KL[q(z | x, pa) ‖ N(0, I)],   z ~ q (one reparameterised sample).

σ is either fixed, log σ = −2.5 everywhere (σ² = e⁻⁵, the paper's "VAE (σ = √e⁻⁵)"), or learned per pixel by
a second 1×1 head (``decoder.log_scale: null``).

Counterfactuals (abduction-action-prediction, §3):

* abduction: z = μ + t_z·σ_q·u, u ~ N(0, I) (``latent_temperature`` t_z: 0 = the posterior mean, 1 = a
  posterior sample as the published code), and the pixel residual ε = (x − loc(z, pa)) / σ(z, pa);
* action: pa* = pa with ``do`` applied, propagated to descendants by the attribute mechanisms when the model
  has them (``counterfactual_parents``);
* prediction: x* = clip(loc(z, pa*) + t·σ(z, pa*)·ε, −1, 1) with the residual temperature t
  (``residual_temperature``; the published VAE uses 0.1).

With t = 1 and pa* = pa, x* = x exactly: abducting the residual makes composition (and reconstruction through
``predict``) trivially perfect, whatever the networks learned; t < 1 blends the factual residual away (a fixed σ
cancels: x* = loc* + t·(x − loc)). That is why the residual temperature is explicit and why ``reconstruct``
returns the decoder mean at the abducted z, the VAE's own reconstruction, not ``predict(abduct(x), pa)``.

Deviations from the published code (gulnazaki/counterfactual-benchmark), each deliberate:

* the prior is N(0, I); the published decoder passes its (0, 1) buffers as (loc, log-scale), i.e. N(0, e²);
* the loss is per image (NLL summed over pixels + β·KL), logged also per pixel; the published per-pixel mean
  NLL + β·KL/#pixels has the same minimiser and only rescales gradients (Adam is scale invariant), so the
  published clipping and skipping thresholds (350, 500) are applied to the gradient norm divided by the number
  of pixels, the published loss's scale;
* the likelihood uses exact log-CDFs (``lightning_modules.likelihoods``), not the tanh approximation with a
  1e-12 floor;
* pixels are mapped to [-1, 1] for every dataset (the published CelebA code leaves them in [0, 1] while its
  likelihood and clamp assume [-1, 1]);
* no EMA of the weights (the published MorphoMNIST run uses 0.999).

Logged: ``train/loss/{total,nll,kl}`` (per image), ``{val,test}/loss`` (the checkpoint monitor: −ELBO_β per
image), ``{stage}/nll``, ``{stage}/kl``, ``{stage}/nll_per_pixel``, ``{stage}/loss_per_pixel`` and
``{stage}/nats_per_pixel`` (−ELBO with β = 1, per pixel); ``train/grad_norm`` and ``train/skipped_updates``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from datamodules.base import Attribute, condition_vector, parents_from_spec
from lightning_modules.base import CounterfactualModule, network_configs
from lightning_modules.likelihoods import discretized_gaussian_nll, to_signed, to_unit
from lightning_modules.networks.blocks import _plain, build_network
from lightning_modules.optim import clip_or_skip, warmup_schedule
from lightning_modules.vae import gaussian_kl_std

NETWORKS = ("encoder", "decoder")


class CVAENoise(NamedTuple):
    """The exogenous noise of one image: the latent code z [B, latent_dim] and the pixel residual ε [B, C, H, W]."""

    z: torch.Tensor
    eps: torch.Tensor


def negative_elbo(
    x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
    beta: float = 1.0,
) -> dict[str, torch.Tensor]:
    """−ELBO_β per image [B] (App. A.2): ``nll`` = −log p(x | z, pa) summed over pixels (discretized Gaussian,
    ``x`` in [-1, 1]), ``kl`` = KL[N(μ, diag e^logvar) ‖ N(0, I)] summed over latent dimensions, and
    ``total`` = nll + β·kl."""
    nll = discretized_gaussian_nll(x, loc, log_scale)
    kl = gaussian_kl_std(mu, logvar)
    return {"total": nll + beta * kl, "nll": nll, "kl": kl}


class ConditionalVAE(CounterfactualModule):
    """Conditional VAE image mechanism (see the module docstring).

    :param encoder: ``ConditionalEncoder`` (module or ``_target_`` dict); its ``cond_dim`` must equal the width
        of the parents' conditioning vector.
    :param decoder: ``ConditionalDecoder``; same ``latent_dim`` and ``cond_dim``. Its ``log_scale`` picks fixed
        or learned σ.
    :param parents: the parents pa, ``{name: {kind, num_classes, low, high}}`` or a list of binary names
        (``datamodules.base.parents_from_spec``), in the order of the conditioning vector.
    :param beta: KL weight (1: the ELBO; the published CelebA runs use 5).
    :param latent_temperature: t_z of the abduction of z (0: the posterior mean; 1: a posterior sample, the
        published behaviour and the default).
    :param residual_temperature: t of the prediction x* = loc* + t·σ*·ε (0.1 as the published VAE; 1 makes
        composition trivially exact).
    :param lr, weight_decay, betas: AdamW (weight_decay 0 is Adam exactly).
    :param warmup_steps: linear learning-rate warm-up over this many optimizer steps.
    :param grad_clip: clip the gradient norm per pixel (see the module docstring) to this; None: no clipping.
    :param grad_skip: skip updates whose gradient norm per pixel is at least this or is not finite; None: only non-finite ones.
    :param scm, scm_checkpoint: attribute mechanisms (``CounterfactualModule.attach_scm``).
    """

    def __init__(
        self,
        encoder: nn.Module | Mapping[str, Any],
        decoder: nn.Module | Mapping[str, Any],
        parents: Mapping[str, Mapping[str, Any]] | Sequence[str],
        beta: float = 1.0,
        latent_temperature: float = 1.0,
        residual_temperature: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: Sequence[float] = (0.9, 0.9),
        warmup_steps: int = 100,
        grad_clip: float | None = 350.0,
        grad_skip: float | None = 500.0,
        scm: Mapping[str, Any] | None = None,
        scm_checkpoint: str | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        for name, value in (("latent_temperature", latent_temperature), ("residual_temperature", residual_temperature),
                            ("beta", beta)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.encoder = build_network(encoder)
        self.decoder = build_network(decoder)
        self.attributes: list[Attribute] = parents_from_spec(parents)
        self._check_shapes()
        self.save_hyperparameters(ignore=[*NETWORKS, "scm", "scm_checkpoint", "parents"])
        self.save_hyperparameters({"parents": _plain(parents), **network_configs(self, NETWORKS)})
        self.attach_scm(scm, scm_checkpoint)
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long))

    # -- construction -----------------------------------------------------------------------------------
    def _check_shapes(self) -> None:
        """Fail early, naming the config key, when the networks do not fit the parents or each other."""
        cond_dim = sum(a.dim for a in self.attributes)
        for name in NETWORKS:
            got = getattr(getattr(self, name), "cond_dim", cond_dim)
            if got != cond_dim:
                raise ValueError(
                    f"{name}.cond_dim={got}, but the parents {[a.name for a in self.attributes]} make a conditioning "
                    f"vector of width {cond_dim} (categorical one-hot); set model._cond_dim={cond_dim}"
                )
        enc, dec = (getattr(getattr(self, n), "latent_dim", None) for n in NETWORKS)
        if enc is not None and dec is not None and enc != dec:
            raise ValueError(f"encoder.latent_dim={enc} differs from decoder.latent_dim={dec}")
        self.latent_dim = int(enc if enc is not None else dec)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        scheduler = warmup_schedule(optimizer, hp.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- the model --------------------------------------------------------------------------------------
    def condition(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The parents' conditioning vector [B, Σ dim] on this model's device."""
        return condition_vector(pa, self.attributes).to(self.device)

    def posterior(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x, pa) as (μ, logvar); ``x`` in [0, 1], ``c`` the conditioning vector."""
        return self.encoder(x, c)

    def likelihood(self, z: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(x | z, pa) as per-pixel (loc, log σ) in [-1, 1] units."""
        return self.decoder(z, c)

    def loss_terms(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """−ELBO_β per image and its terms [B], from one reparameterised posterior sample."""
        x, c = batch["x"], self.condition(batch["pa"])
        mu, logvar = self.posterior(x, c)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        loc, log_scale = self.likelihood(z, c)
        return negative_elbo(to_signed(x), loc, log_scale, mu, logvar, self.hparams.beta)

    # -- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt, scheduler = self.optimizers(), self.lr_schedulers()
        terms = {k: v.mean() for k, v in self.loss_terms(batch).items()}
        opt.zero_grad(set_to_none=True)
        self.manual_backward(terms["total"])
        grad_norm = self._clip_or_skip(batch["x"][0].numel())
        opt.step()
        scheduler.step()
        metrics = {f"train/loss/{k}": v.detach() for k, v in terms.items()}
        self.log_dict({**metrics, "train/grad_norm": grad_norm, "train/skipped_updates": self.skipped_updates.float()},
                      batch_size=batch["x"].shape[0])

    def _clip_or_skip(self, n_pixels: int) -> torch.Tensor:
        """Clip the gradient norm to ``grad_clip`` and drop the gradients (the step becomes a no-op: AdamW skips
        parameters without a gradient) when it is not finite or at least ``grad_skip``, both per pixel (App. A.2).
        Returns the norm per pixel before clipping."""
        params = [p for p in self.parameters() if p.grad is not None]
        norm, apply = clip_or_skip(params, self.hparams.grad_clip, self.hparams.grad_skip, scale=n_pixels)
        if not apply:
            for p in params:
                p.grad = None
            self.skipped_updates += 1
        return norm

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        terms = {k: v.mean() for k, v in self.loss_terms(batch).items()}
        n_pixels = batch["x"][0].numel()
        metrics = {
            f"{stage}/loss": terms["total"],
            f"{stage}/nll": terms["nll"],
            f"{stage}/kl": terms["kl"],
            f"{stage}/loss_per_pixel": terms["total"] / n_pixels,
            f"{stage}/nll_per_pixel": terms["nll"] / n_pixels,
            f"{stage}/nats_per_pixel": (terms["nll"] + terms["kl"]) / n_pixels,
        }
        self.log_dict(metrics, batch_size=batch["x"].shape[0], sync_dist=True)

    # -- the counterfactual contract --------------------------------------------------------------------
    def abduct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> CVAENoise:
        """z = μ + t_z·σ_q·u (u ~ N(0, I)) and the residual ε = (x − loc(z, pa)) / σ(z, pa), x in [-1, 1]."""
        c = self.condition(pa)
        mu, logvar = self.posterior(x, c)
        z = mu + self.hparams.latent_temperature * torch.exp(0.5 * logvar) * torch.randn_like(mu)
        loc, log_scale = self.likelihood(z, c)
        return CVAENoise(z, (to_signed(x) - loc) * torch.exp(-log_scale))

    def predict(self, noise: CVAENoise, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x* = clip(loc(z, pa) + t·σ(z, pa)·ε, −1, 1), returned in [0, 1]."""
        loc, log_scale = self.likelihood(noise.z, self.condition(pa))
        return to_unit(loc + self.hparams.residual_temperature * torch.exp(log_scale) * noise.eps)

    def reconstruct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The decoder mean loc(z, pa) at the abducted z, in [0, 1] (no residual: see the module docstring)."""
        return to_unit(self.likelihood(self.abduct(x, pa).z, self.condition(pa))[0])

    def sample(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The decoder mean loc(z, pa) for z ~ N(0, I), in [0, 1]."""
        c = self.condition(pa)
        return to_unit(self.likelihood(torch.randn(c.shape[0], self.latent_dim, device=c.device), c)[0])
