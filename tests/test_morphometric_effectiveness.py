"""Morphometric effectiveness on the real MorphoMNIST test digits: ~0 for the identity, large when shuffled."""

from __future__ import annotations

import pytest
import torch

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
