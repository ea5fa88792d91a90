"""Conditional ALI/BiGAN: the amortised, implicit image mechanism of the counterfactual benchmark.

Melistas et al., "Benchmarking Counterfactual Image Generation" (NeurIPS 2024 D&B), §3.2 "Conditional GAN" and
App. A.4, after Dash et al. (WACV 2022), which conditions ALI (Dumoulin et al., "Adversarially Learned
Inference", ICLR 2017) / BiGAN (Donahue et al., "Adversarial Feature Learning", ICLR 2017) on the parents.

An encoder E(x, pa) -> u, a generator G(u, pa) -> x and a discriminator D(x, u, pa) on joint (image, code,
parents) tuples play (benchmark eq. 5)

    min_{E,G} max_D  V(D, G, E) = E_{q(x)p(pa)}[log D(x, E(x, pa), pa)] + E_{p(u)p(pa)}[log(1 − D(G(u, pa), u, pa))]

with p(u) = N(0, I). Each training step (one batch, ``d_steps_per_g_step`` D steps, then one E+G step):

    L_D  = BCE(D(x, sg[E(x, pa)], pa), 1) + BCE(D(sg[G(u, pa)], u, pa), 0)       = −V   (D ascends V)
    L_EG = BCE(D(x, E(x, pa), pa), 0)     + BCE(D(G(u, pa), u, pa), 1)                  (labels swapped)

L_EG is the non-saturating form of "E, G descend V" that ALI and BiGAN train with (both papers swap the labels
instead of minimising log(1 − D)); sg = stop-gradient, so each player's optimizer sees only its own parameters'
gradient (``only_trainable``; tests/test_bigan.py checks the isolation).

Counterfactuals (benchmark eq. 6): x* = G(E(x, pa), pa*), i.e. ``abduct`` = E, ``predict`` = G; with attribute
mechanisms attached (``attach_scm``) pa* is the intervention propagated to its descendants. The objective does
not make E invert G well (benchmark §3.2, and the reason for the cyclic fine-tuning in
``lightning_modules.bigan_finetune``).

Images are in [0, 1] (the data contract); the networks centre them inside and G returns [0, 1]
(``networks.bigan``). Adam lr 1e-4, betas (0.5, 0.999) for both players, as App. A.4.

Logged: ``train/loss/d``, ``train/loss/eg``, ``train/acc/d`` (D's accuracy over the real and the generated
tuples), and on validation/test the same plus ``{stage}/rec/l1``, the mean |x − G(E(x, pa), pa)| per pixel in
[0, 1] units: the composition error of one null intervention, free of loss weights, used to choose checkpoints.
The reference code selects on an L1 between embeddings from the anti-causal predictors; ours needs no other run.
Lightning's ``global_step`` counts optimizer steps: 1 + ``d_steps_per_g_step`` per batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_modules.base import CounterfactualModule, network_configs, only_trainable
from lightning_modules.losses import binary_accuracy_from_logits, gan_discriminator_loss
from lightning_modules.networks.blocks import build_network

NETWORKS = ("encoder", "generator", "discriminator")


def discriminator_accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of the real and generated tuples D classifies correctly (logit > 0 means real)."""
    return 0.5 * (binary_accuracy_from_logits(real_logits, torch.ones_like(real_logits))
                  + binary_accuracy_from_logits(fake_logits, torch.zeros_like(fake_logits)))


