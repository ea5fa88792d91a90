"""Editing metrics against hand computations: functional cores, Metric wrappers, thresholds and masks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

import callbacks
from callbacks.metrics.editing import (
    EditSuccessRate,
    ReconstructionMSE,
    TrueCounterfactualError,
    edit_success_counts,
    edit_success_rate,
    error_sums,
    reconstruction_mse,
    true_counterfactual_error,
)


def _img(*values: float) -> torch.Tensor:
    """One-channel 1 x n images, one per row of values: shape [B, 1, 1, n]."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


# Three batches of different sizes with hand-computed squared errors.
# batch 1: errors (0.5, 0)        -> sum 0.25 over 2 elements (batch mean 0.125)
# batch 2: errors all 1           -> sum 4    over 4 elements (batch mean 1.0)
# batch 3: errors (-0.5, 0.5)     -> sum 0.5  over 2 elements (batch mean 0.25)
MSE_BATCHES = [
    (_img(0.5, 0.0), _img(0.0, 0.0)),
    (torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1, 2)),
    (_img(0.25, 0.75), _img(0.75, 0.25)),
]
MSE_SET = 4.75 / 8  # 0.59375, while the mean of the batch means is (0.125 + 1 + 0.25) / 3 = 0.458333...


def test_project_package_is_imported() -> None:
    # A PyPI package named `callbacks` could shadow ours; the editable install must win.
    assert Path(callbacks.__file__).resolve().parent == Path(__file__).resolve().parents[1] / "callbacks"


def test_error_sums_and_functional_mse() -> None:
    squared, absolute, count = error_sums(*MSE_BATCHES[0])
    assert (squared.item(), absolute.item(), count.item()) == (0.25, 0.5, 2)
    assert squared.dtype == torch.float64 and count.dtype == torch.long
    assert reconstruction_mse(*MSE_BATCHES[2]).item() == 0.25
    with pytest.raises(ValueError, match="same shape"):
        error_sums(torch.zeros(2, 3), torch.zeros(3, 2))


def test_reconstruction_mse_is_set_level_not_mean_of_batches() -> None:
    metric = ReconstructionMSE()
    for preds, target in MSE_BATCHES:
        metric.update(preds, target)
    assert metric.compute().item() == MSE_SET
    mean_of_batches = sum(reconstruction_mse(p, t).item() for p, t in MSE_BATCHES) / len(MSE_BATCHES)
    assert mean_of_batches == pytest.approx(0.4583333333333333)
    assert metric.compute().item() != pytest.approx(mean_of_batches)


def test_reconstruction_mse_equals_functional_on_concatenation() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.rand(b, 3, 4, 4, generator=generator), torch.rand(b, 3, 4, 4, generator=generator))
               for b in (3, 5, 1)]
    metric = ReconstructionMSE()
    for preds, target in batches:
        metric.update(preds, target)
    whole = reconstruction_mse(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    assert metric.compute().item() == pytest.approx(whole.item(), rel=1e-12)


def test_edit_success_threshold_is_strict() -> None:
    # p > 0.5 is positive; exactly 0.5 is negative (as torchmetrics' BinaryAccuracy).
    probs = torch.tensor([0.9, 0.5, 0.2, 0.51])
    assert [t.item() for t in edit_success_counts(probs, 1)] == [2, 4]  # 0.9 and 0.51
    assert [t.item() for t in edit_success_counts(probs, 0)] == [2, 4]  # 0.5 and 0.2
    assert edit_success_rate(probs, 1).item() == 0.5
    assert edit_success_rate(torch.tensor([0.5]), 0).item() == 1.0
    assert edit_success_rate(torch.tensor([0.5]), 1).item() == 0.0
    # Another threshold moves the boundary: 0.5 > 0.3 is positive.
    assert edit_success_rate(probs, 1, threshold=0.3).item() == 0.75
    assert edit_success_rate(torch.tensor([0.3]), 1, threshold=0.3).item() == 0.0


def test_edit_success_mask_and_per_sample_targets() -> None:
    probs = torch.tensor([0.9, 0.4, 0.2, 0.8])
    positive = torch.tensor([True, True, False, False])
    assert [t.item() for t in edit_success_counts(probs, 1, mask=positive)] == [1, 2]  # only 0.9 of (0.9, 0.4)
    assert edit_success_rate(probs, 0, mask=positive).item() == 0.5
    # Flip edits: targets differ per sample; 0.9 -> 1 ok, 0.4 -> 0 ok, 0.2 -> 1 wrong, 0.8 -> 0 wrong.
    assert edit_success_rate(probs, torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == 0.5
    assert math.isnan(edit_success_rate(probs, 1, mask=torch.zeros(4, dtype=torch.bool)).item())
    with pytest.raises(ValueError, match="mask"):
        edit_success_counts(probs, 1, mask=torch.ones(3, dtype=torch.bool))


def test_edit_success_metric_is_set_level() -> None:
    # Batch rates 1/1 and 1/3 average to 2/3; the set-level rate is 2/4.
    metric = EditSuccessRate(target=1)
    metric.update(torch.tensor([0.9]))
    metric.update(torch.tensor([0.1, 0.1, 0.9]))
    assert metric.compute().item() == 0.5
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())


def test_edit_success_metric_paper_protocol_mask() -> None:
    # Only inputs whose true label is positive count; a batch without any contributes nothing.
    c_neg = EditSuccessRate(target=0)
    c_neg.update(torch.tensor([0.1, 0.7, 0.3]), mask=torch.tensor([True, True, False]))
    c_neg.update(torch.tensor([0.9, 0.9]), mask=torch.tensor([False, False]))
    c_neg.update(torch.tensor([0.5]), mask=torch.tensor([True]))
    assert (c_neg.hits.item(), c_neg.total.item()) == (2, 3)  # 0.1 and 0.5 (not positive) of 0.1, 0.7, 0.5
    assert c_neg.compute().item() == pytest.approx(2 / 3, rel=1e-12)
    with pytest.raises(ValueError, match="target"):
        EditSuccessRate(target=0.5)


def test_true_counterfactual_error() -> None:
    # batch 1 errors (0.5, -0.5); batch 2 errors (0, 0.25, -0.25, 1): squares 0.25+0.25+0+0.0625+0.0625+1
    # = 1.625, absolutes 0.5+0.5+0+0.25+0.25+1 = 2.5, over 6 elements.
    batches = [(_img(0.5, 0.0), _img(0.0, 0.5)), (_img(0.0, 0.5, 0.25, 1.0), _img(0.0, 0.25, 0.5, 0.0))]
    metric = TrueCounterfactualError()
    for preds, target in batches:
        metric.update(preds, target)
    result = metric.compute()
    assert result["mse"].item() == 1.625 / 6
    assert result["l1"].item() == 2.5 / 6
    first = true_counterfactual_error(*batches[0])
    assert (first["mse"].item(), first["l1"].item()) == (0.25, 0.5)


@pytest.mark.parametrize("metric", [ReconstructionMSE(), EditSuccessRate(target=1), TrueCounterfactualError()],
                         ids=lambda m: type(m).__name__)
def test_states_are_sums(metric) -> None:
    # Sum-reduced states make the synchronised value exactly the single-process value.
    assert metric._reductions and all(fn is dim_zero_sum for fn in metric._reductions.values())
