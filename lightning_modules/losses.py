"""Loss functions as pure functions of tensors.

Reduction convention (one for every term, so that the paper's weights α, ρ, δ keep one meaning):

* every term is an AVERAGE over the batch (a per-sample expectation);
* the reconstruction BCE is also averaged over the image elements (the paper defines L_bce with
  1/M Σ over the M elements);
* the KL divergence is averaged over the m latent dimensions, so α weighs a per-dimension KL on the same
  per-element scale as the reconstruction term.

The official IFcVAE-GAN code mixes sums over the batch (reconstruction, KL, GAN) with batch means (class,
auxiliary), which changes the effective weights by the batch size (64x); we do not copy that.

Sign convention. The paper writes L_bce(a, b) = 1/M Σ a log b + (1 − a) log(1 − b), the log-LIKELIHOOD
(≤ 0), with a minus sign missing; read literally, minimising L_rec = L_bce(x̂, x) would make reconstructions
worse. Every ``bce`` here is the proper, positive binary cross-entropy −[t log p + (1 − t) log(1 − p)] with
the target t and the prediction p = sigmoid(logit). With that sign the equations read as the text says:

* the discriminator MINIMISES L_gan (§3.1; Algorithm 1 line 13 writes "+∇_χ L_gan", ascent on the
  log-likelihood form, which is the same update as descent on our positive BCE);
* the decoder and the encoder minimise "… − δ L_gan" (eqs. 3, 4), i.e. they maximise the discriminator's BCE;
* A_ψ minimises L_aux and the encoder maximises it (eq. 5), i.e. the encoder's loss contains "− L_aux"
  (eq. 6).

Every function takes LOGITS, never probabilities: BCE-with-logits is numerically stable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_modules.networks.distributions import gaussian_kl

GanLossMode = Literal["non_saturating", "minimax"]
GAN_LOSS_MODES = ("non_saturating", "minimax")


def bce_with_logits(logits: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """L_bce(target, sigmoid(logits)) with the proper sign, averaged over every element (paper §3.1).

    A float ``target`` is broadcast (1.0 for "real", 0.0 for "fake").
    """
    if not torch.is_tensor(target):
        target = torch.full_like(logits, float(target))
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="mean")


def reconstruction_bce(x_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L_rec = L_bce(x̂, x) (eqs. 3, 4): BCE of the decoded logits against the image in [0, 1], averaged over
    the batch and every pixel and channel."""
    return bce_with_logits(x_logits, x)


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_bce(½, A(ẑ)): the cross-entropy of A's prediction against the uninformative target ½.

    −½ [log σ(l) + log(1 − σ(l))] = log 2 + KL(Bern(½) ‖ Bern(σ(l))), minimal (log 2) exactly when A predicts
    ½. An encoder that minimises it makes the adversary uncertain, not wrong; one that maximises L_aux (eq. 6)
    gains without bound by making A confidently wrong, which keeps the attribute in ẑ with its sign flipped.
    The confusion form is Tzeng et al.'s (2015) domain-confusion loss, used for attribute removal by Alvi et
    al. (2018, "Turning a Blind Eye").
    """
    return bce_with_logits(logits, 0.5)


def kl_normal_std(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """L_KL = KL[N(μ, diag σ²) ‖ N(0, I)] (eq. 1, eq. 4), averaged over the latent dimensions and the batch.

    Per dimension: 0.5 (μ² + σ² − 1 − log σ²).
    """
    return gaussian_kl(mu, logvar).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: Sequence[torch.Tensor],
                           reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """The discriminator's cross-entropy: L_bce(1, C(real)) and L_bce(0, C(fake)) for every fake, each term
    averaged over its batch, then averaged (``reduction="mean"``) or summed (``"sum"``) over the terms.

    * IFcVAE-GAN's L_gan of §3.1 (Bao et al., 2017), which C_χ minimises, is the mean over its three terms:
      1/3 [L_bce(1, C(x)) + L_bce(0, C(D(E(x)))) + L_bce(0, C(D(z, y)))];
    * CDVAE-GAN's L_GAN of eqs. 3.8-3.10, E log D(x) + E log(1 − D(G(z̃))) + E log(1 − D(G(E(x)))), which D
      maximises, is minus the sum over its three terms;
    * the conditional BiGAN's L_D = −V(D, G, E) of benchmark eq. 5 is the sum over its two terms (real tuples
      (x, E(x, pa)), fake tuples (G(u, pa), u)); its encoder and generator minimise the same with the roles
      swapped, ``gan_discriminator_loss(fake, [real], "sum")`` (ALI/BiGAN's non-saturating form).
    """
    terms = [bce_with_logits(real_logits, 1.0)] + [bce_with_logits(f, 0.0) for f in fake_logits]
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return torch.stack(terms).mean() if reduction == "mean" else torch.stack(terms).sum()


def gan_generator_loss(
    fake_logits: Sequence[torch.Tensor], mode: GanLossMode = "non_saturating",
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """The generator-side GAN term that the decoder and the encoder MINIMISE in place of "− L_gan" (IFcVAE-GAN
    eqs. 3, 4), or G's GAN term of CDVAE-GAN's Algorithm 1 line 12 with ``reduction="sum"``.

    Each fake term keeps its weight in the discriminator's loss (``gan_discriminator_loss`` with the same
    ``reduction``): 1 / (1 + len(fake_logits)) for ``"mean"`` (1/3 in IFcVAE-GAN), 1 for ``"sum"``, so the GAN
    weight means the same in both modes:

    * ``"minimax"``: −1/3 [L_bce(0, C(x̂)) + L_bce(0, C(x_p))]. The real term of L_gan does not depend on
      the decoder or the encoder, so this has exactly the gradient of the paper's −L_gan; its value is −L_gan
      without the real term (≤ 0).
    * ``"non_saturating"`` (default): +1/3 [L_bce(1, C(x̂)) + L_bce(1, C(x_p))], Goodfellow et al.'s (2014)
      substitute. When the discriminator confidently rejects fakes early in training, log(1 − C(fake))
      saturates and the minimax gradient vanishes, while −log C(fake) still gives a strong gradient. Both
      have the same fixed points. The official IFcVAE-GAN code also trains the generator with
      BCE(C(fake), 1).
    """
    if mode not in GAN_LOSS_MODES:
        raise ValueError(f"mode must be one of {GAN_LOSS_MODES}, got {mode!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    weight = 1.0 / (1 + len(fake_logits)) if reduction == "mean" else 1.0
    if mode == "minimax":
        return -weight * sum(bce_with_logits(f, 0.0) for f in fake_logits)
    return weight * sum(bce_with_logits(f, 1.0) for f in fake_logits)


def binary_accuracy_from_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of ``(logits > 0) == target`` for 0./1. targets (a logged diagnostic, not a loss)."""
    return ((logits > 0).to(target.dtype) == target).float().mean()
