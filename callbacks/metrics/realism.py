"""Realism of counterfactuals: Fréchet distance (FID) and kernel distance (KID) between feature sets.

The counterfactual benchmark (Melistas et al., §3.3 "Realism", Table 5) reports FID "which captures the
similarity of the set of counterfactual images to all images in the dataset", with features from the Inception v3
network of Heusel et al. Two feature extractors are offered, as separately named options, never as a silent
substitute for one another:

* ``"fid_inception"``: pytorch-fid's ``InceptionV3([3])``, the 2048-d final average-pool features, with the
  TF-ported FID weights read from ``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``. Inputs
  are images in [0, 1] (checked: a [-1, 1] batch raises instead of being silently rescaled); grayscale is
  repeated to 3 channels; pytorch-fid resizes bilinearly to 299×299 and maps to [-1, 1] itself. Nothing is
  downloaded: a missing file raises one :class:`FileNotFoundError` that says where to put it.
* ``"fid_domain"``: the output of any given ``nn.Module`` (e.g. an anti-causal predictor's penultimate layer),
  flattened to [B, D]. Values are not comparable with Inception FIDs and must be reported under their own name.

Every extractor runs in eval mode under ``no_grad``; the train/eval flag of every submodule is restored
afterwards, so weights and BatchNorm running statistics are unchanged and dropout is off.

**FID** (Heusel et al. 2017) between Gaussians fitted to real (r) and fake (f) features::

    FID = ||μ_r − μ_f||² + Tr(Σ_r) + Tr(Σ_f) − 2 Tr((Σ_r Σ_f)^{1/2})

:class:`FID` keeps float64 running sums (Σx, Σxxᵀ, n) per set, reduced with ``sum`` across processes, so its
memory does not grow with the number of images and the value is the same on one process or many (up to the
summation order of float64 sums). Σ uses the unbiased 1/(n−1) normalisation, as numpy.cov in pytorch-fid.
The trace of the matrix square root is computed from eigenvalues of the symmetric PSD matrix
Σ_r^{1/2} Σ_f Σ_r^{1/2}, which has the same non-zero eigenvalues as Σ_r Σ_f; this is real and well defined
even for singular covariances (fewer images than feature dimensions), so no imaginary part has to be dropped.

**KID** (Bińkowski et al. 2018) is the unbiased MMD² with the cubic polynomial kernel
k(x, y) = (xᵀy / d + 1)³, averaged over random subsets. For subsets X (size m) and Y (size m)::

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (m(m−1)) − 2 Σ_{i,j} k(x_i, y_j) / m²

:class:`KID` keeps the features themselves (``cat`` states). Subsets are drawn with a seeded generator after
putting the features in a canonical order, so the value does not depend on batch or process order.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_modules.networks.frozen import evaluating

__all__ = [
    "FID",
    "FID_WEIGHTS_FILE",
    "KID",
    "DomainFeatures",
    "InceptionFeatures",
    "build_feature_extractor",
    "fid_from_moments",
    "fid_weights_path",
    "frechet_distance",
    "frozen_forward",
    "kid_subsets",
    "mean_and_covariance",
    "mmd2_unbiased",
    "polynomial_kernel",
]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
Extractor = Literal["fid_inception", "fid_domain"]
EXTRACTORS = ("fid_inception", "fid_domain")


# -- functional cores -------------------------------------------------------------------------------------
def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor, eps: float = 1e-6) -> Tensor:
    """``||μ1 − μ2||² + Tr(Σ1) + Tr(Σ2) − 2 Tr((Σ1 Σ2)^{1/2})`` in float64.

    ``Tr((Σ1Σ2)^{1/2})`` is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``Σ1^{1/2} Σ2 Σ1^{1/2}`` (same non-zero spectrum as ``Σ1Σ2``); eigenvalues that rounding makes slightly
    negative are clamped to 0. If an eigendecomposition does not converge, ``eps·I`` is added to both
    covariances and it is retried, as pytorch-fid does when ``scipy.linalg.sqrtm`` fails.
    """
    mu1, mu2 = torch.atleast_1d(mu1).to(torch.float64), torch.atleast_1d(mu2).to(torch.float64)
    sigma1, sigma2 = torch.atleast_2d(sigma1).to(torch.float64), torch.atleast_2d(sigma2).to(torch.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"inconsistent shapes: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
            f"sigma {tuple(sigma1.shape)}, {tuple(sigma2.shape)}"
        )
    for t in (mu1, mu2, sigma1, sigma2):
        if not torch.isfinite(t).all():
            raise ValueError("frechet_distance got non-finite means or covariances")
    diff = mu1 - mu2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except torch.linalg.LinAlgError:
        offset = eps * torch.eye(sigma1.shape[0], dtype=torch.float64, device=sigma1.device)
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    # the distance is >= 0; rounding of identical sets can leave -1e-12, which would print as "-0.0000"
    return (diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * tr_covmean).clamp_min(0.0)


def _trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """``Tr((Σ1 Σ2)^{1/2})`` for symmetric PSD Σ1, Σ2."""
    sigma1 = (sigma1 + sigma1.T) / 2
    evals, evecs = torch.linalg.eigh(sigma1)
    sqrt1 = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    inner = sqrt1 @ sigma2 @ sqrt1
    return torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()


def mean_and_covariance(feature_sum: Tensor, outer_sum: Tensor, n: Tensor | int) -> tuple[Tensor, Tensor]:
    """μ = Σx / n and the unbiased Σ = (Σxxᵀ − n μμᵀ) / (n − 1) from running sums (n ≥ 2)."""
    n = float(n)
    mu = feature_sum.to(torch.float64) / n
    sigma = (outer_sum.to(torch.float64) - n * torch.outer(mu, mu)) / (n - 1)
    return mu, sigma


def fid_from_moments(
    real_sum: Tensor,
    real_outer: Tensor,
    n_real: Tensor | int,
    fake_sum: Tensor,
    fake_outer: Tensor,
    n_fake: Tensor | int,
) -> Tensor:
    """FID from the running sums of two feature sets; NaN when either set has fewer than 2 samples."""
    if int(n_real) < 2 or int(n_fake) < 2:
        return torch.tensor(float("nan"), dtype=torch.float64, device=real_sum.device)
    mu_r, sigma_r = mean_and_covariance(real_sum, real_outer, n_real)
    mu_f, sigma_f = mean_and_covariance(fake_sum, fake_outer, n_fake)
    return frechet_distance(mu_r, sigma_r, mu_f, sigma_f)


def polynomial_kernel(
    x: Tensor, y: Tensor, degree: int = 3, gamma: float | None = None, coef: float = 1.0
) -> Tensor:
    """``(γ xᵀy + c)^degree`` for all pairs of rows, γ = 1/d by default (KID's kernel)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * x @ y.T + coef) ** degree


def mmd2_unbiased(real: Tensor, fake: Tensor, **kernel: Any) -> Tensor:
    """Unbiased MMD² between two feature sets (rows), diagonal terms of the within-set kernels excluded."""
    real, fake = real.to(torch.float64), fake.to(torch.float64)
    m, n = real.shape[0], fake.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    k_rr, k_ff, k_rf = (
        polynomial_kernel(real, real, **kernel),
        polynomial_kernel(fake, fake, **kernel),
        polynomial_kernel(real, fake, **kernel),
    )
    within_r = (k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1))
    within_f = (k_ff.sum() - k_ff.diagonal().sum()) / (n * (n - 1))
    return within_r + within_f - 2 * k_rf.mean()


