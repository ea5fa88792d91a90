"""Networks of the conditional ALI/BiGAN image mechanism (counterfactual_benchmark §3.2, App. A.4).

Encoder E(x, pa) -> u, generator G(u, pa) -> x and discriminator D(x, u, pa) -> logit, one parameterised class
each; the MorphoMNIST (Tables 11-13) and CelebA (Tables 14-16) networks are configs
(``configs/model/bigan.yaml``, ``bigan_celeba.yaml``). Images enter and leave in [0, 1] (the data contract);
E and D centre them to [-1, 1] inside, G maps its tanh output to [0, 1] (a sigmoid output already is).

Conditioning as published (App. A.4: "concatenating [the parents] with the image for the encoder and
discriminator, and with the latent variable for the generator"), for any parent set
(``datamodules.base.parents_from_spec``):

* E and D: one extra input channel per parent. A binary or continuous parent is a constant map of its value; a
  categorical one (MorphoMNIST's digit) a learned ``embed_resolution``² map per class (the reference's
  Embedding(10, 256) as a 16x16 map), upsampled to the image and squashed by tanh into the others' range.
* G: the parents join u at 1x1: binary/continuous as their value, categorical as a learned ``embed_dim``
  vector per class (the reference's Embedding(10, 256)).

Spatial layout. The tables' kernel/stride/padding columns do not reproduce the published shapes (Table 11's
1x1 stride-2 layers never reach 1x1; Table 13's five 3x3 stride-2 layers cannot run on 32x32), and the
reference code uses other kernels again. We keep the tables' layer counts, widths, normalisation, dropout and
activations, and derive the geometry from the resolution so that every S = 2^k >= 8 works:

* a downsampling stack (E, D_x) of ``widths``: n = log2(S/4) 4x4 stride-2 convs bring S to 4, a 4x4 valid conv
  (the "projection") brings 4 to 1, and any widths beyond n + 1 come first as 3x3 stride-1 stem convs;
* the generator mirrors it: a 4x4 transposed conv takes 1 to 4, n 4x4 stride-2 transposed convs take 4 to S,
  extra widths are 3x3 stride-1 convs, and an ``out_kernel`` conv gives the image channels;
* the code u and D's joint head are 1x1 convs on [B, ·, 1, 1] maps (as the reference's D_z and D_xz).

Published widths: MorphoMNIST E [64, 128, 256, 512] then u (512); G [512, 256, 128, 64] then 1 channel, tanh;
D_x [32, 64, 128, 256, 512] (BN on all but the last), D_z [512, 512], D_xz [1024, 1024] then 1. CelebA E
[64, 128, 256, 256, 512] + [512] then u (512), BN everywhere; G [512, 256, 256, 128, 64] then 3, BN,
sigmoid; D_x [64, 128, 256, 256, 1024], D_z [1024, 1024], D_xz [2048, 2048] then 1. D returns a logit (the
tables' final sigmoid is in the loss, ``binary_cross_entropy_with_logits``, for numerical stability).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.base import Attribute, condition_vector, parents_from_spec
from lightning_modules.networks.blocks import make_norm, num_stages, remember_config

OUTPUTS = ("tanh", "sigmoid")


def _per_layer(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """A dropout rate for each of ``n`` layers: one number for all, or one per layer."""
    if isinstance(value, Sequence):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} layers")
        return [float(v) for v in value]
    return [float(value)] * n


def _layer(conv: nn.Module, channels: int, norm: str, slope: float | None, dropout: float = 0.0) -> list[nn.Module]:
    """[Dropout2d] conv [norm] [LeakyReLU]: one row of Tables 11-16."""
    layers: list[nn.Module] = [nn.Dropout2d(dropout)] if dropout else []
    layers += [conv, make_norm(norm, channels)]
    if slope is not None:
        layers.append(nn.LeakyReLU(slope))
    return layers


class ParentMaps(nn.Module):
    """Parents -> [B, n_parents, S, S] maps for the image-side input of E and D (see the module docstring)."""

    def __init__(self, attributes: Sequence[Attribute], image_size: int, embed_resolution: int):
        super().__init__()
        self.attributes = tuple(attributes)
        self.image_size, self.embed_resolution = int(image_size), int(embed_resolution)
        self.embeddings = nn.ModuleDict({
            a.name: nn.Embedding(int(a.num_classes), embed_resolution**2)
            for a in self.attributes if a.kind == "categorical"
        })

    @property
    def channels(self) -> int:
        return len(self.attributes)

    def forward(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond, maps, col, size = condition_vector(pa, self.attributes), [], 0, self.image_size
        for a in self.attributes:
            values = cond[:, col:col + a.dim]
            col += a.dim
            if a.kind == "categorical":  # one-hot @ table = the class's map, differentiable in soft one-hots
                r = self.embed_resolution
                grid = (values @ self.embeddings[a.name].weight).view(-1, 1, r, r)
                maps.append(torch.tanh(F.interpolate(grid, size=(size, size), mode="nearest")))
            else:
                maps.append(values[:, :, None, None].expand(-1, 1, size, size))
        return torch.cat(maps, dim=1) if maps else cond.new_zeros(cond.shape[0], 0, size, size)


class ParentVector(nn.Module):
    """Parents -> [B, Σ width, 1, 1] for the generator's input (see the module docstring)."""

    def __init__(self, attributes: Sequence[Attribute], embed_dim: int):
        super().__init__()
        self.attributes = tuple(attributes)
        self.embeddings = nn.ModuleDict({
            a.name: nn.Embedding(int(a.num_classes), embed_dim) for a in self.attributes if a.kind == "categorical"
        })
        self.channels = sum(embed_dim if a.kind == "categorical" else 1 for a in self.attributes)

    def forward(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond, parts, col = condition_vector(pa, self.attributes), [], 0
        for a in self.attributes:
            values = cond[:, col:col + a.dim]
            col += a.dim
            parts.append(values @ self.embeddings[a.name].weight if a.kind == "categorical" else values)
        out = torch.cat(parts, dim=1) if parts else cond.new_zeros(cond.shape[0], 0)
        return out[:, :, None, None]


def down_stack(
    in_channels: int, image_size: int, widths: Sequence[int], norm: str, slope: float,
    dropout: Sequence[float], norm_projection: bool,
) -> nn.Sequential:
    """[stem 3x3 s1]* -> n x [4x4 s2] -> [4x4 valid] : S x S -> 1 x 1 (module docstring, "Spatial layout")."""
    n = num_stages(image_size)
    n_stem = len(widths) - n - 1
    if n_stem < 0:
        raise ValueError(f"{image_size}x{image_size} images need at least {n + 1} widths ({n} stride-2 convs to "
                         f"4x4 and one 4x4 projection), got {list(widths)}")
    layers: list[nn.Module] = []
    c_in = in_channels
    for i, c_out in enumerate(widths):
        if i < n_stem:
            conv = nn.Conv2d(c_in, c_out, 3, stride=1, padding=1)
        elif i < len(widths) - 1:
            conv = nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)
        else:
            conv = nn.Conv2d(c_in, c_out, 4, stride=1, padding=0)
        last = i == len(widths) - 1
        layers += _layer(conv, c_out, norm if (norm_projection or not last) else "none", slope, dropout[i])
        c_in = c_out
    return nn.Sequential(*layers)


