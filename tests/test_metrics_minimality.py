"""Minimality (eq. 9, Table 5): Gaussian KL, CLD by hand, invariance to batch order and chunking, and the one
1-vs-2-process test of the effectiveness and minimality metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from callbacks.metrics.effectiveness import Effectiveness
from callbacks.metrics.minimality import (
    CounterfactualLatentDivergence,
    cld_from_probabilities,
    gaussian_kl,
    pairwise_gaussian_kl,
)
from datamodules.base import Attribute, equal_width_bins
from tests.helpers.ddp import run_distributed, shard

SMILE = Attribute("Smiling", "binary")
THICK = Attribute("thickness", "continuous", low=0.0, high=8.0, bins=equal_width_bins(0.0, 8.0, 4))
DIGIT = Attribute("digit", "categorical", num_classes=10)


def _normal(mu: torch.Tensor, logvar: torch.Tensor) -> Independent:
    return Independent(Normal(mu.double(), (0.5 * logvar.double()).exp()), 1)


def test_gaussian_kl_matches_the_closed_form_and_torch_distributions() -> None:
    # By hand, 1-D: KL(N(1, 4) ‖ N(0, 1)) = ½(log 1 − log 4 + (4 + 1)/1 − 1) = ½(4 − log 4).
    one, log4, zero = (torch.tensor([v], dtype=torch.float64) for v in (1.0, math.log(4.0), 0.0))
    value = gaussian_kl(one, log4, zero, zero)
    assert value.item() == pytest.approx(0.5 * (4.0 - math.log(4.0)), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    mu_p, lv_p, mu_q, lv_q = (torch.randn(5, 7, generator=g) for _ in range(4))
    expected = kl_divergence(_normal(mu_p, lv_p), _normal(mu_q, lv_q))
    assert torch.allclose(gaussian_kl(mu_p, lv_p, mu_q, lv_q), expected, rtol=1e-10)
    # Variance matters (the reference's mean-as-log-scale bug would not see this change).
    assert gaussian_kl(mu_p, lv_p + 1, mu_q, lv_q).ne(gaussian_kl(mu_p, lv_p, mu_q, lv_q)).all()
    pair = pairwise_gaussian_kl(mu_p, lv_p, mu_q[:3], lv_q[:3])
    by_element = gaussian_kl(mu_p[:, None], lv_p[:, None], mu_q[None, :3], lv_q[None, :3])
    assert pair.shape == (5, 3) and torch.allclose(pair, by_element, rtol=1e-10, atol=1e-12)


def test_parent_codes_use_the_attribute_bins_of_raw_values() -> None:
    # Raw edges 0, 2, 4, 6, 8; normalised -1 -> 0 raw, -0.4 -> 2.4 raw, 0.6 -> 6.4 raw.
    assert THICK.codes(torch.tensor([-1.0, -0.4, 0.6, 1.0])).tolist() == [0, 1, 3, 3]
    assert DIGIT.codes(torch.tensor([3.0, 7.0])).tolist() == [3, 7]
    no_bins = Attribute("t", "continuous", low=0.0, high=10.0)  # default: 10 equal-width bins
    assert no_bins.codes(torch.tensor([-0.95, 0.05, 0.95])).tolist() == [0, 5, 9]


def _hand_case() -> tuple[CounterfactualLatentDivergence, dict[str, float]]:
    """Four 1-D factuals with unit variance (KL between N(a,1), N(b,1) is (a−b)²/2) and one binary parent.

    x0 μ=0 s=0 -> x* μ=3 s*=1: div 4.5; S_x = {x1: 0.5}; S_x* = {x2: 2, x3: 8}  -> p1 = 1/2, p2 = 0
    x1 μ=1 s=0 -> x* μ=1 s*=1: div 0;   S_x = {x0: 0.5}; S_x* = {x2: 0.5, x3: 4.5} -> p1 = 0, p2 = 1
    x2 μ=2 s=1 -> x* μ=0 s*=0: div 2;   S_x = {x3: 2};  S_x* = {x0: 2, x1: 0.5}   -> p1 = 1, p2 = 1 (ties count)
    x3 μ=4 s=1 -> x* μ=4, σ²=4, s*=0: div ½(3 − log 4); S_x = {x2: 2}; S_x* = {x0: 8, x1: 4.5} -> p1 = 0, p2 = 1
    """
    metric = CounterfactualLatentDivergence([SMILE])
    mu, cf_mu = torch.tensor([[0.0], [1.0], [2.0], [4.0]]), torch.tensor([[3.0], [1.0], [0.0], [4.0]])
    cf_lv = torch.tensor([[0.0], [0.0], [0.0], [math.log(4.0)]])
    s = torch.tensor([0.0, 0.0, 1.0, 1.0])
    metric.update(mu, torch.zeros(4, 1), cf_mu, cf_lv, {"Smiling": s}, {"Smiling": 1 - s}, "Smiling")
    e = math.e
    cld = [math.log(0.8 * e**0.5 + 0.2), math.log(0.8 + 0.2 * e), 1.0, math.log(0.8 + 0.2 * e)]
    return metric, {"cld": sum(cld) / 4, "p_sx_star_le_div": 0.375, "p_sx_ge_div": 0.75, "n": 4}


def test_cld_tiny_case_by_hand() -> None:
    metric, expected = _hand_case()
    out = metric.compute()
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-12)
        assert out[f"{key}/Smiling"].item() == pytest.approx(value, rel=1e-12)
    assert cld_from_probabilities(torch.tensor(0.0), torch.tensor(0.0)).item() == 0.0
    assert cld_from_probabilities(torch.tensor(1.0), torch.tensor(1.0)).item() == pytest.approx(1.0)


def test_samples_with_an_empty_set_are_not_scored() -> None:
    metric = CounterfactualLatentDivergence([SMILE], w1=0.5, w2=0.5)
    s = torch.zeros(3)  # nobody has s = 1, so every S_x* is empty
    metric.update(torch.randn(3, 2), torch.zeros(3, 2), torch.randn(3, 2), torch.zeros(3, 2),
                  {"Smiling": s}, {"Smiling": 1 - s}, "Smiling")
    out = metric.compute()
    assert out["n"].item() == 0 and math.isnan(out["cld"].item())
    with pytest.raises(ValueError, match="sum to 1"):
        CounterfactualLatentDivergence([SMILE], w1=0.8, w2=0.8)


def _random_set(n: int, seed: int = 0) -> list[dict]:
    """Batches of an evaluation set with three parents and a per-sample intervened parent."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, n, 7):
        b = min(7, n - start)
        mu, lv = torch.randn(b, 3, generator=g), 0.3 * torch.randn(b, 3, generator=g)
        pa = {"Smiling": torch.randint(0, 2, (b,), generator=g).float(),
              "thickness": torch.rand(b, generator=g) * 2 - 1,
              "digit": torch.randint(0, 3, (b,), generator=g).float()}
        cf = {"Smiling": 1 - pa["Smiling"], "thickness": torch.rand(b, generator=g) * 2 - 1,
              "digit": (pa["digit"] + 1) % 3}
        batches.append({"fact_mu": mu, "fact_logvar": lv, "cf_mu": mu + 0.5 * torch.randn(b, 3, generator=g),
                        "cf_logvar": lv + 0.1 * torch.randn(b, 3, generator=g), "pa": pa, "cf_pa": cf,
                        "intervened": torch.randint(0, 3, (b,), generator=g)})
    return batches


