"""Image encoders.

``ConvEncoder`` is the IFcVAE-GAN encoder E_φ split into two heads (paper Fig. 1a): E_z gives the Gaussian
posterior q_φ(z|x) = N(μ, diag σ²) and E_y the attribute logits. Both heads are linear layers on the SAME,
non-detached trunk features, so the classification loss on ŷ trains the trunk (the official code detaches
E_y's input, which turns E_y into a linear probe; we do not copy that).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.networks.blocks import ConvTrunk, init_weights, remember_config


class ConvEncoder(nn.Module):
    """x in [0, 1], [B, C, S, S] -> (μ [B, m], log σ² [B, m], y logits [B, k] or None when k = 0).

    :param image_size: S, a power of two >= 8 (the trunk downsamples to 4x4).
    :param in_channels: C.
    :param base_width: channels of the first stage (64 in the paper).
    :param latent_dim: m, the size of z (100 in the paper).
    :param n_attributes: k, the size of the attribute head E_y; 0 builds no head.
    :param arch: ``"dcgan"`` or ``"resnet"`` (see ``blocks``).
    :param norm: trunk normalisation, ``"none"`` (official code), ``"batch"`` or ``"instance"``.
    :param init: ``"default"`` (PyTorch) or ``"dcgan"`` (N(0, 0.02)).
    """

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        base_width: int = 64,
        latent_dim: int = 100,
        n_attributes: int = 1,
        arch: str = "dcgan",
        norm: str = "none",
        init: str = "default",
    ):
        super().__init__()
        remember_config(self, locals())
        self.latent_dim = latent_dim
        self.n_attributes = n_attributes
        self.trunk = ConvTrunk(image_size, in_channels, base_width, arch, norm)
        features = self.trunk.out_features
        self.mu = nn.Linear(features, latent_dim)
        self.logvar = nn.Linear(features, latent_dim)
        self.y = nn.Linear(features, n_attributes) if n_attributes > 0 else None
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h = self.trunk(x)
        y_logits = self.y(h) if self.y is not None else None
        return self.mu(h), self.logvar(h), y_logits
