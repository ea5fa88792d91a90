"""Interventions for the counterfactual metrics: new values differ as the protocol says, and are seeded."""

from __future__ import annotations

import pytest
import torch

from datamodules.base import Attribute, equal_width_bins
from datamodules.interventions import (
    draw_new_values,
    multi_parent,
    per_sample_uniforms,
    random_parents,
    single_parent,
)

THICK = Attribute("thickness", "continuous", low=0.0, high=4.0, bins=equal_width_bins(0.0, 4.0, 4))
DIGIT = Attribute("digit", "categorical", num_classes=10)
SMILE = Attribute("Smiling")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_binary_flips_and_categorical_changes_class():
    assert draw_new_values(SMILE, torch.tensor([0.0, 1.0, 1.0]), _gen()).tolist() == [1.0, 0.0, 0.0]
    digits = torch.arange(10.0).repeat(300)
    new = draw_new_values(DIGIT, digits, _gen())
    assert (new != digits).all() and set(new.long().tolist()) <= set(range(10))
    # every other class is reachable from a given class
    assert set(new[digits == 3].long().tolist()) == set(range(10)) - {3}


def test_continuous_values_come_from_the_pool_in_another_bin():
    # raw pool 0.5, 1.5, 2.5, 3.5: one value per bin of width 1
    pool = THICK.normalise(torch.tensor([0.5, 1.5, 2.5, 3.5]))
    values = THICK.normalise(torch.tensor([0.2, 1.1, 3.9] * 30))
    new = draw_new_values(THICK, values, _gen(), pool)
    raw_new, raw_old = THICK.denormalise(new), THICK.denormalise(values)
    assert set(torch.round(raw_new, decimals=3).tolist()) <= {0.5, 1.5, 2.5, 3.5}
    assert (THICK.bin_index(raw_new) != THICK.bin_index(raw_old)).all()
    with pytest.raises(ValueError, match="no value from another bin"):
        draw_new_values(THICK, values, _gen(), THICK.normalise(torch.tensor([0.2, 0.3])))
    with pytest.raises(ValueError, match="needs a pool"):
        draw_new_values(THICK, values, _gen())


def test_seeded_and_independent_of_the_global_rng():
    pa = {"digit": torch.arange(10.0).repeat(3)}
    torch.manual_seed(1)
    a = single_parent([DIGIT], pa, "digit", _gen(5))
    state = torch.get_rng_state()
    b = single_parent([DIGIT], pa, "digit", _gen(5))
    assert torch.equal(a.values["digit"], b.values["digit"])
    assert torch.equal(state, torch.get_rng_state())


def test_multi_parent_changes_every_target_and_apply_keeps_the_rest():
    pa = {"digit": torch.tensor([1.0, 2.0]), "Smiling": torch.tensor([0.0, 1.0]),
          "thickness": THICK.normalise(torch.tensor([0.5, 3.5]))}
    pools = {"thickness": pa["thickness"]}
    do = multi_parent([DIGIT, SMILE, THICK], pa, ["digit", "Smiling"], _gen(), pools)
    after = do.apply(pa)
    assert (after["digit"] != pa["digit"]).all() and torch.equal(after["Smiling"], 1 - pa["Smiling"])
    assert torch.equal(after["thickness"], pa["thickness"]) and do.names == ["digit", "Smiling"]
    with pytest.raises(ValueError, match="targets must be parents"):
        multi_parent([DIGIT], pa, ["slant"], _gen())


def test_random_parents_picks_each_with_probability_p_and_at_least_one():
    n = 4000
    pa = {"digit": torch.zeros(n), "Smiling": torch.zeros(n)}
    do = random_parents([DIGIT, SMILE], pa, _gen(3))
    mask = torch.stack([do.mask["digit"], do.mask["Smiling"]], 1)
    assert mask.any(1).all()
    # P(chosen) = p + (1 - p)^2 / 2 = 0.625 per parent once empty rows get one parent
    assert mask.float().mean(0).sub(0.625).abs().max() < 0.03
    after = do.apply(pa)
    assert torch.equal(after["Smiling"] == 1, do.mask["Smiling"])


def test_per_sample_draws_do_not_depend_on_the_batching():
    """An image's intervention is a function of (seed, parent position, row): splitting the rows into other
    batches (or processes) draws exactly the same values."""
    g = torch.Generator().manual_seed(3)
    rows = torch.arange(100, 140)
    pool = THICK.normalise(torch.rand(200, generator=g) * 4.0)
    pa = {"thickness": pool[:40], "digit": torch.randint(0, 10, (40,), generator=g).float()}
    whole = {t: single_parent([THICK, DIGIT], pa, t, None, {"thickness": pool},
                              per_sample_uniforms(rows, seed=7, stream=i)).values[t]
             for i, t in enumerate(("thickness", "digit"))}
    for part in (slice(0, 13), slice(13, 40)):
        sub = {k: v[part] for k, v in pa.items()}
        for i, t in enumerate(("thickness", "digit")):
            got = single_parent([THICK, DIGIT], sub, t, None, {"thickness": pool},
                                per_sample_uniforms(rows[part], seed=7, stream=i)).values[t]
            assert torch.equal(got, whole[t][part])
    # still a valid intervention: another class, another bin
    assert (whole["digit"] != pa["digit"]).all()
    old_bins = THICK.bin_index(THICK.denormalise(pa["thickness"]))
    assert (THICK.bin_index(THICK.denormalise(whole["thickness"])) != old_bins).all()
    # and the streams differ between seeds
    assert not torch.equal(per_sample_uniforms(rows, 7), per_sample_uniforms(rows, 8))
