"""VAE-GAN (Larsen, Sønderby, Larochelle and Winther, "Autoencoding beyond pixels using a learned similarity
metric", ICML 2016), the second baseline of CDVAE-GAN (Lim and Joo 2023, §2.3 and §4.1).

Encoder E -> q(z|x) = N(μ, Σ) (no Bernoulli latents, no attribute loss), decoder/generator G(z), discriminator
D. Larsen et al. replace the pixel likelihood by a Gaussian likelihood of D's l-th layer features
("feature-wise reconstruction", their eq. 7):

    L_llike^{Dis_l} = −E_q[log N(Dis_l(x) | Dis_l(G(z)), I)] = ½ Σ (Dis_l(G(z)) − Dis_l(x))²  (+ const)

and train E on L_prior + L_llike, G on γ L_llike − L_GAN (with the generator's GAN term) and D on L_GAN over
real images, prior samples and reconstructions (their Algorithm 1). This is CDVAE-GAN's Algorithm 1 with
k = 0 Bernoulli latents and L_Rec measured in D's feature space, so the class is a model of CDVAE-GAN's family
(``attribute_latents.AttributeLatentModel``), trained by ``cdvae_gan.algorithm_1``, with its losses and networks (``Table1Encoder(n_attributes=0)``, ``Table1Decoder(in_features=m)``,
``Table1Discriminator(feature_layer=3)``: Larsen et al. use the third convolution).

Counterfactuals by attribute-vector arithmetic (Larsen et al. §5.2; CDVAE-GAN §4.1): for attribute a, the
attribute vector v_a is the mean posterior mean μ(x) over training images with a = 1 minus that over training
images with a = 0; do(a = v) decodes μ(x) + (v − y_a) v_a (adds v_a to turn a on, subtracts it to turn it
off, leaves x alone when v equals the label y_a), summed over the attributes in ``do``.

How and when the vectors are computed: ``fit_attribute_vectors(loader)`` runs E in eval mode over the training
loader (the first ``attribute_vector_batches`` batches; None: all, as the paper) and stores them in the buffer
``attribute_vectors`` [k, m] with the flag ``attribute_vectors_ready``. Buffers are part of the state dict, so
every checkpoint carries the vectors of its own weights. During ``fit`` they are recomputed at the start of
every validation epoch (before the metric callbacks ask for counterfactuals, and before ModelCheckpoint saves
after validation); in ``validate``/``test`` they are computed only if the loaded checkpoint has none. An
attribute with a single class in the training data (the synthetic faces' constant columns) gets a zero vector
and a warning: its counterfactual is the reconstruction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_modules.attribute_latents import AttributeLatentModel, gaussian_kl
from lightning_modules.base import CounterfactualModule
from lightning_modules.cdvae_gan import algorithm_1
from lightning_modules.networks.frozen import evaluating, without_stat_update


def feature_reconstruction(features_rec: torch.Tensor, features_real: torch.Tensor) -> torch.Tensor:
    """L_llike^{Dis_l} (Larsen et al. eq. 7) up to its constant: ½ Σ (Dis_l(x') − Dis_l(x))² over every feature
    element, averaged over the batch."""
    return 0.5 * (features_rec - features_real).pow(2).flatten(1).sum(dim=1).mean()


def attribute_vector_sums(
    mu: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-attribute sums of μ [B, m] over the images with y = 1 and with y = 0 (y [B, k] in {0, 1}), and the
    counts: (sum_pos [k, m], n_pos [k], sum_neg [k, m], n_neg [k])."""
    y = y.to(mu.dtype)
    return y.T @ mu, y.sum(0), (1.0 - y).T @ mu, (1.0 - y).sum(0)


class VAEGAN(AttributeLatentModel):
    """VAE-GAN with attribute-vector counterfactuals (see the module docstring).

    :param encoder: E, x -> (μ [B, m], log Σ [B, m], None); ``Table1Encoder(n_attributes=0)``.
    :param decoder: G, z [B, m] -> image logits.
    :param discriminator: D with ``features(x)`` = Dis_l(x); ``Table1Discriminator``.
    :param attributes: the binary attributes of ``batch["pa"]`` that get attribute vectors (not modelled).
    :param gamma: γ, weight of L_llike in G's loss.
    :param gan_loss: ``"non_saturating"`` or ``"minimax"`` (G's GAN term).
    :param lr_encoder, lr_decoder, lr_discriminator, rmsprop_alpha: RMSprop settings (CDVAE-GAN's Table 1, as
        the paper compares the models under one setting).
    :param attribute_vector_batches: training batches averaged into the attribute vectors (None: all).
    """

    players = ("encoder", "decoder", "discriminator")
    bernoulli_latents = False
    # No attribute classifier of its own: the metric callbacks must not score one.
    predict_attributes = CounterfactualModule.predict_attributes

    def __init__(
        self,
        encoder: nn.Module | Mapping[str, Any],
        decoder: nn.Module | Mapping[str, Any],
        discriminator: nn.Module | Mapping[str, Any],
        attributes: Sequence[str],
        gamma: float = 15.0,
        gan_loss: str = "non_saturating",
        lr_encoder: float = 3e-4,
        lr_decoder: float = 3e-4,
        lr_discriminator: float = 3e-5,
        rmsprop_alpha: float = 0.99,
        attribute_vector_batches: int | None = None,
    ):
        super().__init__()
        self._build(locals())
        if not callable(getattr(self.discriminator, "features", None)):
            raise ValueError("the VAE-GAN measures reconstructions in D's features: the discriminator needs a "
                             "features(x) method (Table1Discriminator)")
        self.register_buffer("attribute_vectors", torch.zeros(len(self.attributes), self.latent_dim))
        self.register_buffer("attribute_vectors_ready", torch.tensor(False))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """CDVAE-GAN's Algorithm 1 with this model's code (z_G only) and reconstruction (in D's features)."""
        algorithm_1(self, batch)

    # -- the parts that differ from CDVAE-GAN ----------------------------------------------------------------
    def _code(self, z_g: torch.Tensor, pi_logits: torch.Tensor | None) -> torch.Tensor:
        return z_g

    def _prior_code(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=like.device, dtype=like.dtype)

    def _divergence_terms(self, out, y: torch.Tensor) -> dict[str, torch.Tensor]:
        kl = gaussian_kl(out.mu, out.logvar)
        return {"kl_g": kl, "div": kl}

    def _rec_loss(self, x_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """L_llike^{Dis_l}; D's features without updating its BatchNorm statistics (D is trained on L_GAN only)."""
        features = _Features(self.discriminator)
        return feature_reconstruction(without_stat_update(features, torch.sigmoid(x_logits)), without_stat_update(features, x))

    # -- attribute vectors ------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_attribute_vectors(self, batches: Iterable[Mapping[str, Any]], max_batches: int | None = None) -> None:
        """v_a = mean μ(x | a = 1) − mean μ(x | a = 0) over ``batches`` (the training loader), into the buffers."""
        k, m = self.attribute_vectors.shape
        sums = [torch.zeros(k, m, dtype=torch.float64, device=self.device) for _ in range(2)]
        counts = [torch.zeros(k, dtype=torch.float64, device=self.device) for _ in range(2)]
        with evaluating(self.encoder):
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch["x"].to(self.device)
                y = self._labels({a: batch["pa"][a].to(self.device) for a in self.attributes})
                parts = attribute_vector_sums(self.encoder(x)[0].double(), y.double())
                sums[0] += parts[0]
                counts[0] += parts[1]
                sums[1] += parts[2]
                counts[1] += parts[3]
        one_class = [a for a, n1, n0 in zip(self.attributes, counts[0], counts[1], strict=True) if n1 == 0 or n0 == 0]
        if one_class:
            rank_zero_warn(f"VAEGAN: attribute(s) {one_class} have one class only in the data the attribute vectors "
                           "are computed from; their vectors are 0 (their counterfactual is the reconstruction)")
        vectors = sums[0] / counts[0].clamp(min=1)[:, None] - sums[1] / counts[1].clamp(min=1)[:, None]
        vectors[(counts[0] == 0) | (counts[1] == 0)] = 0.0
        self.attribute_vectors.copy_(vectors.to(self.attribute_vectors.dtype))
        self.attribute_vectors_ready.fill_(True)

    def _fit_vectors_from_training_data(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError("VAEGAN computes its attribute vectors from the training split: run it with a "
                               "DataModule, or call fit_attribute_vectors(train_loader) first")
        self.fit_attribute_vectors(datamodule.train_dataloader(), self.hparams.attribute_vector_batches)

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING or not bool(self.attribute_vectors_ready):
            self._fit_vectors_from_training_data()

    def on_test_epoch_start(self) -> None:
        if not bool(self.attribute_vectors_ready):
            self._fit_vectors_from_training_data()

    # -- the counterfactual contract ---------------------------------------------------------------------------
    def abduct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """z = μ(x), the posterior mean."""
        return self.encoder(x)[0]

    def abduct_code(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]

    def predict(self, noise: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """G(z) in [0, 1]; the VAE-GAN is unconditional, so ``pa`` is not read."""
        return torch.sigmoid(self.decoder(noise))

    def counterfactual(
        self, x: torch.Tensor, pa: Mapping[str, torch.Tensor], do: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """G(μ(x) + Σ_{a in do} (do_a − y_a) v_a), y_a the label in ``pa``."""
        unknown = sorted(set(do) - set(self.attributes))
        if unknown:
            raise KeyError(f"VAEGAN has attribute vectors for {self.attributes}; cannot intervene on {unknown}")
        if not bool(self.attribute_vectors_ready):
            raise RuntimeError("VAEGAN's attribute vectors are not computed: call fit_attribute_vectors("
                               "train_loader), or load a checkpoint saved after a validation epoch")
        z = self.abduct_code(x)
        for name, value in do.items():
            shift = torch.as_tensor(value, dtype=z.dtype, device=z.device) - pa[name].to(z.dtype).reshape(-1)
            z = z + shift[:, None] * self.attribute_vectors[self.attributes.index(name)]
        return torch.sigmoid(self.decoder(z))

    def reconstruct(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.abduct_code(x)))

    def sample(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """G(z), z ~ N(0, I), one per row of ``pa`` (whose values the unconditional model cannot follow)."""
        n = next(iter(pa.values())).reshape(-1).shape[0]
        return self.predict(torch.randn(n, self.latent_dim, device=self.device), pa)


class _Features(nn.Module):
    """D's ``features`` as a module's forward, so ``without_stat_update`` can call it with copied buffers."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator.features(x)
