"""The encoder and decoder of the Deep-SCM conditional VAE (counterfactual_benchmark App. A.2, Tables 7-10).

One parameterised pair serves both datasets; ``configs/model/cvae.yaml`` (MorphoMNIST, Tables 7-8) and
``configs/model/cvae_celeba.yaml`` (CelebA, Tables 9-10) are the published variants.

``ConditionalEncoder``: x in [0, 1] and the parents' conditioning vector pa ->
q(z | x, pa) = N(μ, diag exp(logvar)). Downsampling stages [conv k×k stride 2 padding 1, activation, norm,
dropout], an optional 1×1 projection [conv, activation] (CelebA's 256-channel row), then

    h = act(Linear(flatten)),  h = act(Linear([h, pa])),  μ = Linear(h),  logvar = Linear(h)

so the parents join the output of the first Linear layer, as App. A.2 states. The tables' last row "Linear
(latent dim)" is these two heads; the tables list an activation on it, the published code (rightly) has none.

``ConditionalDecoder``: z and pa -> the discretized Gaussian's per-pixel (loc, log_scale) in [-1, 1] units:

    h = ReLU(Linear([z, pa])),  h = Linear(h) (+ act),  reshape to channels[0] × 4 × 4,
    then per conv: [nearest upsampling ×2 (×1 once at full resolution), conv k×k, activation, norm, dropout],
    loc = 1×1 conv(h),  log_scale = 1×1 conv(h) (learned σ) or the constant ``log_scale`` (fixed σ).

The number of ×2 upsamplings is log2(image_size / 4); convolutions beyond them run at full resolution (CelebA's
"Upsample 1x" row). The 1×1 heads are the "Gaussian network" of App. A.2.

Choices where the tables are silent or disagree with the published code (gulnazaki/counterfactual-benchmark):

* the order within a layer is conv -> activation -> norm -> dropout, as the published code;
* dropout is channel dropout (``nn.Dropout2d``), as the published code; it is applied to every downsampling
  stage of the encoder and every decoder convolution but the last (Tables 9-10), norm to every downsampling
  stage and every decoder convolution (the published code; Table 9 has no BN column);
* the encoder's log-variance is floored at −18 (log σ ≥ −9, the published floor);
* MorphoMNIST uses ReLU as Tables 7-8 say (the published encoder uses LeakyReLU(0.01)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lightning_modules.networks.blocks import check_choice, make_norm, remember_config

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid")
MIN_LOGVAR = -18.0  # log σ ≥ −9 for the posterior, the published floor


def make_activation(name: str) -> nn.Module:
    check_choice("activation", name, ACTIVATIONS)
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)  # LReLU(0.01) of Tables 9-10
    return nn.Sigmoid()


def _check_lists(**lists: Sequence[int]) -> None:
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"these lists need the same, non-zero length (one entry per layer): {lengths}")


class ConditionalEncoder(nn.Module):
    """(x [B, C, S, S] in [0, 1], pa [B, cond_dim]) -> (μ, logvar), each [B, latent_dim].

    :param image_size: S.
    :param in_channels: C.
    :param channels: output channels of the stride-2 stages (Table 7: [32, 32, 32]; Table 9: [32, 64, 128, 256]).
    :param kernels: their kernel sizes (Table 7: [5, 3, 3]; Table 9: [3, 3, 3, 3]).
    :param projection: channels of a final 1×1 convolution (Table 9: 256), or None for none.
    :param hidden_dim: width of the two Linear layers (128 / 256).
    :param latent_dim: size of z (16).
    :param cond_dim: width of the conditioning vector (``datamodules.base.condition_vector``).
    :param activation: ``"relu"`` or ``"leaky_relu"`` (slope 0.01).
    :param norm: ``"none"`` or ``"batch"`` after each stride-2 stage.
    :param dropout: channel-dropout probability after each stride-2 stage.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 32, 32),
        kernels: Sequence[int] = (5, 3, 3),
        projection: int | None = None,
        hidden_dim: int = 128,
        latent_dim: int = 16,
        cond_dim: int = 0,
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ):
        super().__init__()
        remember_config(self, locals())
        _check_lists(channels=channels, kernels=kernels)
        self.latent_dim, self.cond_dim = int(latent_dim), int(cond_dim)
        layers: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for c_out, k in zip(channels, kernels, strict=True):
            layers += [nn.Conv2d(c_in, c_out, k, stride=2, padding=1), make_activation(activation),
                       make_norm(norm, c_out), nn.Dropout2d(dropout)]
            c_in, size = c_out, (size + 2 - k) // 2 + 1
            if size < 1:
                raise ValueError(f"image_size {image_size} is too small for {len(channels)} stride-2 stages")
        if projection is not None:
            layers += [nn.Conv2d(c_in, projection, 1), make_activation(activation)]
            c_in = projection
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(c_in * size * size, hidden_dim), make_activation(activation))
        self.embed = nn.Sequential(nn.Linear(hidden_dim + cond_dim, hidden_dim), make_activation(activation))
        self.mu = nn.Linear(hidden_dim, latent_dim)
        self.logvar = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: torch.Tensor, pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(torch.cat([self.fc(self.conv(x)), pa.to(x.dtype)], dim=1))
        return self.mu(h), self.logvar(h).clamp(min=MIN_LOGVAR)


