"""Image discriminators.

``ConvDiscriminator`` is the IFcVAE-GAN's C_χ: the encoder's convolutional trunk (official code: same conv
stack, ReLU, no normalisation) followed by a linear layer to one logit. It returns the LOGIT; the GAN losses
apply the sigmoid inside BCE-with-logits.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.networks.blocks import ConvTrunk, init_weights, remember_config


class ConvDiscriminator(nn.Module):
    """x in [0, 1], [B, C, S, S] -> real/fake logit [B].

    :param image_size: S, a power of two >= 8.
    :param in_channels: C.
    :param base_width: channels of the first stage.
    :param arch: ``"dcgan"`` or ``"resnet"``.
    :param norm: trunk normalisation: ``"none"`` (official code), ``"batch"`` or ``"instance"``.
    :param init: ``"default"`` (PyTorch) or ``"dcgan"`` (N(0, 0.02)).
    """

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        base_width: int = 64,
        arch: str = "dcgan",
        norm: str = "none",
        init: str = "default",
    ):
        super().__init__()
        remember_config(self, locals())
        self.trunk = ConvTrunk(image_size, in_channels, base_width, arch, norm)
        self.head = nn.Linear(self.trunk.out_features, 1)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).squeeze(1)
