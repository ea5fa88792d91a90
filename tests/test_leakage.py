"""The linear-probe leakage metric: exact values on constructed codes, the fit's optimality, invariances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from callbacks.editing_metrics import AttributeEditingMetrics
from callbacks.metrics.leakage import (
    LinearProbeLeakage,
    fit_logistic_regression,
    linear_probe_balanced_accuracy,
)


def _labelled_codes(n: int = 40, dims: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 3 != 0).float()  # unbalanced on purpose: 2/3 positive
    return torch.randn(n, dims, generator=g), labels, torch.arange(100, 100 + n)


def test_a_code_that_holds_the_label_is_read_perfectly() -> None:
    codes, labels, index = _labelled_codes()
    codes[:, 2] = 3 * labels - 1.5  # one dimension is the label, the others are noise
    assert linear_probe_balanced_accuracy(codes, labels, index).item() == 1.0


def test_a_code_without_the_label_scores_exactly_one_half() -> None:
    # The same code for every image: every prediction is the same class, so one class is all right and the
    # other all wrong, whatever the class frequencies.
    codes, labels, index = _labelled_codes()
    codes = torch.ones_like(codes) * torch.tensor([0.3, -1.0, 2.0, 0.0, 5.0])
    assert linear_probe_balanced_accuracy(codes, labels, index).item() == 0.5


def test_balanced_accuracy_by_hand_on_a_one_dimensional_code() -> None:
    # Even indices train and odd ones are held out, then the reverse; both folds hold labels 0 1 0 1 0 1.
    # The code is the label except for index 3 (a positive with a negative's code) and index 4 (a negative
    # with a positive's code). Trained on the evens, code 0 is always negative and code 1 is 3/4 positive,
    # so the probe calls index 3 negative: TPR 2/3, TNR 3/3 → 5/6. Trained on the odds, code 1 is always
    # positive and code 0 is 1/4 positive, so it calls index 4 positive: TPR 3/3, TNR 2/3 → 5/6.
    labels = torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1])
    code = labels.clone()
    code[3], code[4] = 0.0, 1.0
    value = linear_probe_balanced_accuracy(code[:, None], labels, torch.arange(12))
    assert value.item() == pytest.approx(5 / 6, abs=1e-12)


def test_the_fit_is_a_stationary_point_of_the_regularised_loss() -> None:
    codes, labels, _ = _labelled_codes(n=60)
    codes[:, 0] += 1.2 * labels  # partly informative, so the optimum is finite and not trivial
    l2 = 0.01
    w, b = fit_logistic_regression(codes, labels, l2=l2)
    params = torch.cat([w, b[None]]).requires_grad_(True)
    x, t = codes.double(), labels.double()
    loss = F.binary_cross_entropy_with_logits(x @ params[:-1] + params[-1], t) + 0.5 * l2 * params[:-1].pow(2).sum()
    (grad,) = torch.autograd.grad(loss, params)
    assert grad.abs().max().item() < 1e-6


def test_the_value_does_not_depend_on_the_order_of_the_samples() -> None:
    codes, labels, index = _labelled_codes()
    codes[:, 1] += labels
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))
    assert torch.equal(
        linear_probe_balanced_accuracy(codes, labels, index),
        linear_probe_balanced_accuracy(codes[perm], labels[perm], index[perm]),
    )


def test_metric_over_batches_in_any_order_equals_the_function_on_the_whole_set() -> None:
    codes, labels, index = _labelled_codes()
    codes[:, 1] += labels
    metric = LinearProbeLeakage()
    for chunk in reversed(range(0, 40, 7)):  # batches of 7, last one first, as another process might see them
        metric.update(codes[chunk:chunk + 7], labels[chunk:chunk + 7], index[chunk:chunk + 7])
    assert torch.equal(metric.compute(), linear_probe_balanced_accuracy(codes, labels, index))


def test_images_are_flattened_and_a_fold_without_both_classes_gives_nan() -> None:
    metric = LinearProbeLeakage()
    metric.update(torch.rand(6, 1, 2, 2), torch.tensor([1.0, 1, 1, 1, 0, 1]), torch.arange(6))
    assert math.isnan(metric.compute().item())  # the odd fold holds positives only
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert math.isnan(LinearProbeLeakage().compute().item())  # nothing seen


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="same length, got 4, 3 and 4"):
        linear_probe_balanced_accuracy(torch.zeros(4, 2), torch.zeros(3), torch.arange(4))


def test_the_callback_names_the_model_when_its_code_is_not_one_tensor() -> None:
    class LayeredCodes(torch.nn.Module):
        def abduct(self, x, pa):
            return [x, x]  # a hierarchical model's list of latents

    with pytest.raises(TypeError, match="LayeredCodes.abduct to return one tensor per image, got list"):
        AttributeEditingMetrics._code(LayeredCodes(), torch.zeros(2, 3), {})
