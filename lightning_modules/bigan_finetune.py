"""Cyclic-cost fine-tuning of the conditional GAN's encoder (stage 2 of the benchmark's GAN).

Melistas et al., "Benchmarking Counterfactual Image Generation" (NeurIPS 2024 D&B), §3.2 and App. A.4: the
adversarial objective (eq. 5, ``lightning_modules.bigan``) does not make E invert G, so "the encoder is
fine-tuned, while keeping the rest of the network fixed, to minimise explicitly the reconstruction loss on
image and latent space"; the cyclic cost of Dogan and Keles ("Semi-supervised image attribute editing using
generative adversarial networks", Neurocomputing 2020). With G and D frozen, E minimises

    L_cyc = w_u · MSE(u, E(G(u, pa), pa)) + w_x · L1(x, G(E(x, pa), pa)),    u ~ N(0, I), (x, pa) ~ data

(the latent cycle on prior codes, the image cycle on data; both means over elements and the batch, images in
[0, 1]). Counterfactuals keep the GAN's contract with the fine-tuned encoder: x* = G(E_ft(x, pa), pa*)
(benchmark eq. 6).

This is a separate experiment that loads the pretrained GAN from ``pretrained`` (a ``ConditionalBiGAN``
checkpoint). G and D are frozen: ``requires_grad`` False, kept in eval mode (``train`` is overridden, so
Lightning's per-epoch ``model.train()`` cannot put G's BatchNorm back to batch statistics), and out of the
optimiser. D plays no part in L_cyc; it is kept so that this model's checkpoint holds the whole GAN. The
checkpoint stores all three networks and their configs, and drops ``pretrained``, so
``CyclicFineTunedBiGAN.load_from_checkpoint(path)`` needs no other file.

Checkpoints are chosen on ``val/rec/l1`` (mean |x − G(E(x, pa), pa)| per pixel), the distance the GAN's own
runs log. Deviation: the reference selects on LPIPS-VGG between x and G(E(x)), which needs ImageNet weights; the
pixel L1 needs nothing and is what the composition metric measures.

Logged: ``{stage}/loss/cyc`` (L_cyc), ``{stage}/loss/latent`` (the MSE), ``{stage}/loss/image`` (the L1, equal to
``{stage}/rec/l1``, logged under both names so fine-tuned and pretrained runs compare on one key).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.base import network_configs
from lightning_modules.bigan import NETWORKS, BiGANMechanism, ConditionalBiGAN
from lightning_modules.checkpoints import load_module


def cyclic_cost(
    u: torch.Tensor, u_cycle: torch.Tensor, x: torch.Tensor, x_cycle: torch.Tensor,
    latent_weight: float = 1.0, image_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_cyc = w_u · MSE(u, E(G(u, pa), pa)) + w_x · L1(x, G(E(x, pa), pa)) (benchmark §3.2, App. A.4).

    :param u, u_cycle: prior codes and E(G(u, pa), pa), [B, latent_dim].
    :param x, x_cycle: images and G(E(x, pa), pa) in [0, 1], [B, C, H, W].
    :returns: L_cyc and its two unweighted terms ``latent`` (MSE) and ``image`` (L1).
    """
    terms = {"latent": F.mse_loss(u_cycle, u), "image": F.l1_loss(x_cycle, x)}
    return latent_weight * terms["latent"] + image_weight * terms["image"], terms


class CyclicFineTunedBiGAN(BiGANMechanism):
    """The conditional GAN with its encoder fine-tuned on the cyclic cost (see the module docstring).

    :param pretrained: the ``ConditionalBiGAN`` checkpoint to start from (``runs/<exp>/latest/checkpoints/
        last.ckpt``); None only when the networks are given (``load_from_checkpoint`` passes them).
    :param pretrained_experiment: the experiment that trains it, named in the error when the file is missing.
    :param encoder, generator, discriminator: the networks, instead of ``pretrained`` (configs or modules).
    :param latent_weight: w_u, weight of MSE(u, E(G(u))).
    :param image_weight: w_x, weight of L1(x, G(E(x))).
    :param lr: Adam learning rate of E (1e-4, App. A.4).
    :param betas: Adam betas ((0.5, 0.999), App. A.4).
    :param scm: attribute mechanisms or their config; None for none (the pretrained GAN's are not inherited).
    :param scm_checkpoint: a trained SCM's checkpoint.
    """

    frozen_parts = ("generator", "discriminator")  # G and D are frozen: eval mode (frozen BatchNorm, no dropout)

    def __init__(
        self,
        pretrained: str | None = None,
        pretrained_experiment: str = "bigan_morphomnist",
        encoder: nn.Module | Mapping[str, Any] | None = None,
        generator: nn.Module | Mapping[str, Any] | None = None,
        discriminator: nn.Module | Mapping[str, Any] | None = None,
        latent_weight: float = 1.0,
        image_weight: float = 1.0,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        scm: Mapping[str, Any] | None = None,
        scm_checkpoint: str | None = None,
    ):
        super().__init__()
        networks = (encoder, generator, discriminator)
        if pretrained is not None:
            if any(n is not None for n in networks):
                raise ValueError("give either pretrained (a ConditionalBiGAN checkpoint) or the three networks")
            networks = _load_pretrained(pretrained, pretrained_experiment)
        elif any(n is None for n in networks):
            raise ValueError("CyclicFineTunedBiGAN needs pretrained (a ConditionalBiGAN checkpoint, e.g. "
                             f"runs/{pretrained_experiment}/latest/checkpoints/last.ckpt) or all three networks")
        self._set_networks(*networks)
        for frozen in (self.generator, self.discriminator):
            frozen.requires_grad_(False)
            frozen.eval()
        self.save_hyperparameters(ignore=["encoder", "generator", "discriminator", "scm", "scm_checkpoint"])
        self.save_hyperparameters({"pretrained": None, **network_configs(self, NETWORKS)})
        self.attach_scm(scm, scm_checkpoint)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on E alone."""
        return torch.optim.Adam(self.encoder.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def _cyclic_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, pa = batch["x"], batch["pa"]
        u = self.prior(x.shape[0])
        with torch.no_grad():  # G is frozen: its images are inputs of the latent cycle
            x_u = self.generator(u, pa)
        return cyclic_cost(u, self.encoder(x_u, pa), x, self.generator(self.encoder(x, pa), pa),
                           self.hparams.latent_weight, self.hparams.image_weight)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, terms = self._cyclic_terms(batch)
        self._log_terms("train", loss, terms, batch["x"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_terms("val", *self._cyclic_terms(batch), batch["x"].shape[0])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_terms("test", *self._cyclic_terms(batch), batch["x"].shape[0])

    def _log_terms(self, stage: str, loss: torch.Tensor, terms: dict[str, torch.Tensor], n: int) -> None:
        metrics = {f"{stage}/loss/cyc": loss.detach(), **{f"{stage}/loss/{k}": v.detach() for k, v in terms.items()}}
        metrics[f"{stage}/rec/l1"] = terms["image"].detach()
        self.log_dict(metrics, batch_size=n, sync_dist=stage != "train")


def _load_pretrained(path: str, experiment: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"the pretrained conditional GAN {path} does not exist; train it first: "
                                f"make train EXP={experiment}")
    gan = load_module(ConditionalBiGAN, path, "pretrained conditional GAN",
                      f"train it with `make train EXP={experiment}`")
    return gan.encoder, gan.generator, gan.discriminator
