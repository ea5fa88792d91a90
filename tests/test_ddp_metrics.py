"""Editing metrics are exactly the same on two CPU processes (DDP, gloo) as on one.

The test set has 13 samples and batches of 4: one process sees batches of 4, 4, 4, 1; under DDP rank 0 sees
7 samples (4 + 3) and rank 1 sees 6 (4 + 2). Lightning's DistributedSampler would pad the set to 14 by
repeating a sample, so the DataModule splits it itself without padding (``use_distributed_sampler=False``)
and every sample is counted exactly once. Every pixel is on a 1/16 grid, so the float sums are exact whatever
the summation order, and the synchronised values must equal the single-process values bit for bit.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from callbacks.editing_metrics import AttributeEditingMetrics
from callbacks.image_grids import CounterfactualGrid
from tests.test_callbacks import ATTR, FakeEditor, FakeOracle, TinyEditingData, expected_metrics

N_TEST, BATCH = 13, 4


def _test_metrics(tmp_path, devices: int) -> dict[str, float]:
    data = TinyEditingData(n_val=2, n_test=N_TEST, batch_size=BATCH)
    callbacks = [AttributeEditingMetrics(ATTR, oracle=FakeOracle()), CounterfactualGrid(ATTR, n_images=2)]
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
    expected = expected_metrics(TinyEditingData(n_val=2, n_test=N_TEST), range(2, 2 + N_TEST), "test")
    assert single == pytest.approx(expected, rel=1e-6)
    assert (tmp_path / "ddp" / "images" / "test_cf_grid.png").is_file()
