"""Effectiveness (eq. 8, Tables 3–4): MAE in original units, accuracy, set-level F1, and predictors run in eval
mode without side effects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from callbacks.metrics.effectiveness import (
    Effectiveness,
    MorphometricEffectiveness,
    Predictor,
    absolute_error_sums,
    effectiveness_score,
    evaluating,
    f1_counts,
    f1_from_counts,
    predict_parents,
)
from datamodules.base import Attribute

THICK = Attribute("thickness", "continuous", low=1.0, high=5.0)
INT = Attribute("intensity", "continuous", low=64.0, high=256.0)
DIGIT = Attribute("digit", "categorical", num_classes=10)
SMILE = Attribute("Smiling", "binary")


def test_mae_is_in_original_units() -> None:
    # normalised -1, 0, 1 -> raw 1, 3, 5 (range 4): errors of 0.5 normalised are 1.0 raw.
    preds, target = torch.tensor([-0.5, 0.0, 0.5]), torch.tensor([-1.0, 0.0, 1.0])
    total, n = absolute_error_sums(preds, target, THICK)
    assert total.dtype == torch.float64 and total.item() == 2.0 and n.item() == 3
    assert effectiveness_score(preds, target, THICK).item() == pytest.approx(2.0 / 3.0)
    assert effectiveness_score(torch.tensor([0.5]), torch.tensor([0.0]), INT).item() == pytest.approx(48.0)


def test_set_f1_equals_sklearn_on_concatenated_data_not_the_batch_mean() -> None:
    batches = [(torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])),  # F1 = 1
               (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))]  # F1 = 0
    metric = Effectiveness([SMILE])
    for p, t in batches:
        metric.update({"Smiling": p}, {"Smiling": t}, "Smiling")
    got = metric.compute()[("Smiling", "Smiling")].item()
    all_p = torch.cat([p for p, _ in batches]).numpy()
    all_t = torch.cat([t for _, t in batches]).numpy()
    assert got == pytest.approx(f1_score(all_t, all_p))  # 2·3 / (2·3 + 1 + 1) = 0.75
    per_batch = np.mean([f1_score(t.numpy(), p.numpy()) for p, t in batches])
    assert got == pytest.approx(0.75) and per_batch == pytest.approx(0.5)


def test_f1_edge_cases_follow_sklearn() -> None:
    p, t = torch.zeros(4), torch.zeros(4)
    assert f1_from_counts(*f1_counts(p, t)).item() == 0.0 == f1_score(t.numpy(), p.numpy(), zero_division=0)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(Effectiveness([SMILE]).compute()[("Smiling", "Smiling")].item())


def test_perfect_model_scores_zero_error_and_full_accuracy() -> None:
    attrs = [THICK, INT, DIGIT, SMILE]
    metric = Effectiveness(attrs, intervened=["thickness", "digit"])
    g = torch.Generator().manual_seed(0)
    for do in ("thickness", "digit"):
        target = {"thickness": torch.rand(8, generator=g) * 2 - 1, "intensity": torch.rand(8, generator=g) * 2 - 1,
                  "digit": torch.randint(0, 10, (8,), generator=g).float(),
                  "Smiling": torch.tensor([0.0, 1.0] * 4)}
        metric.update({k: v.clone() for k, v in target.items()}, target, do)
    out = metric.compute()
    assert set(out) == {(do, a.name) for do in ("thickness", "digit") for a in attrs}
    for (_, measured), value in out.items():
        assert value.item() == (0.0 if measured in ("thickness", "intensity") else 1.0)
    assert set(Effectiveness.flatten(out, "test/eff/")) >= {"test/eff/do_thickness/intensity"}


def test_per_sample_interventions_split_the_table() -> None:
    metric = Effectiveness([THICK, DIGIT])
    target = {"thickness": torch.tensor([0.0, 0.0]), "digit": torch.tensor([3.0, 4.0])}
    preds = {"thickness": torch.tensor([0.5, 0.0]), "digit": torch.tensor([3.0, 5.0])}
    metric.update(preds, target, torch.tensor([0, 1]))  # sample 0: do(thickness), sample 1: do(digit)
    out = metric.compute()
    assert out[("thickness", "thickness")].item() == 1.0 and out[("thickness", "digit")].item() == 1.0
    assert out[("digit", "thickness")].item() == 0.0 and out[("digit", "digit")].item() == 0.0


class _BNRegressor(nn.Module):
    """Image [B, 1, 4, 4] (+ optional context [B, k]) -> one value; BatchNorm and dropout to catch train mode."""

    def __init__(self, context: int = 0, out: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
        self.head = nn.Linear(8 + context, out)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x)
        return self.head(h if c is None else torch.cat([h, c], 1))


def test_predictors_run_in_eval_mode_and_leave_no_trace() -> None:
    torch.manual_seed(0)
    thick_net, int_net, digit_net = _BNRegressor(context=1), _BNRegressor(), _BNRegressor(out=10)
    digit_net.eval()  # a mix of flags must come back as it was
    nets = (thick_net, int_net, digit_net)
    before = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    flags = [[m.training for m in n.modules()] for n in nets]
    predictors = {"thickness": Predictor(thick_net, THICK, context=("intensity",)),
                  "intensity": Predictor(int_net, INT), "digit": Predictor(digit_net, DIGIT)}
    x = torch.rand(6, 1, 4, 4, requires_grad=True)
    target = {"thickness": torch.zeros(6), "intensity": torch.linspace(-1, 1, 6), "digit": torch.zeros(6)}
    out = predict_parents(predictors, x, target)
    again = predict_parents(predictors, x, target)
    for n, b, f in zip(nets, before, flags, strict=True):
        assert all(torch.equal(v, b[k]) for k, v in n.state_dict().items())  # weights and BN running stats
        assert [m.training for m in n.modules()] == f
    assert all(torch.equal(out[k], again[k]) for k in out)  # no dropout, no batch statistics
    assert not any(v.requires_grad for v in out.values())
    assert out["digit"].shape == (6,) and set(out["digit"].tolist()) <= set(range(10))
    # Eval mode: one image's prediction does not depend on the rest of the batch.
    single = predict_parents(predictors, x[:1], {k: v[:1] for k, v in target.items()})
    assert torch.allclose(single["thickness"], out["thickness"][:1], atol=1e-6)


def test_thickness_context_from_targets_or_from_the_intensity_predictor() -> None:
    torch.manual_seed(0)
    thick_net, int_net = _BNRegressor(context=1), _BNRegressor()
    x = torch.rand(5, 1, 4, 4)
    target = {"intensity": torch.full((5,), 0.7)}
    published = predict_parents({"thickness": Predictor(thick_net, THICK, context=("intensity",)),
                                 "intensity": Predictor(int_net, INT)}, x, target)
    from_image = predict_parents({"thickness": Predictor(thick_net, THICK, context=("intensity",),
                                                         context_from="predicted"),
                                  "intensity": Predictor(int_net, INT)}, x, target)
    with evaluating(thick_net, int_net):
        i_hat = int_net(x)
        expected_target = thick_net(x, target["intensity"][:, None])[:, 0]
        expected_image = thick_net(x, i_hat)[:, 0]
    assert torch.allclose(published["thickness"], expected_target)
    assert torch.allclose(from_image["thickness"], expected_image)
    with pytest.raises(ValueError, match="cycle"):
        predict_parents({"thickness": Predictor(thick_net, THICK, context=("intensity",),
                                                context_from="predicted")}, x, target)


def test_binary_predictor_thresholds_logits_or_probabilities() -> None:
    class Const(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, 0]

    x = torch.tensor([-0.1, 0.0, 0.3, 0.6]).reshape(4, 1, 1, 1)
    assert Predictor(Const(), SMILE)(x).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert Predictor(Const(), SMILE, logits=False)(x).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_morphometric_effectiveness_mae_skips_unmeasured_images() -> None:
    metric = MorphometricEffectiveness([THICK, INT], intervened=["thickness", "intensity"])
    target = {"thickness": torch.tensor([0.0, 0.0, 1.0]), "intensity": torch.tensor([0.0, 0.0, 0.0])}  # raw 3, 160
    measured = {"thickness": np.array([3.5, np.nan, 4.0]), "intensity": np.array([150.0, np.nan, 170.0])}
    metric.update(measured, target, "thickness")
    out = metric.compute()
    assert out[("thickness", "thickness")].item() == pytest.approx((0.5 + 1.0) / 2)
    assert out[("thickness", "intensity")].item() == pytest.approx(10.0)
    assert math.isnan(out[("intensity", "thickness")].item())
    assert out["unmeasured"].item() == 1
    assert "test/morph/unmeasured" in MorphometricEffectiveness.flatten(out, "test/morph/")
    with pytest.raises(ValueError, match="continuous"):
        MorphometricEffectiveness([DIGIT])
