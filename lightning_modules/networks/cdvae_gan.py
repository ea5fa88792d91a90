"""The CDVAE-GAN networks of Table 1 (Lim and Joo, 2023), parameterised by resolution, channels and widths.

Table 1 (64x64 RGB), every convolution 5x5:

* encoder E: Conv 64, 128, 256, 512 (stride 2, BatchNorm, ReLU) -> FC 2048 (BatchNorm, ReLU) -> FC 1024
  (BatchNorm, ReLU) -> heads μ (FC m), Σ (FC m, Exp) and π (FC k, Sigmoid);
* decoder/generator G: FC 8x8x512 (BatchNorm, ReLU) -> ConvTr 512, 256, 128, 64 (BatchNorm, ReLU) ->
  ConvTr 3 -> Tanh;
* discriminator D: Conv 64, 128, 256, 512 (BatchNorm, LeakyReLU) -> FC 2048 (LeakyReLU) -> FC 1 -> Sigmoid.

The table gives neither strides nor paddings. Ours: convolutions with stride 2 and padding 2 halve the side
(64 -> 4 after four); the decoder's first ``log2(image_size / start_size)`` transposed convolutions double it
(8 -> 64 with 512, 256, 128), the rest keep it (64, then 3). So 128x128 (Figure 8) adds one stage to the
encoder and discriminator and makes the decoder's fourth stage upsample too.

Conventions of this package (``networks.blocks``): images in [0, 1]; the decoder returns LOGITS ``h`` with
``sigmoid(h) = (tanh(h / 2) + 1) / 2``, i.e. Table 1's Tanh output mapped from [-1, 1] to [0, 1]; the
encoder returns log Σ (its Exp is applied by the losses) and the LOGITS of π; the discriminator returns the
logit of D(x). Every network records its constructor arguments (``remember_config``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_modules.networks.blocks import remember_config


def _down_stages(image_size: int, in_channels: int, widths: Sequence[int], act: type[nn.Module]) -> tuple:
    """[5x5 conv stride 2, BatchNorm, activation] per width -> (Sequential, flat feature size)."""
    side = image_size
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out in widths:
        if side % 2:
            raise ValueError(f"image_size={image_size} cannot be halved {len(widths)} times; use a power of two")
        layers += [nn.Conv2d(c_in, c_out, 5, stride=2, padding=2), nn.BatchNorm2d(c_out), act()]
        c_in, side = c_out, side // 2
    return nn.Sequential(*layers), c_in * side * side


def _leaky() -> nn.Module:
    return nn.LeakyReLU(0.2)


class Table1Encoder(nn.Module):
    """x in [0, 1], [B, C, S, S] -> (μ [B, m], log Σ [B, m], π logits [B, k] or None when k = 0).

    :param image_size: S, divisible by ``2 ** len(widths)``.
    :param in_channels: C.
    :param widths: channels of the stride-2 convolutions (Table 1: 64, 128, 256, 512).
    :param hidden: widths of the fully connected layers after them (Table 1: 2048, 1024).
    :param latent_dim: m, the size of z_G (100).
    :param n_attributes: k, the number of Bernoulli latents z_B (38); 0 for the VAE-GAN's encoder.
    """

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        hidden: Sequence[int] = (2048, 1024),
        latent_dim: int = 100,
        n_attributes: int = 38,
    ):
        super().__init__()
        remember_config(self, locals())
        self.latent_dim = latent_dim
        self.n_attributes = n_attributes
        self.convs, features = _down_stages(image_size, in_channels, widths, nn.ReLU)
        fc: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            fc += [nn.Linear(features, h), nn.BatchNorm1d(h), nn.ReLU()]
            features = h
        self.fc = nn.Sequential(*fc)
        self.mu = nn.Linear(features, latent_dim)
        self.logvar = nn.Linear(features, latent_dim)
        self.pi = nn.Linear(features, n_attributes) if n_attributes > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h = self.fc(self.convs(x))
        return self.mu(h), self.logvar(h), self.pi(h) if self.pi is not None else None


class Table1Decoder(nn.Module):
    """z [B, in_features] -> image logits [B, C, S, S] (``sigmoid`` gives Table 1's Tanh output in [0, 1]).

    :param image_size: S = ``start_size * 2 ** n`` with ``n <= len(widths)`` upsampling stages.
    :param out_channels: C.
    :param in_features: size of the code (m + k for CDVAE-GAN's [z_G, z_B], m for the VAE-GAN).
    :param widths: transposed-convolution channels after the FC layer (Table 1: 512, 256, 128, 64); the first
        ``log2(image_size / start_size)`` upsample.
    :param start_size: side of the FC layer's feature map (8).
    :param start_width: channels of that map (512).
    """

    def __init__(
        self,
        image_size: int = 64,
        out_channels: int = 3,
        in_features: int = 138,
        widths: Sequence[int] = (512, 256, 128, 64),
        start_size: int = 8,
        start_width: int = 512,
    ):
        super().__init__()
        remember_config(self, locals())
        n_up = (image_size // start_size).bit_length() - 1
        if start_size * 2**n_up != image_size or n_up > len(widths):
            raise ValueError(f"image_size={image_size} must be start_size={start_size} times 2**n with "
                             f"n <= len(widths)={len(widths)}")
        self.in_features = in_features
        self.start = (start_width, start_size, start_size)
        self.fc = nn.Sequential(nn.Linear(in_features, start_width * start_size**2),
                                nn.BatchNorm1d(start_width * start_size**2), nn.ReLU())
        layers: list[nn.Module] = []
        c_in = start_width
        for i, c_out in enumerate(widths):
            layers += [_transposed(c_in, c_out, upsample=i < n_up), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers.append(_transposed(c_in, out_channels, upsample=False))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # 2 * tanh-preactivation: sigmoid(2a) = (tanh(a) + 1) / 2, Table 1's Tanh rescaled to [0, 1].
        return 2.0 * self.net(self.fc(z).view(z.shape[0], *self.start))


def _transposed(c_in: int, c_out: int, upsample: bool) -> nn.ConvTranspose2d:
    """5x5 transposed convolution that doubles the side (stride 2) or keeps it."""
    if upsample:
        return nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1)
    return nn.ConvTranspose2d(c_in, c_out, 5, stride=1, padding=2)


class Table1Discriminator(nn.Module):
    """x in [0, 1], [B, C, S, S] -> logit of D(x) [B]; ``features(x)`` gives the VAE-GAN's Dis_l(x).

    :param image_size: S, divisible by ``2 ** len(widths)``.
    :param in_channels: C.
    :param widths: channels of the stride-2 convolutions (Table 1: 64, 128, 256, 512).
    :param hidden: width of the FC layer before the logit (2048).
    :param feature_layer: how many convolution stages ``features`` runs (Larsen et al. 2016 use the third
        of four convolutions for the learned similarity metric).
    """

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        hidden: int = 2048,
        feature_layer: int = 3,
    ):
        super().__init__()
        remember_config(self, locals())
        if not 1 <= feature_layer <= len(widths):
            raise ValueError(f"feature_layer must be between 1 and len(widths)={len(widths)}, got {feature_layer}")
        self.feature_layer = feature_layer
        self.convs, features = _down_stages(image_size, in_channels, widths, _leaky)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), _leaky(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x)).squeeze(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Dis_l(x): the output of the ``feature_layer``-th conv stage (after BatchNorm and LeakyReLU)."""
        return self.convs[: 3 * self.feature_layer](x)