class BiGANEncoder(nn.Module):
    """E(x, pa) -> u [B, latent_dim] (Tables 11, 14), x in [0, 1].

    :param image_size: S, a power of two >= 8.
    :param in_channels: image channels C.
    :param parents: the model's ``parents`` spec (``parents_from_spec``).
    :param widths: the downsampling stack (stems, stride-2 convs, 4x4 projection); see the module docstring.
    :param hidden: widths of 1x1 layers after the projection (CelebA's second 512).
    :param latent_dim: size of u (512 in both tables).
    :param norm: ``"none"`` (MorphoMNIST) or ``"batch"`` (CelebA) on every hidden layer.
    :param out_norm: normalise u itself (Table 14's last row has BN; Table 11's has none).
    :param slope: LeakyReLU slope (0.2).
    :param embed_resolution: side of a categorical parent's learned map before upsampling (16 as published).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 1,
        parents: Mapping[str, Any] | Sequence[str] = (),
        widths: Sequence[int] = (64, 128, 256, 512),
        hidden: Sequence[int] = (),
        latent_dim: int = 512,
        norm: str = "none",
        out_norm: bool = False,
        slope: float = 0.2,
        embed_resolution: int = 16,
    ):
        super().__init__()
        remember_config(self, locals())
        self.latent_dim = int(latent_dim)
        self.parent_maps = ParentMaps(parents_from_spec(parents), image_size, embed_resolution)
        c_in = in_channels + self.parent_maps.channels
        self.trunk = down_stack(c_in, image_size, widths, norm, slope, [0.0] * len(widths), norm_projection=True)
        layers: list[nn.Module] = []
        c = widths[-1]
        for w in hidden:
            layers += _layer(nn.Conv2d(c, w, 1), w, norm, slope)
            c = w
        layers += _layer(nn.Conv2d(c, latent_dim, 1), latent_dim, "batch" if out_norm else "none", None)
        self.head = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = torch.cat([2.0 * x - 1.0, self.parent_maps(pa).to(x.dtype)], dim=1)
        return self.head(self.trunk(h))


class BiGANGenerator(nn.Module):
    """G(u, pa) -> x in [0, 1], [B, C, S, S] (Tables 12, 15).

    :param image_size: S, a power of two >= 8.
    :param out_channels: image channels C.
    :param parents: the model's ``parents`` spec.
    :param latent_dim: size of u.
    :param widths: the upsampling stack: 1 -> 4 projection, n stride-2 transposed convs, extra 3x3 convs.
    :param norm: ``"none"`` (MorphoMNIST) or ``"batch"`` (CelebA) on every hidden layer (not on the output).
    :param output: ``"tanh"`` (MorphoMNIST; mapped to [0, 1] as (y + 1) / 2) or ``"sigmoid"`` (CelebA).
    :param out_kernel: kernel of the output conv (odd; 1 as Table 15's last row).
    :param slope: LeakyReLU slope (0.2).
    :param embed_dim: width of a categorical parent's learned vector (256 as published).
    """

    def __init__(
        self,
        image_size: int = 32,
        out_channels: int = 1,
        parents: Mapping[str, Any] | Sequence[str] = (),
        latent_dim: int = 512,
        widths: Sequence[int] = (512, 256, 128, 64),
        norm: str = "none",
        output: str = "tanh",
        out_kernel: int = 1,
        slope: float = 0.2,
        embed_dim: int = 256,
    ):
        super().__init__()
        remember_config(self, locals())
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if out_kernel % 2 != 1:
            raise ValueError(f"out_kernel must be odd (the output keeps the image size), got {out_kernel}")
        n = num_stages(image_size)
        if len(widths) < n + 1:
            raise ValueError(f"{image_size}x{image_size} images need at least {n + 1} generator widths (1->4, then "
                             f"{n} stride-2 transposed convs), got {list(widths)}")
        self.latent_dim, self.output = int(latent_dim), output
        self.parent_vector = ParentVector(parents_from_spec(parents), embed_dim)
        layers: list[nn.Module] = []
        c = latent_dim + self.parent_vector.channels
        for i, w in enumerate(widths):
            if i == 0:
                conv = nn.ConvTranspose2d(c, w, 4, stride=1, padding=0)
            elif i <= n:
                conv = nn.ConvTranspose2d(c, w, 4, stride=2, padding=1)
            else:
                conv = nn.Conv2d(c, w, 3, padding=1)
            layers += _layer(conv, w, norm, slope)
            c = w
        layers.append(nn.Conv2d(c, out_channels, out_kernel, padding=out_kernel // 2))
        self.net = nn.Sequential(*layers)

    def forward(self, u: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = torch.cat([u[:, :, None, None], self.parent_vector(pa).to(u.dtype)], dim=1)
        y = self.net(h)
        return 0.5 * (torch.tanh(y) + 1.0) if self.output == "tanh" else torch.sigmoid(y)


class BiGANDiscriminator(nn.Module):
    """D(x, u, pa) -> logit [B] (Tables 13, 16): D_xz([D_x(x, pa), D_z(u)]).

    :param image_size: S, a power of two >= 8.
    :param in_channels: image channels C.
    :param parents: the model's ``parents`` spec.
    :param latent_dim: size of u.
    :param x_widths: D_x, a downsampling stack (module docstring); normalised on all but its last layer.
    :param z_widths: D_z, 1x1 convs on u.
    :param xz_widths: D_xz's hidden 1x1 convs; a last 1x1 conv gives the logit.
    :param x_dropout, z_dropout, xz_dropout: Dropout2d before each layer: one rate or one per layer
        (``xz_dropout`` has len(xz_widths) + 1 entries, the logit layer included).
    :param norm: ``"batch"`` (both tables) or ``"none"``, in D_x.
    :param slope: LeakyReLU slope (0.1).
    :param embed_resolution: side of a categorical parent's learned map before upsampling (16).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 1,
        parents: Mapping[str, Any] | Sequence[str] = (),
        latent_dim: int = 512,
        x_widths: Sequence[int] = (32, 64, 128, 256, 512),
        z_widths: Sequence[int] = (512, 512),
        xz_widths: Sequence[int] = (1024, 1024),
        x_dropout: float | Sequence[float] = (0.2, 0.2, 0.5, 0.5, 0.5),
        z_dropout: float | Sequence[float] = (0.2, 0.5),
        xz_dropout: float | Sequence[float] = 0.2,
        norm: str = "batch",
        slope: float = 0.1,
        embed_resolution: int = 16,
    ):
        super().__init__()
        remember_config(self, locals())
        self.latent_dim = int(latent_dim)
        self.parent_maps = ParentMaps(parents_from_spec(parents), image_size, embed_resolution)
        self.dx = down_stack(in_channels + self.parent_maps.channels, image_size, x_widths, norm, slope,
                             _per_layer(x_dropout, len(x_widths), "x_dropout"), norm_projection=False)
        self.dz = self._pointwise(latent_dim, z_widths, _per_layer(z_dropout, len(z_widths), "z_dropout"), slope)
        xz_rates = _per_layer(xz_dropout, len(xz_widths) + 1, "xz_dropout")
        c_xz = x_widths[-1] + (z_widths[-1] if z_widths else latent_dim)
        c_last = xz_widths[-1] if xz_widths else c_xz
        self.dxz = nn.Sequential(
            self._pointwise(c_xz, xz_widths, xz_rates, slope),
            *_layer(nn.Conv2d(c_last, 1, 1), 1, "none", None, xz_rates[-1]),
        )

    @staticmethod
    def _pointwise(c_in: int, widths: Sequence[int], dropout: Sequence[float], slope: float) -> nn.Sequential:
        layers: list[nn.Module] = []
        for w, p in zip(widths, dropout, strict=False):
            layers += _layer(nn.Conv2d(c_in, w, 1), w, "none", slope, p)
            c_in = w
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, u: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hx = self.dx(torch.cat([2.0 * x - 1.0, self.parent_maps(pa).to(x.dtype)], dim=1))
        hz = self.dz(u[:, :, None, None])
        return self.dxz(torch.cat([hx, hz], dim=1)).flatten()