class ConditionalDecoder(nn.Module):
    """(z [B, latent_dim], pa [B, cond_dim]) -> (loc, log_scale), each [B, C, S, S] in [-1, 1] units.

    :param image_size: S, a power of two >= 8.
    :param out_channels: C.
    :param channels: channels of the 4×4 map and then of each convolution (Table 8: [32, 32, 32, 16];
        Table 10: [256, 256, 128, 64, 32, 16]).
    :param kernels: kernel size of each convolution (Table 8: [3, 3, 5]; Table 10: five 3s);
        padding keeps the size.
    :param hidden_dim: width of the first Linear layer (128 / 256).
    :param latent_dim: size of z.
    :param cond_dim: width of the conditioning vector.
    :param activation: of the convolutions, ``"relu"`` or ``"leaky_relu"``; the Linear layers use ReLU (both
        tables).
    :param last_activation: of the last convolution (Table 10: ``"sigmoid"``); None: ``activation``.
    :param fc_activation: an activation after the second Linear layer (Table 8: yes; Table 10: no).
    :param norm: ``"none"`` or ``"batch"`` after every convolution.
    :param dropout: channel-dropout probability after every convolution but the last.
    :param log_scale: the fixed per-pixel log σ (−2.5: σ² = e⁻⁵), or None to learn it per pixel with a
        second 1×1 head.
    """

    def __init__(
        self,
        image_size: int = 32,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 32, 32, 16),
        kernels: Sequence[int] = (3, 3, 5),
        hidden_dim: int = 128,
        latent_dim: int = 16,
        cond_dim: int = 0,
        activation: str = "relu",
        last_activation: str | None = None,
        fc_activation: bool = True,
        norm: str = "none",
        dropout: float = 0.0,
        log_scale: float | None = -2.5,
    ):
        super().__init__()
        remember_config(self, locals())
        _check_lists(convs=channels[1:], kernels=kernels)
        n_up = math.log2(image_size / 4) if image_size >= 8 else 0
        if n_up < 1 or n_up != int(n_up):
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
        if len(kernels) < n_up:
            raise ValueError(f"{len(kernels)} convolutions cannot upsample 4x4 to {image_size}x{image_size}: "
                             f"at least {int(n_up)} are needed")
        self.latent_dim, self.cond_dim = int(latent_dim), int(cond_dim)
        self.fixed_log_scale = None if log_scale is None else float(log_scale)
        self.base_channels = channels[0]
        fc: list[nn.Module] = [nn.Linear(latent_dim + cond_dim, hidden_dim), nn.ReLU(),
                               nn.Linear(hidden_dim, channels[0] * 4 * 4)]
        self.fc = nn.Sequential(*fc, nn.ReLU() if fc_activation else nn.Identity())
        layers: list[nn.Module] = []
        last = len(kernels) - 1
        for i, (c_in, c_out, k) in enumerate(zip(channels[:-1], channels[1:], kernels, strict=True)):
            act = last_activation if i == last and last_activation is not None else activation
            layers += [nn.Upsample(scale_factor=2 if i < n_up else 1, mode="nearest"),
                       nn.Conv2d(c_in, c_out, k, padding=k // 2), make_activation(act), make_norm(norm, c_out),
                       nn.Dropout2d(dropout if i < last else 0.0)]
        self.conv = nn.Sequential(*layers)
        self.loc = nn.Conv2d(channels[-1], out_channels, 1)
        self.scale_head = nn.Conv2d(channels[-1], out_channels, 1) if log_scale is None else None

    @property
    def learned_scale(self) -> bool:
        return self.scale_head is not None

    def forward(self, z: torch.Tensor, pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(torch.cat([z, pa.to(z.dtype)], dim=1)).view(-1, self.base_channels, 4, 4)
        h = self.conv(h)
        loc = self.loc(h)
        if self.scale_head is not None:
            return loc, self.scale_head(h)
        return loc, torch.full_like(loc, self.fixed_log_scale)
