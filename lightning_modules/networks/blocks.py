"""Building blocks shared by the encoders, decoders, discriminators and classifiers.

* ``ConvTrunk``: the downsampling convolutional trunk (image -> flat features) that the encoder, the
  discriminator and the convolutional classifier share. Two architectures:

  - ``"dcgan"``: the DCGAN-style trunk of the IFcVAE-GAN paper's ablation (Table 1) as in the official code:
    ``n`` stages of [5x5 conv, stride 2, pad 2, (norm), ReLU], no normalisation by default.
  - ``"resnet"``: the residual variant of the paper's §4.4, for which the paper gives no table. Our choice:
    every stage is a 3x3 stride-2 conv (the downsampling and the width change) followed by one
    pre-activation residual block (He et al., 2016, "Identity mappings"), and the trunk ends with
    norm + ReLU because a pre-activation block leaves its output un-normalised.

  The number of stages is ``log2(image_size / 4)``, so every trunk ends at 4x4 (32 -> 3 stages,
  64 -> 4 as in the paper, 128 -> 5). Stage ``i`` has ``base_width * min(2**i, 8)`` channels: the paper's
  64-128-256-512 for 64x64, capped at 8x base for larger images as DCGAN-style nets usually are.

* ``PreActResBlock``: ``x + conv(relu(norm(conv(relu(norm(x))))))`` with 3x3 convs.

* Rebuildable networks: every network of this package records the arguments it was built with as a
  ``_target_`` dict in ``module.config`` (``remember_config``), and ``build_network`` turns such a dict back into
  a module. The LightningModules store these dicts as hyperparameters, so ``load_from_checkpoint(path)`` can
  rebuild the networks without being handed them.

Weight initialisation: ``init="default"`` keeps PyTorch's default (Kaiming-uniform), which is what the
official IFcVAE-GAN code does (it never re-initialises); ``init="dcgan"`` draws conv/linear weights from
N(0, 0.02) and normalisation gains from N(1, 0.02) with zero biases (Radford et al., 2015).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

Arch = Literal["dcgan", "resnet"]
Norm = Literal["none", "batch", "instance"]
Init = Literal["default", "dcgan"]

ARCHS = ("dcgan", "resnet")
NORMS = ("none", "batch", "instance")
INITS = ("default", "dcgan")


# -- rebuildable networks --------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Tuples and OmegaConf containers -> plain lists/dicts, so configs pickle with ``weights_only`` and dump
    to YAML."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def remember_config(module: nn.Module, init_locals: dict[str, Any]) -> None:
    """Store ``{"_target_": <class path>, **constructor arguments}`` in ``module.config``.

    Call it at the top of ``__init__`` (after ``super().__init__()``) as ``remember_config(self, locals())``.
    """
    cls = type(module)
    names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    module.config = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
    module.config.update({n: _plain(init_locals[n]) for n in names})


def network_config(module: nn.Module | Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``_target_`` dict that rebuilds ``module``, or None for a network that does not record one."""
    if isinstance(module, Mapping):
        return _plain(module)
    config = getattr(module, "config", None)
    return _plain(config) if isinstance(config, Mapping) else None


def build_network(spec: nn.Module | Mapping[str, Any]) -> nn.Module:
    """A built module is returned as is; a ``{"_target_": "pkg.mod.Class", **kwargs}`` dict is instantiated.

    Only ``nn.Module`` subclasses may be named: a checkpoint's hyperparameters must not be able to call
    arbitrary functions.
    """
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise TypeError(f"expected an nn.Module or a dict with a '_target_' key, got {type(spec).__name__}")
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    module_path, _, name = str(spec["_target_"]).rpartition(".")
    target = getattr(importlib.import_module(module_path), name, None)
    if not (isinstance(target, type) and issubclass(target, nn.Module)):
        raise TypeError(f"_target_ {spec['_target_']!r} is not an nn.Module class")
    return target(**kwargs)


# -- shapes, norms, init ---------------------------------------------------------------------------------
def num_stages(image_size: int) -> int:
    """Stride-2 stages from ``image_size`` down to 4x4."""
    n = math.log2(image_size / 4) if image_size > 0 else -1
    if n < 1 or n != int(n):
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    return int(n)


def stage_widths(image_size: int, base_width: int) -> list[int]:
    return [base_width * min(2**i, 8) for i in range(num_stages(image_size))]


def make_norm(norm: str, channels: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def init_weights(module: nn.Module, init: str) -> None:
    check_choice("init", init, INITS)
    if init == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# -- blocks ----------------------------------------------------------------------------------------------
class PreActResBlock(nn.Module):
    """Pre-activation residual block with two 3x3 convolutions; keeps the shape."""

    def __init__(self, channels: int, norm: str = "batch"):
        super().__init__()
        self.body = nn.Sequential(
            make_norm(norm, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            make_norm(norm, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvTrunk(nn.Module):
    """Image [B, C, S, S] -> flat features [B, out_features], downsampling to 4x4 (see the module docstring)."""

    def __init__(
        self, image_size: int, in_channels: int, base_width: int, arch: str = "dcgan", norm: str = "none"
    ):
        super().__init__()
        check_choice("arch", arch, ARCHS)
        check_choice("norm", norm, NORMS)
        widths = stage_widths(image_size, base_width)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in widths:
            if arch == "dcgan":
                layers += [nn.Conv2d(c_in, c_out, 5, stride=2, padding=2), make_norm(norm, c_out), nn.ReLU()]
            else:
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), PreActResBlock(c_out, norm)]
            c_in = c_out
        if arch == "resnet":
            layers += [make_norm(norm, c_in), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_features = c_in * 4 * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
