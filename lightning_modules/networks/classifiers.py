"""Classifiers: the IFcVAE-GAN auxiliary network A_ψ and the convolutional attribute classifier.

Both return LOGITS [B, out]; the losses apply the sigmoid inside BCE-with-logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_modules.networks.blocks import ConvTrunk, init_weights, remember_config


class MLPClassifier(nn.Module):
    """Vector [B, in_features] -> logits [B, out_features]: Linear-ReLU per hidden layer, then Linear.

    The default is the official IFcVAE-GAN auxiliary network A_ψ(ẑ): 100 -> 1000 -> 1000 -> 1.
    """

    def __init__(
        self,
        in_features: int = 100,
        hidden: Sequence[int] = (1000, 1000),
        out_features: int = 1,
        init: str = "default",
    ):
        super().__init__()
        remember_config(self, locals())
        self.in_features = in_features
        self.out_features = out_features
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)
        init_weights(self, init)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v)


class ConvClassifier(nn.Module):
    """Image in [0, 1], [B, C, S, S] -> attribute logits [B, n_outputs].

    The independent attribute classifier of the IFcVAE-GAN paper's §4.1 (the official code used the
    discriminator architecture). It reuses the convolutional trunk, with BatchNorm by default because a
    classifier trained on its own benefits from it, and dropout before the linear head.

    :param image_size: S, a power of two >= 8.
    :param in_channels: C.
    :param base_width: channels of the first stage.
    :param n_outputs: number of binary attributes.
    :param arch: ``"dcgan"`` or ``"resnet"``.
    :param norm: trunk normalisation: ``"batch"`` (default), ``"instance"`` or ``"none"``.
    :param dropout: dropout probability on the flat features.
    :param init: ``"default"`` (PyTorch) or ``"dcgan"`` (N(0, 0.02)).
    """

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        base_width: int = 32,
        n_outputs: int = 1,
        arch: str = "dcgan",
        norm: str = "batch",
        dropout: float = 0.0,
        init: str = "default",
    ):
        super().__init__()
        remember_config(self, locals())
        self.n_outputs = n_outputs
        self.trunk = ConvTrunk(image_size, in_channels, base_width, arch, norm)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.trunk.out_features, n_outputs))
        init_weights(self, init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (flattened trunk) features [B, trunk.out_features], e.g. for a domain FID."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
