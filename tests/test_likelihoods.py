"""The discretized Gaussian pixel likelihood: a proper distribution over the 256 grey levels, equal to the
direct CDF differences where those are accurate, and finite far in the tails."""

from __future__ import annotations

import math

import torch

from lightning_modules.likelihoods import (
    HALF_BIN,
    discretized_gaussian_log_likelihood,
    discretized_gaussian_nll,
    to_signed,
)

GRID = to_signed(torch.arange(256, dtype=torch.float64) / 255.0)


def test_the_256_bins_sum_to_one():
    for mean, log_scale in [(0.0, -2.5), (0.93, -4.0), (-1.2, 0.3), (0.5, -6.0)]:
        lp = discretized_gaussian_log_likelihood(GRID, torch.tensor(mean, dtype=torch.float64),
                                                 torch.tensor(log_scale, dtype=torch.float64))
        assert abs(lp.exp().sum().item() - 1.0) < 1e-9


def test_interior_bins_equal_the_cdf_difference():
    mean, sigma = 0.1, math.exp(-1.0)
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), sigma)
    x = GRID[1:-1]
    expected = (normal.cdf(x + HALF_BIN) - normal.cdf(x - HALF_BIN)).log()
    got = discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=torch.float64),
                                              torch.tensor(-1.0, dtype=torch.float64))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_far_tails_stay_finite_and_grow_quadratically():
    x = torch.tensor([0.0], dtype=torch.float64)
    nll = [-discretized_gaussian_log_likelihood(x, torch.tensor(m, dtype=torch.float64),
                                                torch.tensor(-5.0, dtype=torch.float64)).item() for m in (0.5, 1.0)]
    assert all(math.isfinite(v) for v in nll)
    # ~ z²/2 with z = m·e⁵: doubling the distance quadruples the code length (a floor would make them equal)
    assert 3.9 < nll[1] / nll[0] < 4.1 and nll[0] > 27.6


def test_nll_sums_over_pixels():
    x = to_signed(torch.randint(0, 256, (2, 1, 4, 4)).double() / 255.0)
    mean, log_scale = torch.zeros_like(x), torch.full_like(x, -1.0)
    per_pixel = -discretized_gaussian_log_likelihood(x, mean, log_scale)
    torch.testing.assert_close(discretized_gaussian_nll(x, mean, log_scale), per_pixel.flatten(1).sum(1))
