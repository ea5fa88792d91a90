"""Pixel likelihoods of the Deep-SCM image mechanisms (counterfactual_benchmark App. A.2-A.3).

The conditional VAE and HVAE model 8-bit images with a **discretized Gaussian** (VDVAE; Child, 2021): pixels
are mapped from [0, 1] to [-1, 1], where the 256 grey levels are bins of width 2/255, and

    p(x | μ, σ) = Φ((x + 1/255 − μ)/σ) − Φ((x − 1/255 − μ)/σ)        for interior bins,
    p(x | μ, σ) = Φ((x + 1/255 − μ)/σ)                                for the lowest bin (x = −1),
    p(x | μ, σ) = 1 − Φ((x − 1/255 − μ)/σ)                            for the highest bin (x = +1),

so the 256 probabilities of a pixel sum to one and the negative log-likelihood is a proper code length.
Written with log-CDFs (``torch.special.log_ndtr``) so that the tails do not underflow: the reference's
``log(max(cdf_delta, 1e-12))`` floor caps the penalty of a confidently wrong pixel at 27.6 nats.

The mean μ and log-scale log σ are per pixel in [-1, 1] units; the fixed-σ variant of the benchmark passes
log σ = −2.5 (σ² = e⁻⁵) everywhere.
"""

from __future__ import annotations

import torch

HALF_BIN = 1.0 / 255.0  # half the width of one of the 256 grey-level bins on [-1, 1]


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (the data contract) -> [-1, 1], the likelihood's space."""
    return 2.0 * x - 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def _log_diff_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) − exp(b)) for a > b, stable.

    ``-expm1`` rather than ``1 − exp``: when b − a is a few 1e-8 (both log-CDFs near 0, the branch that
    ``torch.where`` discards for a pixel far from the mean), exp rounds to 1 in float32, the log is −inf and
    its gradient, multiplied by the discarded branch's zero, turns every gradient into NaN."""
    return a + torch.log(-torch.expm1((b - a).clamp(max=-1e-12)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, edge: float = 0.999
) -> torch.Tensor:
    """Per-element log p(x | μ, σ) of the discretized Gaussian above (same shape as ``x``).

    :param x: pixels in [-1, 1] on the 8-bit grid (``to_signed`` of a [0, 1] image).
    :param mean, log_scale: μ and log σ, broadcastable to ``x``.
    :param edge: pixels below ``-edge`` / above ``edge`` belong to the lowest / highest bin.
    """
    inv_sigma = torch.exp(-log_scale)
    upper = (x - mean + HALF_BIN) * inv_sigma
    lower = (x - mean - HALF_BIN) * inv_sigma
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log(1 − Φ(lower))
    # log(Φ(upper) − Φ(lower)) computed on the side of the mean where it does not cancel: in the upper
    # tail the difference of survival functions is the stable form.
    centre_left = _log_diff_exp(log_cdf_upper, torch.special.log_ndtr(lower))
    centre_right = _log_diff_exp(log_sf_lower, torch.special.log_ndtr(-upper))
    centre = torch.where(lower > 0, centre_right, centre_left)
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, centre))


def discretized_gaussian_nll(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """−log p(x | μ, σ) per image [B], summed over channels and pixels (nats)."""
    return -discretized_gaussian_log_likelihood(x, mean, log_scale).flatten(1).sum(dim=1)


def sample_discretized_gaussian(mean: torch.Tensor, log_scale: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """μ + t·σ·ε with ε ~ N(0, I), clamped to [-1, 1] (``temperature`` 0 gives the mean)."""
    return (mean + temperature * torch.exp(log_scale) * torch.randn_like(mean)).clamp(-1.0, 1.0)
