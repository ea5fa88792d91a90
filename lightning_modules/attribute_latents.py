"""The family of CDVAE-GAN: images with a Gaussian code z_G beside one Bernoulli latent z_B per attribute.

``AttributeLatentModel`` is what CDVAE-GAN (``cdvae_gan.py``), its VAE baseline (``vae_bernoulli.py``) and
Larsen et al.'s VAE-GAN with attribute-vector arithmetic (``vaegan.py``) share: the encoder/decoder/discriminator
players built from config, the codes and their divergence (CDVAE-GAN eqs. 3.2-3.5), the pixel reconstruction
(eq. 3.6), the evaluation steps, and the counterfactual contract (abduct z_G as μ and z_B as the thresholded π,
set the intervened entries, decode). Each method's file holds its constructor and its training step, the
paper's algorithm; a method without Bernoulli latents overrides the code (``bernoulli_latents = False``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.base import CounterfactualModule, binary_label_matrix, network_configs
from lightning_modules.losses import GAN_LOSS_MODES, gan_discriminator_loss
from lightning_modules.networks.blocks import build_network
from lightning_modules.networks.distributions import gaussian_kl as _kl


# -- losses (pure functions) ---------------------------------------------------------------------------------
def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z_G|x) ‖ N(0, I)), the first term of eqs. 3.3-3.4 (with the sign of a divergence, see the module
    docstring): ½ Σ_i (μ_i² + σ_i² − log σ_i² − 1), summed over the m latents and averaged over the batch."""
    return _kl(mu, logvar).sum(dim=1).mean()


def bernoulli_kl(y: torch.Tensor, pi_logits: torch.Tensor) -> torch.Tensor:
    """D_KL(y ‖ q(z_B|x)) of eq. 3.4: Σ_j y_j log(y_j / π_j) + (1 − y_j) log((1 − y_j) / (1 − π_j)), summed over
    the k attributes and averaged over the batch; π = sigmoid(``pi_logits``).

    0·log 0 is taken as its limit 0 exactly, so for y ∈ {0, 1} this is eq. 3.5, −Σ_j y_j log π_j +
    (1 − y_j) log(1 − π_j) (the binary cross-entropy); log π and log(1 − π) come from ``logsigmoid`` of the
    logits, which stays finite where sigmoid saturates.
    """
    y = y.to(pi_logits.dtype)
    entropy_terms = torch.special.xlogy(y, y) + torch.special.xlogy(1.0 - y, 1.0 - y)
    cross_terms = y * F.logsigmoid(pi_logits) + (1.0 - y) * F.logsigmoid(-pi_logits)
    return (entropy_terms - cross_terms).sum(dim=1).mean()


def divergence_loss(
    mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor, pi_logits: torch.Tensor, lambda_b: float
) -> torch.Tensor:
    """L_Div = L_Prior + λ_B L_B (eqs. 3.2-3.3)."""
    return gaussian_kl(mu, logvar) + lambda_b * bernoulli_kl(y, pi_logits)


