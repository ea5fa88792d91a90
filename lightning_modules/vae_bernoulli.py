"""The VAE baseline of CDVAE-GAN (Lim and Joo 2023, §4.1): the same Gaussian + Bernoulli VAE without the GAN.

"The VAE baseline model has the same VAE structure as the proposed CDVAE-GAN, which utilizes the Gaussian VAE
and additional Bernoulli random variable. In other words, the difference between VAE and CDVAE-GAN is whether
the GAN part exists or not." So this is ``CDVAEGAN`` with no discriminator: E minimises L_Div + L_Rec and G
minimises L_Rec (Algorithm 1 without line 13 and without L_GAN in line 12; γ only rescales G's learning
signal when G has no other loss, so it is dropped). Encoder, decoder, losses, relaxed-Bernoulli training
codes and the counterfactual contract (flip z_B entries, §3.3) are CDVAE-GAN's, inherited.

With one loss per player and L_Div independent of G, one backward pass of L_Div + L_Rec gives E its gradient
∇(L_Div + L_Rec) and G its gradient ∇L_Rec exactly; each is then stepped by its own RMSprop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_modules.attribute_latents import AttributeLatentModel
from lightning_modules.base import only_trainable


class BernoulliVAE(AttributeLatentModel):
    """CDVAE-GAN's encoder and decoder trained as a VAE (see the module docstring and ``CDVAEGAN``).

    :param encoder: E, x -> (μ, log Σ, π logits [B, k]).
    :param decoder: G, [z_G, z_B] -> image logits.
    :param attributes: the k binary attributes modelled by z_B.
    :param lambda_b, tau, rec_sigma, lr_encoder, lr_decoder, rmsprop_alpha: as in ``CDVAEGAN``.
    """

    players = ("encoder", "decoder")

    def __init__(
        self,
        encoder: nn.Module | Mapping[str, Any],
        decoder: nn.Module | Mapping[str, Any],
        attributes: Sequence[str],
        lambda_b: float = 1.0,
        tau: float = 0.1,
        rec_sigma: float = 0.5,
        lr_encoder: float = 3e-4,
        lr_decoder: float = 3e-4,
        rmsprop_alpha: float = 0.99,
    ):
        super().__init__()
        self._build(locals())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """E minimises L_Div + L_Rec, G minimises L_Rec, from one forward and one backward pass."""
        x, y = batch["x"], self._labels(batch["pa"])
        opt_e, opt_g = self.optimizers()
        with only_trainable(self, [self.encoder, self.decoder]):
            out = self._forward(x)
            terms = self._divergence_terms(out, y)
            terms["rec"] = self._rec_loss(out.x_rec_logits, x)
            opt_e.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(terms["div"] + terms["rec"])
            opt_e.step()
            opt_g.step()
        self._log_terms("train", terms, out, y)
