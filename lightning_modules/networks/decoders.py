"""Image decoders (generators).

``ConvDecoder`` maps a flat code h (for the IFcVAE-GAN, h = [ŷ, z]) to image LOGITS; ``sigmoid`` gives the
image in [0, 1], and the losses use BCE with logits, which is numerically stable where a sigmoid followed by
``log`` is not.

* ``"dcgan"`` (official IFcVAE-GAN code): Linear -> ReLU -> reshape to [w_last, 4, 4], then per stage a
  3x3 transposed conv (stride 2, pad 1, output pad 1) + BatchNorm + ReLU halving the width, the last stage a
  transposed conv straight to ``out_channels`` (no norm).
* ``"resnet"``: the same shapes; every stage is nearest x2 upsampling + 3x3 conv (the width change) followed by
  a pre-activation residual block, then BatchNorm + ReLU + 3x3 conv to ``out_channels`` at full resolution.

Widths mirror ``ConvTrunk``: the decoder starts from the trunk's last width at 4x4 and walks the widths back.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.networks.blocks import (
    ARCHS,
    NORMS,
    PreActResBlock,
    check_choice,
    init_weights,
    make_norm,
    remember_config,
    stage_widths,
)


class ConvDecoder(nn.Module):
    """h [B, in_features] -> image logits [B, out_channels, S, S].

    :param image_size: S, a power of two >= 8.
    :param out_channels: image channels.
    :param base_width: width of the last (full-resolution-side) stage, as in the encoder.
    :param in_features: size of the code; for the IFcVAE-GAN ``latent_dim + n_attributes`` (100 + 1).
    :param arch: ``"dcgan"`` or ``"resnet"``.
    :param norm: normalisation of the upsampling stages (``"batch"`` as in the official code).
    :param init: ``"default"`` (PyTorch) or ``"dcgan"`` (N(0, 0.02)).
    """

    def __init__(
        self,
        image_size: int = 64,
        out_channels: int = 3,
        base_width: int = 64,
        in_features: int = 101,
        arch: str = "dcgan",
        norm: str = "batch",
        init: str = "default",
    ):
        super().__init__()
        remember_config(self, locals())
        check_choice("arch", arch, ARCHS)
        check_choice("norm", norm, NORMS)
        self.in_features = in_features
        widths = stage_widths(image_size, base_width)[::-1]  # w_last, ..., base_width
        self.start_width = widths[0]
        self.fc = nn.Sequential(nn.Linear(in_features, widths[0] * 4 * 4), nn.ReLU())
        layers: list[nn.Module] = []
        if arch == "dcgan":
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
                layers += [_up_transposed(c_in, c_out), make_norm(norm, c_out), nn.ReLU()]
            layers.append(_up_transposed(widths[-1], out_channels))
        else:
            for c_in, c_out in zip(widths, widths[1:] + widths[-1:], strict=True):
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(c_in, c_out, 3, padding=1),
                    PreActResBlock(c_out, norm),
                ]
            layers += [
                make_norm(norm, widths[-1]),
                nn.ReLU(),
                nn.Conv2d(widths[-1], out_channels, 3, padding=1),
            ]
        self.net = nn.Sequential(*layers)
        init_weights(self, init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(h).view(h.shape[0], self.start_width, 4, 4))


def _up_transposed(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    """3x3 transposed conv that exactly doubles the resolution."""
    return nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)