def gaussian_reconstruction(x_logits: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """L_Rec = −log p(x | z) of eq. 3.6 for p = N(x', σ² I) up to its constant: ½ Σ ((x' − x) / σ)² over every
    pixel and channel, averaged over the batch; x' = sigmoid(``x_logits``) in [0, 1]."""
    return 0.5 * ((torch.sigmoid(x_logits) - x) / sigma).pow(2).flatten(1).sum(dim=1).mean()


def gan_value(real_logits: torch.Tensor, prior_logits: torch.Tensor, recon_logits: torch.Tensor) -> torch.Tensor:
    """L_GAN (eqs. 3.8-3.10), the value D maximises (≤ 0): minus the summed cross-entropy of
    ``losses.gan_discriminator_loss`` on the real batch and the two kinds of fake."""
    return -gan_discriminator_loss(real_logits, [prior_logits, recon_logits], "sum")


def relaxed_bernoulli(pi_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """A reparameterised relaxed-Bernoulli (binary Concrete) sample: sigmoid((logit π + log u − log(1 − u)) / τ),
    u ~ U(0, 1); the two-class case of the Gumbel-Softmax trick (eq. 2.3). τ → 0 gives Ber(π) samples."""
    u = torch.rand_like(pi_logits).clamp(1e-6, 1.0 - 1e-6)
    return torch.sigmoid((pi_logits + torch.log(u) - torch.log1p(-u)) / tau)


def hard_bernoulli(pi_logits: torch.Tensor) -> torch.Tensor:
    """The abducted z_B: 1 where π > 0.5 (logit > 0), else 0."""
    return (pi_logits > 0).to(pi_logits.dtype)


# -- the model -----------------------------------------------------------------------------------------------
@dataclass
class Forward:
    """E and G on a batch (Algorithm 1, lines 3-5): posterior parameters, the sampled code and x' logits."""

    mu: torch.Tensor
    logvar: torch.Tensor
    pi_logits: torch.Tensor | None  # [B, k]; None for models without Bernoulli latents
    z: torch.Tensor  # [z_G, z_B] (relaxed z_B), the code G decoded
    x_rec_logits: torch.Tensor


class AttributeLatentModel(CounterfactualModule):
    """The shared machinery of the module docstring; subclasses define ``players``, ``__init__`` (which calls
    ``_build(locals())``) and ``training_step``."""

    players: tuple[str, ...] = ("encoder", "decoder")
    bernoulli_latents = True

    # -- construction -------------------------------------------------------------------------------------
    def _build(self, args: dict[str, Any]) -> None:
        """Called by every subclass's ``__init__``: build the players, check their shapes, store the hyperparameters.

        The hyperparameters are saved as an explicit dict of THIS class's constructor arguments: Lightning's
        automatic collection would merge the arguments of every ``__init__`` up the class chain, and
        ``load_from_checkpoint`` would then pass a subclass arguments it does not take.
        """
        self.automatic_optimization = False
        args = {k: v for k, v in args.items() if k not in ("self", "__class__")}
        if args.get("gan_loss", "non_saturating") not in GAN_LOSS_MODES:
            raise ValueError(f"gan_loss must be one of {GAN_LOSS_MODES}, got {args['gan_loss']!r}")
        for name in self.players:
            setattr(self, name, build_network(args.pop(name)))
        self.attributes = [str(a) for a in args["attributes"]]
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes must be distinct names, at least one; got {self.attributes}")
        args["attributes"] = self.attributes
        self.latent_dim = self._check_shapes()
        self.save_hyperparameters(args)
        self.save_hyperparameters(network_configs(self, self.players))

    def _check_shapes(self) -> int:
        """Fail early, naming the setting to fix, when E and G cannot be wired as [z_G, z_B] -> G."""
        latent_dim = getattr(self.encoder, "latent_dim", None)
        if latent_dim is None:
            raise ValueError("the encoder needs a 'latent_dim' attribute (m, the size of z_G)")
        k = len(self.attributes) if self.bernoulli_latents else 0
        n_attributes = getattr(self.encoder, "n_attributes", k)
        if n_attributes != k:
            raise ValueError(f"the encoder has n_attributes={n_attributes}, but {type(self).__name__} needs "
                             f"{k} (one Bernoulli latent per attribute: {self.attributes})" if k else
                             f"the encoder has n_attributes={n_attributes}; {type(self).__name__} has no Bernoulli "
                             "latents, so set it to 0")
        dec_in = getattr(self.decoder, "in_features", None)
        if dec_in is not None and dec_in != latent_dim + k:
            raise ValueError(f"decoder.in_features={dec_in}, but the decoder reads [z_G, z_B] of size "
                             f"latent_dim + k = {latent_dim} + {k} = {latent_dim + k}")
        return latent_dim

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """RMSprop per player (Table 1), in the order of ``players``: [E, G, D]."""
        hp = self.hparams
        lrs = {"encoder": hp.lr_encoder, "decoder": hp.lr_decoder, "discriminator": hp.get("lr_discriminator")}
        return [torch.optim.RMSprop(getattr(self, p).parameters(), lr=lrs[p], alpha=hp.rmsprop_alpha)
                for p in self.players]

    def _forward(self, x: torch.Tensor) -> Forward:
        """E(x) -> (μ, log Σ, π); z = [μ + σ ε, relaxed-Bernoulli(π, τ)]; x' = G(z)."""
        mu, logvar, pi_logits = self.encoder(x)
        z = self._code(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu), pi_logits)
        return Forward(mu, logvar, pi_logits, z, self.decoder(z))

    def _code(self, z_g: torch.Tensor, pi_logits: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([z_g, relaxed_bernoulli(pi_logits, self.hparams.tau)], dim=1)

    def _prior_code(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """z̃ = [z̃_G ~ N(0, I), z̃_B ~ Ber(η)] (Algorithm 1 line 7)."""
        z_g = torch.randn(n, self.latent_dim, device=like.device, dtype=like.dtype)
        p = torch.full((n, len(self.attributes)), self.hparams.prior_p, device=like.device, dtype=like.dtype)
        return torch.cat([z_g, torch.bernoulli(p)], dim=1)

    def _divergence_terms(self, out: Forward, y: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"kl_g": gaussian_kl(out.mu, out.logvar), "kl_b": bernoulli_kl(y, out.pi_logits)}
        terms["div"] = terms["kl_g"] + self.hparams.lambda_b * terms["kl_b"]
        return terms

    def _rec_loss(self, x_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return gaussian_reconstruction(x_logits, x, self.hparams.rec_sigma)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        """The training losses on held-out data (the counterfactual metrics are the callbacks' job)."""
        x, y = batch["x"], self._labels(batch["pa"])
        out = self._forward(x)
        terms = self._divergence_terms(out, y)
        terms["rec"] = self._rec_loss(out.x_rec_logits, x)
        if "discriminator" in self.players:
            x_prior = torch.sigmoid(self.decoder(self._prior_code(x.shape[0], x)))
            terms["gan"] = gan_value(self.discriminator(x), self.discriminator(x_prior),
                                     self.discriminator(torch.sigmoid(out.x_rec_logits)))
        self._log_terms(stage, terms, out, y)

    def _log_terms(self, stage: str, terms: dict[str, torch.Tensor], out: Forward, y: torch.Tensor) -> None:
        metrics = {f"{stage}/loss/{k}": v.detach() for k, v in terms.items()}
        if out.pi_logits is not None:
            metrics[f"{stage}/acc/pi"] = (hard_bernoulli(out.pi_logits.detach()) == y).float().mean()
        self.log_dict(metrics, batch_size=y.shape[0], sync_dist=stage != "train")

    # -- the counterfactual contract (§3.3) --------------------------------------------------------------------
    def abduct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """z_G = μ(x), the posterior mean (deterministic counterfactuals)."""
        return self.encoder(x)[0]

    def predict(self, noise: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """G(z_G, z_B = the attribute values in ``pa``) in [0, 1]: the decoder as the image mechanism."""
        return torch.sigmoid(self.decoder(torch.cat([noise, self._labels(pa).to(noise.dtype)], dim=1)))

    def abduct_code(self, x: torch.Tensor) -> torch.Tensor:
        """[z_G, z_B] = [μ(x), 1{π(x) > 0.5}] (§3.3, Figure 6)."""
        mu, _, pi_logits = self.encoder(x)
        return torch.cat([mu, hard_bernoulli(pi_logits)], dim=1)

    def counterfactual(
        self, x: torch.Tensor, pa: Mapping[str, torch.Tensor], do: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Abduct [z_G, z_B] from x, set z_B's entries named in ``do`` to the requested 0/1 values, decode."""
        unknown = sorted(set(do) - set(self.attributes))
        if unknown:
            raise KeyError(f"{type(self).__name__} models attributes {self.attributes}; cannot intervene on {unknown}")
        code = self.abduct_code(x)
        for name, value in do.items():
            j = self.latent_dim + self.attributes.index(name)
            code[:, j] = torch.as_tensor(value, dtype=code.dtype, device=code.device).expand(code.shape[0])
        return torch.sigmoid(self.decoder(code))

    def reconstruct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x' = G(μ(x), 1{π(x) > 0.5}): decoded with the encoder's own z_B, not the labels in ``pa``."""
        return torch.sigmoid(self.decoder(self.abduct_code(x)))

    def sample(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """G(z_G, z_B = pa) with z_G ~ N(0, I)."""
        y = self._labels(pa)
        return self.predict(torch.randn(y.shape[0], self.latent_dim, device=y.device, dtype=y.dtype), pa)

    def predict_attributes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: π(x)}: E's Bernoulli parameters, the model's own attribute classifier."""
        pi = torch.sigmoid(self.encoder(x)[2])
        return {name: pi[:, j] for j, name in enumerate(self.attributes)}

    # -- helpers ------------------------------------------------------------------------------------------------
    def _labels(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """y [B, k] from ``pa`` in z_B's order."""
        return binary_label_matrix(pa, self.attributes, type(self).__name__)