def _canonical_order(features: Tensor, seed: int) -> Tensor:
    """Rows sorted by their projection on a fixed random direction: independent of arrival order."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(features.shape[1], generator=gen, dtype=torch.float64).to(features.device)
    return features[torch.argsort((features.to(torch.float64) * direction).sum(1), stable=True)]


def kid_subsets(
    real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0, **kernel: Any
) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (unbiased, 0 for one subset) of MMD²_u over random subsets.

    Each subset draws ``subset_size`` real and ``subset_size`` fake rows without replacement, from a CPU
    generator seeded with ``seed``, after putting both sets in a canonical order.
    """
    if subset_size > real.shape[0] or subset_size > fake.shape[0]:
        raise ValueError(
            f"subset_size={subset_size} is larger than the number of real ({real.shape[0]}) or "
            f"fake ({fake.shape[0]}) samples"
        )
    real, fake = _canonical_order(real, seed), _canonical_order(fake, seed)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        idx_r = torch.randperm(real.shape[0], generator=gen)[:subset_size].to(real.device)
        idx_f = torch.randperm(fake.shape[0], generator=gen)[:subset_size].to(fake.device)
        values.append(mmd2_unbiased(real[idx_r], fake[idx_f], **kernel))
    values = torch.stack(values)
    std = values.std() if subsets > 1 else torch.zeros((), dtype=values.dtype, device=values.device)
    return values.mean(), std


