"""Morphometric effectiveness on the real MorphoMNIST test digits: ~0 for the identity, large when shuffled."""

from __future__ import annotations

import pytest
import torch

from benchmarks.counterfactual_suite import CopyModel
from callbacks.metrics.effectiveness import MorphometricEffectiveness
from datamodules.morphomnist import MorphoMNISTDataModule
from datamodules.synthetic.morphomnist import oracle_measure
from tests.helpers.shared_data import shared_path


@pytest.mark.data
def test_identity_counterfactual_scores_near_zero_and_shuffled_targets_do_not():
    dm = MorphoMNISTDataModule(str(shared_path("morphomnist")), layout="t10k_only", t10k_split=(0, 0, 300),
                               attributes=("thickness", "intensity"))
    test = dm.dataset("test")
    measured = dict(zip(("thickness", "intensity"), oracle_measure(test.images), strict=True))
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    scores = {}
    for name, target in (("identity", test.pa), ("shuffled", {k: v[perm] for k, v in test.pa.items()})):
        metric = MorphometricEffectiveness(dm.attributes, intervened=["thickness"])
        metric.update(measured, target, "thickness")
        scores[name] = {k[1]: float(v) for k, v in metric.compute().items() if isinstance(k, tuple)}
    # the whole-set values (benchmarks/morphometric_effectiveness.py): 0.124 px / 0.51 vs 0.740 px / 55.8
    assert scores["identity"]["thickness"] < 0.2 and scores["identity"]["intensity"] < 1.0
    assert scores["shuffled"]["thickness"] > 4 * scores["identity"]["thickness"]
    assert scores["shuffled"]["intensity"] > 30


def test_an_unmeasured_parent_can_be_intervened_on():
    """do(digit) is judged by the thickness and intensity it leaves, though the digit itself is not measured."""
    from datamodules.base import Attribute

    t = Attribute("thickness", "continuous", low=0.0, high=10.0)
    i = Attribute("intensity", "continuous", low=0.0, high=100.0)
    metric = MorphometricEffectiveness([t, i], ["thickness", "digit"])
    target = {"thickness": t.normalise(torch.tensor([2.0, 4.0])), "intensity": i.normalise(torch.tensor([50., 60.]))}
    metric.update({"thickness": [2.5, 3.0], "intensity": [50.0, 70.0]}, target, "digit")
    out = metric.compute()
    assert out[("digit", "thickness")].item() == pytest.approx(0.75)
    assert out[("digit", "intensity")].item() == pytest.approx(5.0)


@pytest.mark.data
def test_the_callback_reports_what_doing_nothing_scores():
    import pytorch_lightning as pl

    from callbacks.counterfactual_metrics import CounterfactualMetrics
    from callbacks.references import ReferenceCounterfactuals

    dm = MorphoMNISTDataModule(str(shared_path("morphomnist")), layout="t10k_only", t10k_split=(0, 0, 48),
                               batch_size=16)
    callback = CounterfactualMetrics(intervene=["thickness", "digit"], composition_m=(1,), morphometric=True,
                                     per_sample_csv=False)
    # the test split alone: no training images for the mean and the retrieval, which are dropped; x* = x stays
    references = ReferenceCounterfactuals()
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback, references], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.test(CopyModel(), datamodule=dm, verbose=False)  # x* = x
    results = callback.results["test"]
    for do in ("thickness", "digit"):
        for measured in ("thickness", "intensity"):
            key = f"do_{do}/{measured}"
            assert results[f"test/morpho_effectiveness/{key}"] == \
                results[f"test/reference/identity/morpho_effectiveness/{key}"]
    assert set(references.models) == {"identity"}
    # do(thickness) draws targets from other bins: doing nothing leaves the thickness far from them
    assert results["test/reference/identity/morpho_effectiveness/do_thickness/thickness"] > 0.5
