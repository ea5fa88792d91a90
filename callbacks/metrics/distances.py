"""Per-image distances for the counterfactual metrics (composition, reversibility): ``distance(x, y) -> [B]``.

Images follow the data contract: float tensors [B, C, H, W] in [0, 1], C = 1 or 3. Every distance returns one
value per image pair, so set-level numbers are means over images, never means of per-batch means (the
counterfactual benchmark of Melistas et al. averages LPIPS per batch, and its batch size differs by model).

* :class:`PixelL1` — the benchmark's "l1 image space" (its Tables 1–2):
  ``d(x, y) = 255 · mean_{c,h,w} |x_chw - y_chw|``, i.e. the mean absolute difference over all C·H·W
  values of one image on the 0–255 scale. The benchmark truncates CelebA values to int32 before averaging;
  we do not (truncation biases every value down by up to 1).
* :class:`LPIPSDistance` — LPIPS (Zhang et al. 2018) from the ``lpips`` package, v0.1 linear heads on an
  ImageNet AlexNet or VGG-16 trunk. Inputs are mapped from [0, 1] to LPIPS' [-1, 1] (``2x - 1``); grayscale
  is repeated to 3 channels; there is no resizing (as in the benchmark). The paper uses the VGG trunk.
  Minimum input size: 32 × 32 for ``alex`` (its fourth pooling stage), 16 × 16 for ``vgg``.
* :class:`EmbeddingL1` — ``d(x, y) = mean_k |f(x)_k - f(y)_k|`` for any feature extractor ``f`` (the
  benchmark's "l1 embeddings"): the concatenated penultimate layers of the anti-causal predictors
  (MorphoMNIST, see :class:`ConcatFeatures`) or VGG-16 fc7 (CelebA, :func:`vgg16_fc7`).

Pretrained backbones are read from torch hub's cache, ``$TORCH_HOME/hub/checkpoints/`` (``torch.hub.get_dir()``),
and never downloaded here: a missing file raises :class:`PretrainedWeightsMissing`, which names the file, the
folder and the URL to fetch it from. torch hub checks hashes only when it downloads, so any file with the right
name is loaded as is (tests save randomly initialised weights under that name).

Evaluation never changes a network: every forward pass runs under ``torch.no_grad()`` with all submodules in
eval mode (so BatchNorm uses, and does not update, its running statistics, and dropout is off — the
benchmark's VGG embedding was left in train mode, with dropout active on fc7), and each submodule's
``training`` flag is restored afterwards (:func:`evaluating`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import lpips
import torch
import torchvision
from torch import Tensor, nn

from lightning_modules.networks.frozen import evaluating

__all__ = [
    "HUB_WEIGHTS",
    "ConcatFeatures",
    "EmbeddingL1",
    "ImageDistance",
    "LPIPSDistance",
    "PixelL1",
    "PretrainedWeightsMissing",
    "evaluating",
    "hub_checkpoint_path",
    "load_hub_state_dict",
    "to_rgb",
    "vgg16_fc7",
]

#: torchvision ImageNet weights used here: file name in the hub cache -> download URL.
HUB_WEIGHTS = {
    "alexnet-owt-7be5be79.pth": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg16-397923af.pth": "https://download.pytorch.org/models/vgg16-397923af.pth",
}
_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsMissing(FileNotFoundError):
    """A pretrained weights file is not in torch hub's cache; the message says which file, where and from where."""


def hub_checkpoint_path(filename: str) -> Path:
    """Where torch hub keeps (and torchvision reads) ``filename``: ``$TORCH_HOME/hub/checkpoints/filename``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_hub_state_dict(filename: str) -> dict[str, Tensor]:
    """The state dict stored in torch hub's cache under ``filename``, on CPU; never downloads.

    :raises PretrainedWeightsMissing: the file is absent (the message names it, its folder and its URL).
    """
    path = hub_checkpoint_path(filename)
    if not path.is_file():
        url = HUB_WEIGHTS.get(filename, "the torchvision model zoo")
        raise PretrainedWeightsMissing(
            f"pretrained weights {filename!r} not found in torch hub's cache {path.parent}/ "
            f"($TORCH_HOME/hub/checkpoints/; TORCH_HOME defaults to ~/.cache/torch). Download {url} on a machine "
            f"with internet and copy it to {path} (nothing is downloaded during evaluation)."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def to_rgb(x: Tensor) -> Tensor:
    """[B, 1, H, W] repeated to [B, 3, H, W]; [B, 3, H, W] unchanged; anything else is an error."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images [B, ...], got shape {tuple(x.shape)}")


class ImageDistance(nn.Module):
    """Base: ``forward(x, y) -> [B]`` per-image distances, computed in eval mode under ``no_grad``.

    Subclasses implement ``_distance``; ``forward`` wraps it in :func:`evaluating` so that no network inside a
    distance is ever updated, whatever mode its owner is in.
    """

    #: short name used in metric keys, e.g. ``composition/l1/10``.
    name: str = "distance"

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        with evaluating(self):
            return self._distance(x, y)

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError


