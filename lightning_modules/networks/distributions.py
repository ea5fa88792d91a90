"""The one Gaussian KL divergence of the project, for the losses of every method and for the metrics.

``gaussian_kl(mu_a, logvar_a, mu_b, logvar_b)`` is KL[N(μ_a, σ_a²) ‖ N(μ_b, σ_b²)] per element (σ² = exp(logvar)),

    ½ [log σ_b² − log σ_a² + (σ_a² + (μ_a − μ_b)²) / σ_b² − 1],

and with ``mu_b = logvar_b = None`` the divergence from the standard normal prior, ½ (μ² + σ² − 1 − log σ²).
Callers reduce it as their paper does (summed over the latent dimensions for an ELBO, averaged for IFcVAE-GAN's
per-dimension convention); the CLD metric evaluates it in float64.
"""

from __future__ import annotations

import torch

__all__ = ["gaussian_kl"]


def gaussian_kl(mu_a: torch.Tensor, logvar_a: torch.Tensor, mu_b: torch.Tensor | None = None,
                logvar_b: torch.Tensor | None = None) -> torch.Tensor:
    """KL[N(μ_a, diag σ_a²) ‖ N(μ_b, diag σ_b²)] per element, broadcast; N(0, I) when ``mu_b`` and ``logvar_b``
    are None (see the module docstring)."""
    if mu_b is None and logvar_b is None:
        return 0.5 * (mu_a.pow(2) + logvar_a.exp() - 1.0 - logvar_a)
    if mu_b is None or logvar_b is None:
        raise ValueError("give both mu_b and logvar_b, or neither (the standard normal)")
    return 0.5 * (logvar_b - logvar_a + (logvar_a.exp() + (mu_a - mu_b).square()) * torch.exp(-logvar_b) - 1.0)