def reconstruction_l1(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Mean |x − x̂| over pixels, channels and the batch, in [0, 1] units."""
    return (x - x_rec).abs().mean()


class BiGANMechanism(CounterfactualModule):
    """What the conditional GAN and its cyclic fine-tuning share: the three networks and the contract
    x* = G(E(x, pa), pa*) (benchmark eq. 6)."""

    encoder: nn.Module
    generator: nn.Module
    discriminator: nn.Module

    def _set_networks(self, encoder: Any, generator: Any, discriminator: Any) -> None:
        self.encoder = build_network(encoder)
        self.generator = build_network(generator)
        self.discriminator = build_network(discriminator)
        sizes = {n: getattr(getattr(self, n), "latent_dim", None) for n in NETWORKS}
        if len({s for s in sizes.values() if s is not None}) > 1:
            raise ValueError(f"the networks disagree on the size of u: {sizes}")
        self.latent_dim = next((int(s) for s in sizes.values() if s is not None), None)
        if self.latent_dim is None:
            raise ValueError("none of the networks has a 'latent_dim' attribute: the size of u is unknown")

    def prior(self, n: int) -> torch.Tensor:
        """u ~ p(u) = N(0, I), [n, latent_dim]."""
        return torch.randn(n, self.latent_dim, device=self.device)

    # -- the counterfactual contract --------------------------------------------------------------------
    def abduct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """u = E(x, pa)."""
        return self.encoder(x, pa)

    def predict(self, noise: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x = G(u, pa) in [0, 1]."""
        return self.generator(noise, pa)

    def sample(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """G(u, pa) with u ~ N(0, I)."""
        n = next(iter(pa.values())).shape[0]
        return self.predict(self.prior(n), pa)


class ConditionalBiGAN(BiGANMechanism):
    """Conditional ALI/BiGAN (see the module docstring).

    Networks are built modules or ``{"_target_": ..., **kwargs}`` dicts (``networks.bigan``); their configs are
    stored as hyperparameters so ``load_from_checkpoint(path)`` alone rebuilds the model.

    :param encoder: E(x, pa) -> u [B, latent_dim].
    :param generator: G(u, pa) -> x in [0, 1].
    :param discriminator: D(x, u, pa) -> logit [B].
    :param lr: Adam learning rate of both players (1e-4, App. A.4).
    :param betas: Adam betas ((0.5, 0.999), App. A.4).
    :param d_steps_per_g_step: discriminator steps per E+G step, on the same batch (1 as published).
    :param scm: attribute mechanisms (``lightning_modules.scm``) or their config; None for none.
    :param scm_checkpoint: a trained SCM's checkpoint (see ``CounterfactualModule.attach_scm``).
    """

    def __init__(
        self,
        encoder: nn.Module | Mapping[str, Any],
        generator: nn.Module | Mapping[str, Any],
        discriminator: nn.Module | Mapping[str, Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        d_steps_per_g_step: int = 1,
        scm: Mapping[str, Any] | None = None,
        scm_checkpoint: str | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        if d_steps_per_g_step < 1:
            raise ValueError(f"d_steps_per_g_step must be >= 1, got {d_steps_per_g_step}")
        self._set_networks(encoder, generator, discriminator)
        self.save_hyperparameters(ignore=[*NETWORKS, "scm", "scm_checkpoint"])
        self.save_hyperparameters(network_configs(self, NETWORKS))
        self.attach_scm(scm, scm_checkpoint)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam per player, in the order [discriminator, encoder + generator]."""
        hp = self.hparams
        eg = [*self.encoder.parameters(), *self.generator.parameters()]
        return [torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr, betas=tuple(hp.betas)),
                torch.optim.Adam(eg, lr=hp.lr, betas=tuple(hp.betas))]

    # -- training (benchmark eq. 5) ---------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, pa = batch["x"], batch["pa"]
        opt_d, opt_eg = self.optimizers()
        u = self.prior(x.shape[0])
        u_x, x_u = self.encoder(x, pa), self.generator(u, pa)  # abducted codes, generated images

        for _ in range(self.hparams.d_steps_per_g_step):  # D ascends V on detached codes and images
            with only_trainable(self, [self.discriminator]):
                real, fake = self.discriminator(x, u_x.detach(), pa), self.discriminator(x_u.detach(), u, pa)
                loss_d = gan_discriminator_loss(real, [fake], "sum")  # L_D = −V(D, G, E), eq. 5
                self._step(opt_d, loss_d)

        with only_trainable(self, [self.encoder, self.generator]):  # E and G fool the updated D
            # E and G: eq. 5 with the labels swapped (ALI/BiGAN's non-saturating form)
            loss_eg = gan_discriminator_loss(self.discriminator(x_u, u, pa), [self.discriminator(x, u_x, pa)], "sum")
            self._step(opt_eg, loss_eg)

        self.log_dict({"train/loss/d": loss_d.detach(), "train/loss/eg": loss_eg.detach(),
                       "train/acc/d": discriminator_accuracy(real.detach(), fake.detach())}, batch_size=x.shape[0])

    # -- evaluation -------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        x, pa = batch["x"], batch["pa"]
        u = self.prior(x.shape[0])
        u_x = self.encoder(x, pa)
        real, fake = self.discriminator(x, u_x, pa), self.discriminator(self.generator(u, pa), u, pa)
        self.log_dict({
            f"{stage}/loss/d": gan_discriminator_loss(real, [fake], "sum"),
            f"{stage}/loss/eg": gan_discriminator_loss(fake, [real], "sum"),
            f"{stage}/acc/d": discriminator_accuracy(real, fake),
            f"{stage}/rec/l1": reconstruction_l1(x, self.generator(u_x, pa)),
        }, batch_size=x.shape[0], sync_dist=True)