class PixelL1(ImageDistance):
    """``255 · mean_{c,h,w} |x - y|`` per image, in float64 (images in [0, 1]; no quantisation)."""

    name = "l1"

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        diff = x.to(torch.float64) - y.to(torch.float64)
        return diff.abs().flatten(1).mean(1) * 255.0


class LPIPSDistance(ImageDistance):
    """LPIPS v0.1 per image pair, on an ImageNet ``"vgg"`` (VGG-16) or ``"alex"`` (AlexNet) trunk.

    The trunk's weights come from torchvision's ImageNet file in the hub cache (``vgg16-397923af.pth`` or
    ``alexnet-owt-7be5be79.pth``); the linear heads ship with the ``lpips`` package.

    :raises PretrainedWeightsMissing: the trunk's file is not in ``$TORCH_HOME/hub/checkpoints/``.
    """

    name = "lpips"

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        if net not in _BACKBONE_FILES:
            raise ValueError(f"net must be one of {sorted(_BACKBONE_FILES)}, got {net!r}")
        self.net = net
        state = load_hub_state_dict(_BACKBONE_FILES[net])  # fails fast, before building anything
        # A random trunk first (no download attempted), then torchvision's ImageNet features copied in.
        with warnings.catch_warnings():  # lpips still passes torchvision's deprecated ``pretrained=False``
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.lpips = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        self._load_trunk(
            {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        )
        self.lpips.requires_grad_(False)

    def _load_trunk(self, features: dict[str, Tensor]) -> None:
        """Copy torchvision's ``features.<i>.*`` tensors into lpips' trunk, strictly (every trunk tensor, and
        nothing but real parameters of the same shapes): lpips splits ``features`` into slices whose children keep
        their index ``i`` as name."""
        used = set()
        for slice_ in self.lpips.net.children():
            for index, layer in slice_.named_children():
                own = {k: v for k, v in features.items() if k.split(".", 1)[0] == index}
                layer.load_state_dict({k.split(".", 1)[1]: v for k, v in own.items()})  # strict
                used |= own.keys()
        if not used:
            raise RuntimeError(f"no torchvision features were loaded into the LPIPS {self.net} trunk")

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = to_rgb(x).float(), to_rgb(y).float()
        return self.lpips(2 * x - 1, 2 * y - 1).flatten()


class EmbeddingL1(ImageDistance):
    """``mean_k |f(x)_k - f(y)_k|`` per image, ``f`` any feature extractor returning [B, ...] (flattened).

    The extractor is held as a submodule (it moves with ``.to(device)``) and runs in eval mode; its parameters
    are not modified (their ``requires_grad`` flags are left as they are).
    """

    name = "embedding_l1"

    def __init__(self, feature_extractor: nn.Module) -> None:
        super().__init__()
        self.feature_extractor = feature_extractor

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        fx = self.feature_extractor(x).flatten(1).to(torch.float64)
        fy = self.feature_extractor(y).flatten(1).to(torch.float64)
        return (fx - fy).abs().mean(1)


class ConcatFeatures(nn.Module):
    """Concatenation of several extractors' flattened features, e.g. the penultimate layers of all anti-causal
    predictors (the benchmark's MorphoMNIST embedding, 3 × 64 = 192 dimensions)."""

    def __init__(self, extractors: Sequence[nn.Module]) -> None:
        super().__init__()
        if not extractors:
            raise ValueError("ConcatFeatures needs at least one extractor")
        self.extractors = nn.ModuleList(extractors)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([f(x).flatten(1) for f in self.extractors], dim=1)


class _VGG16FC7(nn.Module):
    """[0, 1] images (1 or 3 channels) -> ImageNet normalisation -> VGG-16 -> fc7 (after ReLU), [B, 4096]."""

    def __init__(self, vgg: torchvision.models.VGG) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.features, self.avgpool = vgg.features, vgg.avgpool
        self.fc7 = vgg.classifier[:-1]  # fc6, ReLU, dropout, fc7, ReLU, dropout (dropout is off in eval)

    def forward(self, x: Tensor) -> Tensor:
        x = (to_rgb(x).float() - self.mean) / self.std
        return self.fc7(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16_fc7() -> nn.Module:
    """VGG-16 with ImageNet weights (``vgg16-397923af.pth`` from the hub cache) cut at fc7, frozen, in eval mode.

    Use as ``EmbeddingL1(vgg16_fc7())`` for the benchmark's CelebA "l1 embeddings" (no resizing, as there).

    :raises PretrainedWeightsMissing: the file is not in ``$TORCH_HOME/hub/checkpoints/``.
    """
    state = load_hub_state_dict(_BACKBONE_FILES["vgg"])
    vgg = torchvision.models.vgg16()
    vgg.load_state_dict(state)
    return _VGG16FC7(vgg).requires_grad_(False).eval()
