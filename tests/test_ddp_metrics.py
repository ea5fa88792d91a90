"""Editing metrics and the counterfactual metrics are the same on two CPU processes (DDP, gloo) as on one.

The test set has 13 samples and batches of 4: one process sees batches of 4, 4, 4, 1; under DDP rank 0 sees
7 samples (4 + 3) and rank 1 sees 6 (4 + 2). Lightning's DistributedSampler would pad the set to 14 by
repeating a sample, so the DataModule splits it itself without padding (``use_distributed_sampler=False``)
and every sample is counted exactly once. Every pixel is on a 1/16 grid, so the float sums are exact whatever
the summation order, and the synchronised values must equal the single-process values bit for bit.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from callbacks.counterfactual_metrics import CounterfactualMetrics
from callbacks.editing_metrics import AttributeEditingMetrics
from callbacks.image_grids import CounterfactualGrid
from callbacks.metrics.leakage import linear_probe_balanced_accuracy
from callbacks.references import ReferenceCounterfactuals
from lightning_modules.references import IdentityCounterfactual, MeanImageCounterfactual, NearestTrainingImage
from tests.test_callbacks import (
    ATTR,
    OTHER,
    FakeEditor,
    FakeOracle,
    StridedSampler,
    TinyEditingData,
    expected_metrics,
)
from tests.test_counterfactual_metrics import (
    N,
    PixelParentsData,
    PixelVAE,
    ReadingPredictors,
    WritingModel,
    _write,
)

N_TEST, BATCH = 13, 4


def _references() -> ReferenceCounterfactuals:
    """Every reference, fitted on the training split in each process (the same pool everywhere)."""
    return ReferenceCounterfactuals({"identity": IdentityCounterfactual(), "mean": MeanImageCounterfactual(),
                                     "retrieval": NearestTrainingImage()}, retrieval_resolution=2)


def _test_metrics(tmp_path, devices: int) -> dict[str, float]:
    data = TinyEditingData(n_val=6, n_test=N_TEST, batch_size=BATCH)
    callbacks = [AttributeEditingMetrics(ATTR, oracle=FakeOracle(), leakage_probe=True,
                                         preservation_oracle=FakeOracle(), preserved=[OTHER]),
                 CounterfactualGrid(ATTR, n_images=2), _references()]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.test(FakeEditor(), datamodule=data, verbose=False)
    # With ddp_spawn, Lightning copies rank 0's callback_metrics back to this (main) process.
    return {key: value.item() for key, value in trainer.callback_metrics.items()}


def test_two_processes_equal_one_process(tmp_path) -> None:
    single = _test_metrics(tmp_path / "single", devices=1)
    distributed = _test_metrics(tmp_path / "ddp", devices=2)
    assert distributed == single
    assert single["test/n_images"] == N_TEST
    data, rows = TinyEditingData(n_val=6, n_test=N_TEST), torch.arange(6, 6 + N_TEST)
    expected = expected_metrics(data, range(6, 6 + N_TEST), "test", preserved=True)
    # FakeEditor abducts the image itself; the probe is fitted on the whole gathered set on every process.
    expected[f"test/leakage/{ATTR}/probe_bacc"] = linear_probe_balanced_accuracy(
        data.images[rows], data.labels[rows], rows).item()
    model_keys = {k: v for k, v in single.items() if "/reference/" not in k}
    assert model_keys == pytest.approx(expected, rel=1e-6)
    assert {k.split("/")[2] for k in single if "/reference/" in k} == {"identity", "mean", "retrieval"}
    assert single["test/reference/identity/true_cf/preservation_mse"] == 0.0
    assert (tmp_path / "ddp" / "images" / "test_cf_grid.png").is_file()


class _StridedPixelParentsData(PixelParentsData):
    """The same test split, handed out rank, rank + world, ... under DDP (every image exactly once)."""

    def test_dataloader(self):
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = StridedSampler(N, torch.distributed.get_rank(), torch.distributed.get_world_size())
        return self._loader(self.dataset("test"), sampler=sampler)


def _counterfactual_metrics(tmp_path, devices: int, references: bool = False) -> dict[str, float]:
    # ddp_spawn returns rank 0's logged values through a pipe that its parent reads only after the workers exit:
    # a few hundred keys fill the pipe and hang both. The run with references therefore logs fewer metrics.
    if references:
        callback = CounterfactualMetrics(predictors=ReadingPredictors(), composition_m=(1,), fid="fid_domain",
                                         fid_real="eval")
    else:
        callback = CounterfactualMetrics(predictors=ReadingPredictors(), vae=PixelVAE(), composition_m=(1, 3),
                                         distances=("l1", "embedding"), fid="fid_domain", fid_real="eval")
    callbacks = [callback, _references()] if references else [callback]
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         use_distributed_sampler=False, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.test(ShiftingModel(), datamodule=_StridedPixelParentsData(), verbose=False)
    return {key: value.item() for key, value in trainer.callback_metrics.items()}


class ShiftingModel(WritingModel):
    """Writes the parents and also brightens the texture by the continuous parent, so that every metric
    (composition, reversibility, effectiveness, CLD, FID) takes a non-trivial value."""

    def predict(self, noise, pa):
        out = noise.clone()
        out[:, :, 1:] = (noise[:, :, 1:] + 0.1 * pa["c"].view(-1, 1, 1, 1)).clamp(0, 1)
        return _write(out, pa)


def test_counterfactual_metrics_two_processes_equal_one(tmp_path) -> None:
    single = _counterfactual_metrics(tmp_path / "single", devices=1)
    distributed = _counterfactual_metrics(tmp_path / "ddp", devices=2)
    assert set(distributed) == set(single)
    groups = {k.split("/")[1] for k in single}
    assert {"composition", "reversibility", "effectiveness", "cld", "fid_domain", "true_cf"} <= groups
    assert any(v > 0 for k, v in single.items() if k.startswith("test/reversibility"))
    # the same interventions on the same images: equal up to the order of float sums across processes
    assert distributed == pytest.approx(single, rel=1e-5, abs=1e-6)
    # the per-sample file gathers every image's values from both processes
    rows = [(tmp_path / run / "per_sample.csv").read_text().splitlines() for run in ("single", "ddp")]
    assert len(rows[0]) == N + 1 and rows[1] == rows[0]


def test_reference_counterfactuals_two_processes_equal_one(tmp_path) -> None:
    single = _counterfactual_metrics(tmp_path / "single", devices=1, references=True)
    distributed = _counterfactual_metrics(tmp_path / "ddp", devices=2, references=True)
    model = {k.split("/", 1)[1] for k in single if "/reference/" not in k}
    for name in ("identity", "mean", "retrieval"):
        assert {k.split("/", 3)[3] for k in single if k.startswith(f"test/reference/{name}/")} == model, name
    assert single["test/reference/identity/true_cf/do_b/preservation_mse"] == 0.0
    assert single["test/reference/mean/true_cf/do_b/preservation_mse"] > 0.0
    assert distributed == pytest.approx(single, rel=1e-5, abs=1e-6)