# -- feature extractors -----------------------------------------------------------------------------------
def frozen_forward(module: nn.Module, inputs: Tensor) -> Tensor:
    """``module(inputs)`` in eval mode under ``no_grad``, restoring every submodule's train/eval flag."""
    with evaluating(module):
        return module(inputs)


def fid_weights_path() -> str:
    """Where torch.hub looks for the FID Inception weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILE)


class InceptionFeatures(nn.Module):
    """pytorch-fid's ``InceptionV3([3])``: [B, 1 or 3, H, W] images in [0, 1] → [B, 2048] pool features."""

    def __init__(self) -> None:
        super().__init__()
        path = fid_weights_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"FID Inception weights not found: expected {FID_WEIGHTS_FILE} in {os.path.dirname(path)} "
                f"($TORCH_HOME/hub/checkpoints/; set TORCH_HOME to choose the folder). Nothing is downloaded "
                f"automatically: fetch it once from {_FID_WEIGHTS_URL} (pytorch-fid's release) and copy it there. "
                f"To compare with a domain network instead, use extractor='fid_domain' and report it as such."
            )
        from pytorch_fid.inception import InceptionV3

        self.net = InceptionV3(
            [InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True
        )
        self.net.eval()

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W], got {tuple(images.shape)}")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"fid_inception expects images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                f"map [-1, 1] data with (x + 1) / 2 first"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images.float())[0].flatten(1)