def _cld(batches: list[dict], chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    metric = CounterfactualLatentDivergence([SMILE, THICK, DIGIT], chunk_size=chunk_size)
    for b in batches:
        metric.update(**b)
    return metric.compute()


def test_cld_is_invariant_to_batch_order_and_chunk_size() -> None:
    batches = _random_set(50)
    reference = _cld(batches)
    assert reference["n"].item() > 40
    assert 0.0 < reference["cld"].item() < 1.0
    reordered = _cld(batches[::-1], chunk_size=3)
    # Split differently: one sample per batch, shuffled.
    singles = [{k: ({n: t[i:i + 1] for n, t in v.items()} if isinstance(v, dict) else v[i:i + 1])
                for k, v in b.items()} for b in batches for i in range(len(b["intervened"]))]
    perm = torch.randperm(len(singles), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = _cld([singles[i] for i in perm], chunk_size=7)
    for other in (reordered, shuffled):
        assert other.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(other[key], value), key


def _effectiveness_batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    out = []
    for start in range(0, n, 5):
        b = min(5, n - start)
        # Normalised values on a 1/4 grid: raw errors (range 8) are exact in float64 whatever the order.
        target = {"Smiling": torch.randint(0, 2, (b,), generator=g).float(),
                  "thickness": torch.randint(-4, 5, (b,), generator=g) / 4.0,
                  "digit": torch.randint(0, 10, (b,), generator=g).float()}
        preds = {"Smiling": torch.randint(0, 2, (b,), generator=g).float(),
                 "thickness": torch.randint(-4, 5, (b,), generator=g) / 4.0,
                 "digit": torch.randint(0, 10, (b,), generator=g).float()}
        out.append({"preds": preds, "target": target, "intervened": torch.randint(0, 3, (b,), generator=g)})
    return out


def _both_metrics(rank: int, world_size: int, cld_batches: list[dict], eff_batches: list[dict]) -> dict:
    cld = CounterfactualLatentDivergence([SMILE, THICK, DIGIT], chunk_size=16)
    eff = Effectiveness([SMILE, THICK, DIGIT])
    for b in shard_list(cld_batches, rank, world_size):
        cld.update(**b)
    for b in shard_list(eff_batches, rank, world_size):
        eff.update(**b)
    return {"cld": cld.compute(), "eff": eff.compute()}


def shard_list(batches: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s batches (strided; uneven counts and sizes allowed)."""
    return [batches[i] for i in shard(torch.arange(len(batches)), rank, world_size).tolist()]


# In the default suite (about 20 s): CI must keep checking that every metric is the same on 1 and 2 processes.
def test_effectiveness_and_cld_are_the_same_on_two_processes() -> None:
    cld_batches, eff_batches = _random_set(45, seed=3), _effectiveness_batches(23)  # 7 and 5 batches: uneven
    single = _both_metrics(0, 1, cld_batches, eff_batches)
    results = run_distributed(_both_metrics, 2, cld_batches, eff_batches)
    assert single["cld"]["n"].item() > 30
    for result in results:
        assert result["cld"].keys() == single["cld"].keys() and result["eff"].keys() == single["eff"].keys()
        for key, value in single["cld"].items():
            assert torch.equal(result["cld"][key], value), key
        for key, value in single["eff"].items():
            assert torch.equal(result["eff"][key], value), key
