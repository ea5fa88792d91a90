"""SR(+)/SR(−), CFD, attribute accuracy and BCA against hand computations (the DDP check is in
``test_metrics_realism.py``, one spawn for all metrics)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from callbacks.metrics.scores import (
    AttributeAccuracy,
    BalancedAccuracy,
    ClassifierFeatureDistance,
    SwapSuccessRate,
    attribute_accuracy,
    balanced_accuracy,
    classifier_feature_distance,
    swap_success_rates,
)


class TestSwapSuccessRate:
    def test_hand_computed(self) -> None:
        plus = torch.tensor([0.9, 0.6, 0.5, 0.2])  # 0 → 1: successes are p > 0.5 → 2 of 4
        minus = torch.tensor([0.1, 0.5, 0.7])  # 1 → 0: successes are p <= 0.5 → 2 of 3
        out = swap_success_rates(plus, minus)
        assert out["sr_plus"].item() == pytest.approx(0.5)
        assert out["sr_minus"].item() == pytest.approx(2 / 3)
        assert out["sr"].item() == pytest.approx((0.5 + 2 / 3) / 2)

    def test_metric_accumulates_over_batches(self) -> None:
        metric = SwapSuccessRate()
        metric.update(torch.tensor([0.9, 0.6]), torch.tensor([0.1]))
        metric.update(torch.tensor([0.5, 0.2]), torch.tensor([0.5, 0.7]))
        out = metric.compute()
        assert out["sr_plus"].item() == pytest.approx(0.5)
        assert out["sr_minus"].item() == pytest.approx(2 / 3)

    def test_empty_direction_is_nan_and_logits_rejected(self) -> None:
        out = swap_success_rates(torch.tensor([0.9]), torch.empty(0))
        assert out["sr_plus"].item() == 1.0 and math.isnan(out["sr_minus"].item())
        with pytest.raises(ValueError, match="probabilities"):
            swap_success_rates(torch.tensor([3.2]), torch.tensor([0.1]))


class TestCFD:
    def test_hand_computed(self) -> None:
        original = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
        fake = torch.tensor([[3.0, 4.0], [1.0, 1.0], [2.0, 1.0]])  # distances 5, 0, 1
        assert classifier_feature_distance(original, fake).item() == pytest.approx(2.0)

    def test_metric_over_both_directions(self) -> None:
        metric = ClassifierFeatureDistance()
        metric.update(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]))  # x_{y=1} vs fake(z_0, c_1, 1)
        metric.update(torch.tensor([0.5, 2.0]), torch.tensor([1.5, 2.0]))  # scalar outputs [B]: 1, 0
        assert metric.compute().item() == pytest.approx((5 + 1 + 0) / 3)
        assert math.isnan(ClassifierFeatureDistance().compute().item())

    def test_shape_mismatch(self) -> None:
        with pytest.raises(ValueError, match="same shape"):
            classifier_feature_distance(torch.zeros(2, 3), torch.zeros(2, 4))


class TestAttributeAccuracy:
    probs = torch.tensor([[0.9, 0.2], [0.4, 0.8], [0.7, 0.6], [0.1, 0.3]])
    target = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1]])

    def test_hand_computed(self) -> None:
        # attribute 0: hits rows 0, 3 → 2/4; attribute 1: hits rows 0, 1, 2 → 3/4
        assert attribute_accuracy(self.probs, self.target).tolist() == pytest.approx([0.5, 0.75])

    def test_mask_and_metric(self) -> None:
        mask = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)
        metric = AttributeAccuracy(["Smiling", "Eyeglasses"])
        metric.update(self.probs[:2], self.target[:2], mask[:2])
        metric.update(self.probs[2:], self.target[2:], mask[2:])
        out = metric.compute()
        assert out["Smiling"].item() == pytest.approx(0.5)  # rows 0 (hit), 1 (miss)
        assert out["Eyeglasses"].item() == pytest.approx(1.0)  # row 2 (hit)
        metric.update(self.probs, self.target, torch.zeros_like(mask))
        assert metric.compute()["Smiling"].item() == pytest.approx(0.5)  # an all-false mask adds nothing
        empty = AttributeAccuracy(["a"]).compute()["a"]
        assert math.isnan(empty.item())


class TestBalancedAccuracy:
    def test_binary_probs_vs_sklearn(self) -> None:
        probs = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.8, 0.1, 0.55])
        target = torch.tensor([1, 0, 0, 1, 1, 0, 0])
        # class 1 recall 2/3, class 0 recall 2/4 → 7/12
        assert balanced_accuracy(probs, target, 2).item() == pytest.approx(7 / 12)
        expected = balanced_accuracy_score(target.numpy(), (probs > 0.5).long().numpy())
        assert balanced_accuracy(probs, target, 2).item() == pytest.approx(expected)

    def test_multiclass_metric_vs_sklearn(self) -> None:
        gen = torch.Generator().manual_seed(0)
        scores, target = torch.randn(50, 4, generator=gen), torch.randint(0, 3, (50,), generator=gen)
        metric = BalancedAccuracy(num_classes=4)  # class 3 never occurs: left out, as in sklearn
        for i in range(0, 50, 16):
            metric.update(scores[i : i + 16], target[i : i + 16])
        expected = balanced_accuracy_score(target.numpy(), scores.argmax(1).numpy())
        assert metric.compute().item() == pytest.approx(expected)
        assert math.isnan(BalancedAccuracy().compute().item())

    def test_bad_targets(self) -> None:
        with pytest.raises(ValueError, match="targets"):
            balanced_accuracy(torch.tensor([0, 1]), torch.tensor([0, 2]), 2)
