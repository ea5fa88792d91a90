"""IFcVAE-GAN: the Information Factorization conditional VAE-GAN.

Creswell, Mohamied, Sengupta and Bharath, "Adversarial Information Factorization", arXiv:1711.05175
(https://arxiv.org/abs/1711.05175); official code: github.com/ToniCreswell/attribute-cVAEGAN.

Networks (paper Fig. 1a): an encoder E_φ with two heads, E_z -> (μ, log σ²) and E_y -> ŷ = sigmoid(logit); a
decoder D_θ that reads the concatenation [ŷ, z]; a discriminator C_χ; an auxiliary network A_ψ(ẑ) -> ỹ. With
ẑ = μ + σ ⊙ ε, x̂ = D(ŷ, ẑ) (the encoder's OWN ŷ, with gradient) and x_p = D(y, z), z ~ N(0, I), y the true
label (the paper's D_θ(z, y)):

    L_rec   = L_bce(x̂, x)                                      reconstruction
    L_KL    = KL[q_φ(z|x) ‖ N(0, I)]
    L_class = L_bce(ŷ, y)                                       E_y as a classifier of the input
    L_gan   = 1/3 [L_bce(1, C(x)) + L_bce(0, C(x̂)) + L_bce(0, C(x_p))]       minimised by χ
    L_aux   = L_bce(A(ẑ), y)                                    minimised by ψ, maximised by φ   (eq. 5)
    L_dec   = L_rec − δ L_gan                                   minimised by θ                   (eq. 3)
    L_enc   = L_rec + α L_KL + ρ L_class − δ L_gan                                               (eq. 4)
    L_IFcVAE-GAN = L_enc − L_aux                                minimised by φ                   (eq. 6)

Algorithm 1 updates all four players from one forward pass (simultaneous gradients). Editing an attribute
(§3.3) is encode, set ŷ to 0 or 1, decode: ``counterfactual(x, pa, do={attribute: 0/1})``. All BCE terms are
positive cross-entropies averaged per element (see ``lightning_modules.losses`` for the sign and reduction
conventions and why Algorithm 1 line 13 reads "+∇_χ").

Deviations from the paper and the official code (every one deliberate):

* "− δ L_gan" for θ and φ is, by default, the non-saturating substitute +δ/3 Σ_fakes L_bce(1, C(fake))
  (as the official code does); ``gan_loss="minimax"`` gives the paper's literal term.
* E_y reads the encoder's trunk features WITHOUT detaching them and ŷ reaches the decoder with its gradient;
  the official code detaches E_y's input, so there the classification losses train only a linear probe.
* One reduction convention for every term (batch means; per-element BCE; per-dimension KL); the official
  code mixes batch sums and batch means.
* The discriminator's RMSprop gets a real ``momentum`` (0.5, §4.4); the official code passed its "momentum"
  as RMSprop's smoothing constant ``alpha``.
* ``aux_weight`` scales L_aux in eq. 6 (1 in the paper; 0 gives the naive cVAE-GAN of Table 1 row 2, and A_ψ
  is still trained so that ``train/acc/aux`` shows how much label information ẑ carries).
* ``xhat_class_weight`` adds the Table 1 row 3 ablation L_bce(E_y(x̂), y) to the DECODER's loss only, the
  use the paper states ("providing a gradient containing label information to the decoder"); see
  ``_xhat_class_loss``.
* Learning rates are those of the official code (2e-4; the paper gives none).
* ``aux_objective`` and ``aux_steps`` (defaults: the paper's "maximise L_aux" and one A_ψ step) are options
  for an encoder that outruns A_ψ; see the paragraph below.

Maximising an unbounded BCE (eq. 5) lets the encoder make A_ψ confidently wrong rather than uninformed, and
an A_ψ at chance during training does not mean that ẑ is free of the attribute (a fresh linear probe,
``callbacks.metrics.leakage``, tells; docs/results.md has the runs). ``aux_objective="confusion"`` replaces the encoder's "− L_aux" by the bounded
L_bce(½, A(ẑ)), minimal when A_ψ is uninformed; A_ψ's own update is unchanged. The default is the paper's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_modules.base import CounterfactualModule, network_configs, only_trainable
from lightning_modules.losses import (
    GAN_LOSS_MODES,
    bce_with_logits,
    binary_accuracy_from_logits,
    confusion_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    kl_normal_std,
    reconstruction_bce,
)
from lightning_modules.networks.blocks import build_network
from lightning_modules.networks.frozen import without_stat_update

NETWORKS = ("encoder", "decoder", "discriminator", "auxiliary")
AUX_OBJECTIVES = ("maximise", "confusion")


@dataclass
class Forward:
    """One forward pass through E, D and A (Algorithm 1, lines 5-8); logits are [B], codes [B, m]."""

    mu: torch.Tensor
    logvar: torch.Tensor
    y_logit: torch.Tensor  # E_y(x)
    z_hat: torch.Tensor  # ẑ = μ + σ ε
    x_hat_logits: torch.Tensor  # x̂ = D(ŷ, ẑ)
    x_p_logits: torch.Tensor  # x_p = D(y, z), z ~ N(0, I)
    aux_logit: torch.Tensor  # ỹ = A(ẑ)

    @property
    def y_hat(self) -> torch.Tensor:
        return torch.sigmoid(self.y_logit)


class IFCVAE(CounterfactualModule):
    """IFcVAE-GAN on one binary attribute (see the module docstring).

    Networks are built modules or ``{"_target_": ..., **kwargs}`` dicts. Their configs are stored as
    hyperparameters, so ``IFCVAE.load_from_checkpoint(path)`` rebuilds them; a network that does not record
    its config (``networks.blocks.remember_config``) must be passed again to ``load_from_checkpoint``.

    :param encoder: E_φ, x -> (μ, log σ², y logit [B, 1]); ``ConvEncoder(n_attributes=1)``.
    :param decoder: D_θ, [ŷ, z] -> image logits; ``in_features`` must be ``latent_dim + 1``.
    :param discriminator: C_χ, image -> logit [B].
    :param auxiliary: A_ψ, ẑ -> logit [B, 1].
    :param attribute: the binary attribute in ``batch["pa"]`` that ŷ factorises.
    :param alpha: α, KL weight (eq. 4).
    :param rho: ρ, weight of L_class on the input (eq. 4).
    :param delta: δ, GAN weight (eqs. 3, 4).
    :param aux_weight: weight of L_aux in eq. 6 (1 in the paper; 0: naive cVAE-GAN).
    :param aux_objective: what the encoder does to A_ψ: ``"maximise"`` L_aux (eq. 6, the paper) or minimise the
        ``"confusion"`` loss L_bce(½, A(ẑ)) (``losses.confusion_loss``); A_ψ minimises L_aux in both.
    :param aux_steps: RMSprop steps of A_ψ per iteration on the iteration's ẑ (1 in Algorithm 1). More steps
        let the adversary keep up with an encoder that moves the attribute around instead of removing it.
    :param xhat_class_weight: weight of L_bce(E_y(x̂), y) in the decoder's loss (Table 1 row 3; 0 by default).
    :param gan_loss: ``"non_saturating"`` or ``"minimax"`` generator term (``losses.gan_generator_loss``).
    :param lr: RMSprop learning rate of the encoder and the decoder.
    :param disc_lr: RMSprop learning rate of the discriminator.
    :param aux_lr: RMSprop learning rate of the auxiliary network.
    :param disc_momentum: RMSprop momentum of the discriminator (0.5, §4.4).
    :param rmsprop_alpha: RMSprop smoothing constant of every optimizer.
    :param weight_decay: RMSprop weight decay of every optimizer.
    :param latent_dim: m; read from ``encoder.latent_dim`` when None.
    """

    def __init__(
        self,
        encoder: nn.Module | Mapping[str, Any],
        decoder: nn.Module | Mapping[str, Any],
        discriminator: nn.Module | Mapping[str, Any],
        auxiliary: nn.Module | Mapping[str, Any],
        attribute: str = "Smiling",
        alpha: float = 0.2,
        rho: float = 0.1,
        delta: float = 0.1,
        aux_weight: float = 1.0,
        aux_objective: str = "maximise",
        aux_steps: int = 1,
        xhat_class_weight: float = 0.0,
        gan_loss: str = "non_saturating",
        lr: float = 2e-4,
        disc_lr: float = 2e-4,
        aux_lr: float = 2e-4,
        disc_momentum: float = 0.5,
        rmsprop_alpha: float = 0.99,
        weight_decay: float = 0.0,
        latent_dim: int | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        if gan_loss not in GAN_LOSS_MODES:
            raise ValueError(f"gan_loss must be one of {GAN_LOSS_MODES}, got {gan_loss!r}")
        if aux_objective not in AUX_OBJECTIVES:
            raise ValueError(f"aux_objective must be one of {AUX_OBJECTIVES}, got {aux_objective!r}")
        if aux_steps < 1:
            raise ValueError(f"aux_steps must be >= 1, got {aux_steps}")
        self.encoder = build_network(encoder)
        self.decoder = build_network(decoder)
        self.discriminator = build_network(discriminator)
        self.auxiliary = build_network(auxiliary)
        self.latent_dim = self._check_shapes(latent_dim)
        self.save_hyperparameters(ignore=list(NETWORKS))
        self.save_hyperparameters(network_configs(self, NETWORKS))

    # -- construction -----------------------------------------------------------------------------------
    def _check_shapes(self, latent_dim: int | None) -> int:
        """Fail early, naming the argument, when the networks cannot be wired as [ŷ, z] -> D."""
        enc_latent = getattr(self.encoder, "latent_dim", None)
        latent_dim = latent_dim if latent_dim is not None else enc_latent
        if latent_dim is None:
            raise ValueError(
                "latent_dim is None and the encoder has no 'latent_dim' attribute; pass latent_dim"
            )
        if enc_latent is not None and enc_latent != latent_dim:
            raise ValueError(f"latent_dim={latent_dim} but encoder.latent_dim={enc_latent}")
        n_attributes = getattr(self.encoder, "n_attributes", 1)
        if n_attributes != 1:
            raise ValueError(
                f"IFCVAE factorises one binary attribute: the encoder needs n_attributes=1, got {n_attributes}"
            )
        dec_in = getattr(self.decoder, "in_features", None)
        if dec_in is not None and dec_in != latent_dim + 1:
            raise ValueError(
                f"decoder.in_features={dec_in}, but the decoder reads [ŷ, z] of size 1 + latent_dim = "
                f"{latent_dim + 1}"
            )
        aux_in = getattr(self.auxiliary, "in_features", None)
        aux_out = getattr(self.auxiliary, "out_features", 1)
        if (aux_in is not None and aux_in != latent_dim) or aux_out != 1:
            raise ValueError(
                f"the auxiliary network maps ẑ ({latent_dim}) to one logit; got in_features={aux_in}, "
                f"out_features={aux_out}"
            )
        return latent_dim

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """RMSprop (§4.4) per player, in the order [encoder φ, decoder θ, discriminator χ, auxiliary ψ]."""
        hp = self.hparams

        def rmsprop(module: nn.Module, lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
            return torch.optim.RMSprop(
                module.parameters(),
                lr=lr,
                alpha=hp.rmsprop_alpha,
                momentum=momentum,
                weight_decay=hp.weight_decay,
            )

        return [
            rmsprop(self.encoder, hp.lr),
            rmsprop(self.decoder, hp.lr),
            rmsprop(self.discriminator, hp.disc_lr, hp.disc_momentum),
            rmsprop(self.auxiliary, hp.aux_lr),
        ]

    # -- training (Algorithm 1) -------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, y = batch["x"], self._label(batch["pa"])
        opt_enc, opt_dec, opt_disc, opt_aux = self.optimizers()

        # Forward pass through all networks (inside the block, so that C and A, which the encoder/decoder
        # losses read, accumulate no gradient), then θ <- RMSprop(-∇θ L_dec) and φ <- RMSprop(-∇φ L_IFcVAE-GAN)
        # from ONE backward of a surrogate whose θ- and φ-gradients are exactly those (see _vae_losses).
        with only_trainable(self, [self.encoder, self.decoder]):
            out = self._forward(x, y)
            surrogate, terms = self._vae_losses(x, y, out)
            opt_enc.zero_grad(set_to_none=True)
            opt_dec.zero_grad(set_to_none=True)
            self.manual_backward(surrogate)
            opt_enc.step()
            opt_dec.step()

        # χ minimises L_gan and ψ minimises L_aux on the same forward pass (detached fakes and codes). Neither
        # χ nor ψ has moved yet, so all four updates use gradients taken at the same point, as in Algorithm 1.
        with only_trainable(self, [self.discriminator]):
            terms["gan_disc"] = self._disc_loss(x, out)
            self._step(opt_disc, terms["gan_disc"])
        with only_trainable(self, [self.auxiliary]):
            for _ in range(self.hparams.aux_steps):
                self._step(opt_aux, self._aux_loss(out, y))  # the first value is terms["aux"]

        self._log_terms("train", terms, out, y)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> Forward:
        """z ~ p(z); ẑ, ŷ <- E(x); x̂ <- D(ŷ, ẑ); x_p <- D(y, z); ỹ <- A(ẑ) (Algorithm 1, lines 5-8)."""
        mu, logvar, y_logit = self.encoder(x)
        z_hat = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        z = torch.randn_like(mu)
        y_logit = y_logit.squeeze(1)
        return Forward(
            mu=mu,
            logvar=logvar,
            y_logit=y_logit,
            z_hat=z_hat,
            x_hat_logits=self._decode(torch.sigmoid(y_logit), z_hat),
            x_p_logits=self._decode_prior(y, z),
            aux_logit=self.auxiliary(z_hat).squeeze(1),
        )

    def _decode_prior(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """D(y, z) for z ~ N(0, I), without updating normalisation running statistics.

        Evaluation decodes posterior codes (edits, reconstructions) with the running statistics; letting the
        prior samples update them too makes them describe a mixture that evaluation never sees, and early in
        training (posterior far from the prior) that alone ruins eval-mode reconstructions.
        """
        return without_stat_update(self.decoder, torch.cat([y.to(z.dtype)[:, None], z], dim=1))

    def _vae_losses(self, x: torch.Tensor, y: torch.Tensor, out: Forward) -> tuple[torch.Tensor, dict]:
        """The surrogate S whose gradient is ∇θ L_dec for θ and ∇φ L_IFcVAE-GAN for φ, and the named terms.

        S = [L_rec + δ·gen] + [α L_KL + ρ L_class − w_aux L_aux] + [w_x̂ L_class(x̂)]
        (with ``aux_objective="confusion"``, + w_aux L_bce(½, A(ẑ)) in place of − w_aux L_aux)
              shared by θ, φ      encoder-only: independent of θ      decoder-only: independent of φ

        The encoder-only terms read only E and A (x̂ is not involved), so ∇θ of them is 0; the decoder-only
        term is built so that ∇φ of it is 0 (``_xhat_class_loss``). Hence ∇θ S = ∇θ (shared + decoder-only)
        = ∇θ L_dec and ∇φ S = ∇φ (shared + encoder-only) = ∇φ L_IFcVAE-GAN exactly, and one backward pass
        serves both updates. ``gen`` is the generator-side GAN term that replaces −L_gan (eqs. 3, 4).
        """
        hp = self.hparams
        fake_logits = [self.discriminator(torch.sigmoid(f)) for f in (out.x_hat_logits, out.x_p_logits)]
        terms = {
            "rec": reconstruction_bce(out.x_hat_logits, x),
            "kl": kl_normal_std(out.mu, out.logvar),
            "class": bce_with_logits(out.y_logit, y),
            "aux": bce_with_logits(out.aux_logit, y),
            "gan_gen": gan_generator_loss(fake_logits, hp.gan_loss),
        }
        shared = terms["rec"] + hp.delta * terms["gan_gen"]
        encoder_only = hp.alpha * terms["kl"] + hp.rho * terms["class"]
        if hp.aux_weight and hp.aux_objective == "confusion":
            terms["aux_confusion"] = confusion_loss(out.aux_logit)
            encoder_only = encoder_only + hp.aux_weight * terms["aux_confusion"]
        elif hp.aux_weight:
            encoder_only = encoder_only - hp.aux_weight * terms["aux"]
        decoder_only = torch.zeros_like(shared)
        if hp.xhat_class_weight:
            terms["xhat_class"] = self._xhat_class_loss(out, y)
            decoder_only = hp.xhat_class_weight * terms["xhat_class"]
        terms["dec"] = (shared + decoder_only).detach()  # L_dec, eq. 3 (+ the row-3 ablation term)
        terms["enc"] = (shared + encoder_only).detach()  # L_IFcVAE-GAN, eq. 6
        return shared + encoder_only + decoder_only, terms

    def _xhat_class_loss(self, out: Forward, y: torch.Tensor) -> torch.Tensor:
        """L_bce(E_y(x̂), y) (Table 1 row 3) with a gradient for θ only.

        The paper's intent is label information for the DECODER. x̂ is re-decoded from the detached codes
        (ŷ, ẑ), which gives the same image and the same θ-gradient but none through the codes to φ, and E_y
        is evaluated with detached encoder parameters, so φ gets no gradient at all.
        Both calls use copies of the networks' buffers so BatchNorm running statistics are not updated
        twice per step.
        """
        codes = torch.cat([out.y_hat.detach()[:, None], out.z_hat.detach()], dim=1)
        x_hat = torch.sigmoid(without_stat_update(self.decoder, codes))
        detached = {n: p.detach() for n, p in self.encoder.named_parameters()}
        _, _, y_logit = without_stat_update(self.encoder, x_hat, parameters=detached)
        return bce_with_logits(y_logit.squeeze(1), y)

    def _disc_loss(self, x: torch.Tensor, out: Forward) -> torch.Tensor:
        """L_gan (§3.1) on x, x̂ and x_p; the fakes are detached so only χ is trained."""
        fakes = [torch.sigmoid(out.x_hat_logits.detach()), torch.sigmoid(out.x_p_logits.detach())]
        return gan_discriminator_loss(self.discriminator(x), [self.discriminator(f) for f in fakes])

    def _aux_loss(self, out: Forward, y: torch.Tensor) -> torch.Tensor:
        """L_aux = L_bce(A(ẑ), y) (eq. 5) on the detached ẑ, so only ψ is trained."""
        return bce_with_logits(self.auxiliary(out.z_hat.detach()).squeeze(1), y)

    # -- evaluation -------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        """The training losses on held-out data. The paper's metrics (MSE, Ĉ, E_y accuracy) are computed over
        the whole set by ``callbacks.editing_metrics``, so they are not repeated here."""
        x, y = batch["x"], self._label(batch["pa"])
        out = self._forward(x, y)
        _, terms = self._vae_losses(x, y, out)
        terms["gan_disc"] = self._disc_loss(x, out)
        self._log_terms(stage, terms, out, y)

    def _log_terms(self, stage: str, terms: dict, out: Forward, y: torch.Tensor) -> None:
        metrics = {f"{stage}/loss/{k}": v.detach() for k, v in terms.items()}
        metrics[f"{stage}/acc/aux"] = binary_accuracy_from_logits(out.aux_logit.detach(), y)
        if stage == "train":
            metrics["train/acc/E_y"] = binary_accuracy_from_logits(out.y_logit.detach(), y)
        self.log_dict(metrics, batch_size=y.shape[0], sync_dist=stage != "train")

    # -- the counterfactual contract --------------------------------------------------------------------
    def abduct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """ẑ = μ_φ(x): the posterior MEAN, so that editing is deterministic (§3.3 encodes, then decodes)."""
        return self.encoder(x)[0]

    def predict(self, noise: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """sigmoid(D([y, z])) in [0, 1] with y = pa[attribute] (0/1 or any value in [0, 1])."""
        return torch.sigmoid(self._decode(self._label(pa), noise))

    def counterfactual(
        self, x: torch.Tensor, pa: Mapping[str, torch.Tensor], do: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Attribute editing (§3.3): decode μ_φ(x) with ŷ set to the intervened value."""
        other = set(do) - {self.hparams.attribute}
        if other:
            raise ValueError(
                f"IFCVAE models only {self.hparams.attribute!r}; cannot intervene on {sorted(other)}"
            )
        return super().counterfactual(x, pa, do)

    def reconstruct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x̂ = D(E_y(x), E_z(x)) (§4.1): decoded with the encoder's OWN ŷ, not the label in ``pa``."""
        mu, _, y_logit = self.encoder(x)
        return torch.sigmoid(self._decode(torch.sigmoid(y_logit.squeeze(1)), mu))

    def sample(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """D(y, z) with z ~ N(0, I) and y = pa[attribute]."""
        y = self._label(pa)
        return self.predict(torch.randn(y.shape[0], self.latent_dim, device=y.device, dtype=y.dtype), pa)

    def predict_attributes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: sigmoid(E_y(x))}, E_y being the paper's classifier of §4.3."""
        return {self.hparams.attribute: torch.sigmoid(self.encoder(x)[2].squeeze(1))}

    # -- helpers ----------------------------------------------------------------------------------------
    def _label(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        name = self.hparams.attribute
        if name not in pa:
            raise KeyError(f"IFCVAE needs attribute {name!r} in pa; got {sorted(pa)}")
        return pa[name].float().reshape(-1)

    def _decode(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """D_θ([y, z]) -> image logits; y is [B] (ŷ or a label), z is [B, m]."""
        return self.decoder(torch.cat([y.to(z.dtype)[:, None], z], dim=1))

