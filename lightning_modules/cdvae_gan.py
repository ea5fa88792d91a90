"""CDVAE-GAN: counterfactual disentangled VAE-GAN with Bernoulli attribute latents.

Lim and Joo, "Counterfactual image generation by disentangling data attributes with deep generative models",
CSAM 2023 (``shared/papers/cdvae_gan.txt``). No public implementation exists; the paper is the reference.

Model (§3.1, Figure 5, Table 1): an encoder E gives q(z_G | x) = N(μ, Σ) with z_G ∈ R^m (m = 100) and
q(z_B | x) = Ber(π) with one z_B entry per attribute in ``attributes`` (k = 38 on CelebA); the
decoder/generator G decodes [z_G, z_B]; the discriminator D tells real images from G's reconstructions and
prior samples (z_G ~ N(0, I), z_B ~ Ber(0.5)). Losses (pure functions below, with the paper's equations):

    L_Div = KL(q(z_G|x) ‖ N(0, I)) + λ_B · D_KL(y ‖ q(z_B|x))        eqs. 3.2-3.5, y ∈ {0, 1}^k the labels
    L_Rec = −E_q[log p(x | z_G, z_B)]                                 eq. 3.6
    L_GAN = E log D(x) + E log(1 − D(G(z̃))) + E log(1 − D(G(E(x))))   eqs. 3.7-3.10

``training_step`` is Algorithm 1: E minimises L_Div + L_Rec, G minimises γ·L_Rec + L_GAN, D maximises L_GAN,
each player stepped by its own RMSprop (E and G 3e-4, D 3e-5; Table 1). During training z_B is a
relaxed-Bernoulli sample at temperature τ = 0.1 (the binary case of the Gumbel-Softmax trick, eq. 2.3), so
L_Rec reaches π. All three losses are taken at the same parameters, as in Algorithm 1: G's and D's losses
use the codes and fakes computed before E (then G) moved.

Counterfactuals (§3.3): abduct z_G as the posterior mean μ and z_B as the thresholded π (π > 0.5), set the
z_B entries named in ``do`` to the requested values (for a binary flip do(a = 1 − y) this is the paper's
1 − z_B whenever E classifies x correctly) and decode. Several attributes may be set at once.
``predict_attributes`` returns π, the model's own attribute classifier.

Deliberate choices where the paper is silent or literally wrong:

* Eq. 3.4 prints the Gaussian KL with a leading minus sign (−½ Σ (μ² + σ² − log σ² − 1) is −KL); we use the
  KL itself, which is what "L_Div, which needs to be minimized" requires.
* Eq. 3.4's Bernoulli KL is computed with 0·log 0 = 0 exactly (``torch.special.xlogy``), so for labels
  that are exactly 0 or 1 it equals the cross-entropy of eq. 3.5 to the last bit; soft labels also work.
* L_Rec: the paper names only "mean squared error for real-valued input". We use a Gaussian with fixed
  standard deviation ``rec_sigma`` (0.5 on [0, 1] images = unit variance on Table 1's Tanh scale [-1, 1]):
  ½ Σ_pixels ((x' − x) / σ)², summed over pixels and averaged over the batch. Every term is a per-image
  sum (KL over the m + k latents, L_Rec over the pixels), so λ_B and γ weigh nats against nats.
* L_GAN for G: ``gan_loss="non_saturating"`` (default, as the repo's other GANs) replaces G's
  log(1 − D(·)) terms by −log D(·), which has the same fixed points and does not vanish when D rejects the
  fakes early in training; ``"minimax"`` is Algorithm 1 line 12 literally. D always maximises eq. 3.7.
* Table 1's strides, paddings and the decoder's output range are not given (``networks.cdvae_gan``).
* Decoding prior samples, and the second forward passes that take G's and D's losses at the same
  parameters, do not update BatchNorm running statistics (``without_stat_update``): evaluation decodes posterior
  codes of real images, so the statistics should describe those.

Attributes that never vary in the training data (the synthetic faces render 10 of CelebA's 40 attributes;
the other columns are constantly 0) are harmless: L_B drives their π towards 0, their z_B is 0 in every
reconstruction and 0 or 1 in the prior samples, and they should not be intervened on (the decoder never
learnt what a 1 means for them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_modules.attribute_latents import AttributeLatentModel, gan_value
from lightning_modules.base import only_trainable
from lightning_modules.losses import gan_generator_loss
from lightning_modules.networks.frozen import without_stat_update


def algorithm_1(model: AttributeLatentModel, batch: dict[str, Any]) -> None:
    """One iteration of Algorithm 1 on ``model``'s three players (E, G, D), each stepped by its own optimizer.

    CDVAE-GAN trains this way; so does its VAE-GAN comparison (§4.1 compares the models under one training
    setting), whose own code and reconstruction term plug in through ``model``'s methods.
    """
    x, y = batch["x"], model._labels(batch["pa"])
    opt_e, opt_g, opt_d = model.optimizers()
    hp = model.hparams

    # Lines 3-6 and 10-11: z <- E(x), x' <- G(z); E minimises L_Div + L_Rec (G and D receive no gradient).
    with only_trainable(model, [model.encoder]):
        out = model._forward(x)
        terms = model._divergence_terms(out, y)
        terms["rec"] = model._rec_loss(out.x_rec_logits, x)
        model._step(opt_e, terms["div"] + terms["rec"])

    # Lines 7-9 and 12: x̃ <- G(z̃); G minimises γ L_Rec + L_GAN. The code z is the one E produced before its
    # step, and G has not moved, so x' is recomputed at the same point (only G receives gradient).
    z = out.z.detach()
    with only_trainable(model, [model.decoder]):
        x_rec_logits = without_stat_update(model.decoder, z)
        x_prior_logits = without_stat_update(model.decoder, model._prior_code(x.shape[0], x))
        x_rec, x_prior = torch.sigmoid(x_rec_logits), torch.sigmoid(x_prior_logits)
        terms["gen"] = gan_generator_loss([without_stat_update(model.discriminator, x_prior),
                                           without_stat_update(model.discriminator, x_rec)], hp.gan_loss, "sum")
        rec_g = model._rec_loss(x_rec_logits, x)
        model._step(opt_g, hp.gamma * rec_g + terms["gen"])

    # Line 13: D maximises L_GAN on the real batch and the fakes of this step (detached, made before G moved).
    with only_trainable(model, [model.discriminator]):
        terms["gan"] = gan_value(model.discriminator(x), model.discriminator(x_prior.detach()),
                                 model.discriminator(x_rec.detach()))
        model._step(opt_d, -terms["gan"])

    model._log_terms("train", terms, out, y)


class CDVAEGAN(AttributeLatentModel):
    """CDVAE-GAN (see the module docstring). Networks are built modules or ``{"_target_": ...}`` dicts; their
    configs are stored as hyperparameters, so ``CDVAEGAN.load_from_checkpoint(path)`` rebuilds them.

    :param encoder: E, x -> (μ [B, m], log Σ [B, m], π logits [B, k]); ``Table1Encoder(n_attributes=k)``.
    :param decoder: G, [z_G, z_B] [B, m + k] -> image logits; ``Table1Decoder(in_features=m + k)``.
    :param discriminator: D, image -> logit [B]; ``Table1Discriminator``.
    :param attributes: the k binary attributes of ``batch["pa"]`` modelled by z_B, in z_B's order.
    :param lambda_b: λ_B, weight of the Bernoulli KL (eq. 3.2; 1.0).
    :param gamma: γ, weight of L_Rec in G's loss (Algorithm 1 line 12; 15.0).
    :param tau: τ, temperature of the relaxed-Bernoulli z_B in training (0.1).
    :param rec_sigma: σ of the Gaussian L_Rec on [0, 1] images (0.5: unit variance on the Tanh scale).
    :param prior_p: η of the Bernoulli prior p(z_B) = Ber(η) for generated images (0.5).
    :param gan_loss: ``"non_saturating"`` or ``"minimax"`` (G's GAN term; see ``losses.gan_generator_loss``).
    :param lr_encoder, lr_decoder, lr_discriminator: RMSprop learning rates (3e-4, 3e-4, 3e-5).
    :param rmsprop_alpha: RMSprop's smoothing constant (PyTorch's default 0.99; the paper gives none).
    """

    players: tuple[str, ...] = ("encoder", "decoder", "discriminator")

    def __init__(
        self,
        encoder: nn.Module | Mapping[str, Any],
        decoder: nn.Module | Mapping[str, Any],
        discriminator: nn.Module | Mapping[str, Any],
        attributes: Sequence[str],
        lambda_b: float = 1.0,
        gamma: float = 15.0,
        tau: float = 0.1,
        rec_sigma: float = 0.5,
        prior_p: float = 0.5,
        gan_loss: str = "non_saturating",
        lr_encoder: float = 3e-4,
        lr_decoder: float = 3e-4,
        lr_discriminator: float = 3e-5,
        rmsprop_alpha: float = 0.99,
    ):
        super().__init__()
        self._build(locals())

    # -- training (Algorithm 1) -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        algorithm_1(self, batch)
