"""An unconditional convolutional VAE: the embedding of the Counterfactual Latent Divergence (CLD).

The benchmark (Melistas et al., §3.3 "Minimality") measures d(x_i, x_j) = KL(q(z|x_i) ‖ q(z|x_j)) between the
Gaussian posteriors of an *unconditional* VAE trained on the real images (``callbacks.metrics.minimality``).
This module is that VAE: ``ConvEncoder`` (with no attribute head) gives q(z|x) = N(μ, diag exp(logvar)),
``ConvDecoder`` maps z to image logits, and the prior is N(0, I).

Training maximises the ELBO, a proper per-image bound (unlike ``lightning_modules.losses``, whose per-element
means serve the IFcVAE-GAN's weights): the reconstruction log-likelihood is SUMMED over pixels and channels,
the KL SUMMED over latent dimensions, both averaged over the batch. ``beta`` scales the KL (1 = the ELBO).
Likelihoods (``likelihood``):

* ``"bernoulli"`` (default): p(x|z) = Bernoulli(sigmoid(logits)) per element, i.e. the BCE of the logits
  against x in [0, 1]. For grey-level x this is the usual (unnormalised) choice for MNIST-like data, so the
  "ELBO" is a bound only up to the continuous-Bernoulli normaliser; it trains well and its posteriors are what
  CLD uses.
* ``"gaussian"``: p(x|z) = N(sigmoid(logits), sigma²) per element with a fixed ``sigma`` (a proper density).

Logged: ``{stage}/loss`` (−ELBO per image, the checkpoint monitor), ``{stage}/elbo``, ``{stage}/rec`` (the
negative log-likelihood per image) and ``{stage}/kl`` (per image).

API: ``posterior(x) -> (mean, logvar)`` [B, latent_dim] each, in eval mode under no_grad with the train flags
restored; ``reconstruct(x)`` (decoder mean at z = μ) and ``sample(n)`` likewise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.base import SameStepEveryStage
from lightning_modules.networks.blocks import build_network, network_config
from lightning_modules.networks.distributions import gaussian_kl
from lightning_modules.networks.frozen import evaluating

LIKELIHOODS = ("bernoulli", "gaussian")


def gaussian_kl_std(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL[N(μ, diag σ²) ‖ N(0, I)] per sample [B], summed over the latent dimensions."""
    return gaussian_kl(mu, logvar).sum(dim=1)


def reconstruction_nll(
    logits: torch.Tensor, x: torch.Tensor, likelihood: str, sigma: float = 0.1
) -> torch.Tensor:
    """−log p(x|z) per sample [B], summed over every element (see the module docstring)."""
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif likelihood == "gaussian":
        nll = (
            0.5 * ((x - torch.sigmoid(logits)) / sigma).pow(2) + math.log(sigma) + 0.5 * math.log(2 * math.pi)
        )
    else:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return nll.flatten(1).sum(dim=1)


class VAE(SameStepEveryStage):
    """Unconditional VAE on images in [0, 1].

    :param encoder: x -> (μ, logvar, _) (``ConvEncoder`` with ``n_attributes=0``); module or ``_target_`` dict.
    :param decoder: z [B, latent_dim] -> image logits (``ConvDecoder`` with ``in_features=latent_dim``).
    :param likelihood: ``"bernoulli"`` or ``"gaussian"``.
    :param sigma: the Gaussian likelihood's fixed standard deviation (in [0, 1] image units).
    :param beta: KL weight (1 gives the ELBO).
    :param lr: Adam learning rate.
    :param weight_decay: Adam (L2) weight decay.
    """

    def __init__(
        self,
        encoder: nn.Module | Mapping[str, Any],
        decoder: nn.Module | Mapping[str, Any],
        likelihood: str = "bernoulli",
        sigma: float = 0.1,
        beta: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.encoder = build_network(encoder)
        self.decoder = build_network(decoder)
        self.latent_dim = int(getattr(self.encoder, "latent_dim", 0)) or None
        n_in = getattr(self.decoder, "in_features", None)
        if self.latent_dim is not None and n_in is not None and n_in != self.latent_dim:
            raise ValueError(f"decoder.in_features={n_in} must equal encoder.latent_dim={self.latent_dim}")
        self.save_hyperparameters(ignore=["encoder", "decoder"])
        configs = {"encoder": network_config(self.encoder), "decoder": network_config(self.decoder)}
        missing = [k for k, v in configs.items() if v is None]
        if missing:
            raise ValueError(
                f"VAE: the {missing} network(s) do not record their config; use the networks package "
                f"or pass {{'_target_': ...}} dicts so that the checkpoint alone rebuilds them"
            )
        self.save_hyperparameters(configs)

    # -- the model ---------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x)[:2]
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image logits."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image logits from a reparameterised sample, μ, logvar)."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image reconstruction NLL and KL [B] (one posterior sample)."""
        logits, mu, logvar = self(x)
        return {
            "rec": reconstruction_nll(logits, x, self.hparams.likelihood, self.hparams.sigma),
            "kl": gaussian_kl_std(mu, logvar),
        }

    # -- metric-facing API -------------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) = N(mean, diag exp(logvar)): (mean, logvar) [B, latent_dim]; eval mode, no_grad."""
        with evaluating(self):
            return self.encode(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image at z = μ, in [0, 1]; eval mode, no_grad."""
        with evaluating(self):
            return torch.sigmoid(self.decode(self.encode(x)[0]))

    def sample(self, n: int) -> torch.Tensor:
        """``n`` images (decoder means) from the prior; eval mode, no_grad."""
        with evaluating(self):
            dim = self.latent_dim or self.hparams.encoder["latent_dim"]
            return torch.sigmoid(self.decode(torch.randn(n, dim, device=self.device)))

    # -- training ----------------------------------------------------------------------------------------
    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        x = batch["x"]
        terms = self.elbo_terms(x)
        rec, kl = terms["rec"].mean(), terms["kl"].mean()
        loss = rec + self.hparams.beta * kl
        on_step, n = stage == "train", x.shape[0]
        kw = {"batch_size": n, "on_step": on_step, "on_epoch": True, "sync_dist": not on_step}
        self.log(f"{stage}/loss", loss, **kw)
        self.log(f"{stage}/elbo", -(rec + kl), **kw)
        self.log(f"{stage}/rec", rec, **kw)
        self.log(f"{stage}/kl", kl, **kw)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