class DomainFeatures(nn.Module):
    """Any feature network's output, flattened to [B, D]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model(inputs).flatten(1)


def build_feature_extractor(extractor: Extractor, model: nn.Module | None = None) -> nn.Module:
    """``"fid_inception"`` (``model`` None, or an :class:`InceptionFeatures` to share) or ``"fid_domain"``."""
    if extractor == "fid_inception":
        if model is None:
            return InceptionFeatures()
        if not isinstance(model, InceptionFeatures):
            raise TypeError(
                "extractor='fid_inception' only accepts an InceptionFeatures instance as model; "
                "use extractor='fid_domain' for another network"
            )
        return model
    if extractor == "fid_domain":
        if model is None:
            raise ValueError("extractor='fid_domain' needs a feature network: model=<nn.Module>")
        return model if isinstance(model, DomainFeatures) else DomainFeatures(model)
    raise ValueError(f"unknown extractor {extractor!r}; choose one of {EXTRACTORS}")


class _FeatureMetric(Metric):
    """Shared plumbing: a frozen feature extractor and ``update(images, real)``."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, extractor: Extractor = "fid_inception", model: nn.Module | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.extractor = extractor
        self.feature_net = build_feature_extractor(extractor, model)

    def features(self, images: Tensor) -> Tensor:
        return frozen_forward(self.feature_net, images).to(torch.float64)

    def update(self, images: Tensor | None, real: bool, features: Tensor | None = None) -> None:
        """Add ``images`` (or their already extracted ``features``, e.g. shared by FID and KID) to one set."""
        self.update_features(self.features(images) if features is None else features, real)

    def update_features(self, features: Tensor, real: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# -- torchmetrics wrappers --------------------------------------------------------------------------------
class FID(_FeatureMetric):
    """FID between all real and all fake images seen since the last reset, from float64 running sums.

    ``update(images, real=True|False)`` extracts features; ``update_features(features, real)`` takes
    precomputed [B, D] features. ``compute()`` is NaN while either set has fewer than 2 samples.
    ``reset_real=False`` keeps the real set's moments across ``reset()`` (as torchmetrics'
    ``reset_real_features``): for a fixed real set and a frozen extractor they never change.
    ``name`` is the extractor's name (``"fid_inception"`` / ``"fid_domain"``), to be used as the logged key.
    """

    def __init__(
        self,
        extractor: Extractor = "fid_inception",
        model: nn.Module | None = None,
        num_features: int | None = None,
        reset_real: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(extractor, model, **kwargs)
        if num_features is None:
            if extractor != "fid_inception":
                raise ValueError("fid_domain needs num_features (the feature network's output size)")
            num_features = 2048
        self.reset_real = reset_real
        self.num_features = num_features
        self.name = extractor
        for prefix in ("real", "fake"):
            self.add_state(
                f"{prefix}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(
                f"{prefix}_outer",
                torch.zeros(num_features, num_features, dtype=torch.float64),
                dist_reduce_fx="sum",
            )
            self.add_state(f"{prefix}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update_features(self, features: Tensor, real: bool) -> None:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features [B, {self.num_features}], got {tuple(features.shape)}")
        features = features.to(torch.float64)
        prefix = "real" if real else "fake"
        setattr(self, f"{prefix}_sum", getattr(self, f"{prefix}_sum") + features.sum(0))
        setattr(self, f"{prefix}_outer", getattr(self, f"{prefix}_outer") + features.T @ features)
        setattr(self, f"{prefix}_n", getattr(self, f"{prefix}_n") + features.shape[0])

    @property
    def has_real(self) -> bool:
        """Whether real images have been seen since the last reset that cleared them."""
        return bool(self.real_n > 0)

    def copy_real(self, other: FID) -> None:
        """Take ``other``'s real moments (this process's share, as ``other`` holds them between computes): the
        same real set for another fake set, e.g. a reference counterfactual evaluated beside a model."""
        if other.num_features != self.num_features:
            raise ValueError(f"cannot copy real moments of {other.num_features} features into {self.num_features}")
        for k in ("sum", "outer", "n"):
            setattr(self, f"real_{k}", getattr(other, f"real_{k}").clone())

    def reset(self) -> None:
        kept = None if self.reset_real else {k: getattr(self, f"real_{k}").clone() for k in ("sum", "outer", "n")}
        super().reset()
        if kept is not None:
            for k, v in kept.items():
                setattr(self, f"real_{k}", v)

    def compute(self) -> Tensor:
        return fid_from_moments(
            self.real_sum, self.real_outer, self.real_n, self.fake_sum, self.fake_outer, self.fake_n
        )


class KID(_FeatureMetric):
    """KID over all features seen since the last reset: ``compute()`` returns ``(mean, std)`` over subsets.

    Memory grows with the number of images (features are kept; ``cat`` states). ``subset_size`` must not
    exceed either set's size (torch-fidelity's default is 1000 with 100 subsets), unless ``clip_subset_size``:
    then each compute uses min(subset_size, n_real, n_fake) and records it in ``last_subset_size`` (a small
    validation subset still gets a value; compare KIDs of one subset size only). ``reset_real=False`` keeps the
    real features across ``reset()``, as :class:`FID` keeps its real moments.
    """

    def __init__(
        self,
        extractor: Extractor = "fid_inception",
        model: nn.Module | None = None,
        subsets: int = 100,
        subset_size: int = 1000,
        degree: int = 3,
        gamma: float | None = None,
        coef: float = 1.0,
        seed: int = 0,
        reset_real: bool = True,
        clip_subset_size: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(extractor, model, **kwargs)
        if subsets < 1 or subset_size < 2:
            raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
        self.name = extractor.replace("fid_", "kid_")
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self.reset_real, self.clip_subset_size = reset_real, clip_subset_size
        self.last_subset_size: int | None = None
        self.kernel = {"degree": degree, "gamma": gamma, "coef": coef}
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update_features(self, features: Tensor, real: bool) -> None:
        if features.ndim != 2:
            raise ValueError(f"expected features [B, D], got {tuple(features.shape)}")
        (self.real_features if real else self.fake_features).append(features.to(torch.float64))

    @property
    def has_real(self) -> bool:
        """Whether real images have been seen since the last reset that cleared them."""
        return len(self.real_features) > 0

    def copy_real(self, other: KID) -> None:
        """Take ``other``'s real features (this process's share): the same real set for another fake set."""
        self.real_features = [f.clone() for f in other.real_features]

    def reset(self) -> None:
        kept = None if self.reset_real else list(self.real_features)
        super().reset()
        if kept is not None:
            self.real_features = kept

    def compute(self) -> tuple[Tensor, Tensor]:
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        size = min(self.subset_size, real.shape[0], fake.shape[0]) if self.clip_subset_size else self.subset_size
        self.last_subset_size = size
        return kid_subsets(real, fake, self.subsets, size, self.seed, **self.kernel)
