"""Faults during a run: a diverging loss, Ctrl-C and SIGTERM mid-epoch, a checkpoint write that fails, and
kill -9 in the middle of a checkpoint write. In each the last good checkpoint survives, the run says what happened
in one line, ``latest`` only ever points at a run with a checkpoint, and ``resume=`` finishes the run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from callbacks.run_guards import FiniteGuard, TrainingDiverged
from experiments.cli import train as main
from tests.helpers.celeba_layout import write_tiny_celeba
from tests.helpers.runs import tiny_overrides

NAME = "classifier_smiling"  # 16 training faces in batches of 8: 2 batches (2 optimizer steps) per epoch
GAN = "ifcvae_smiling"  # an adversarial model (four optimizers), judged by the classifier


@pytest.fixture(scope="module")
def celeba(tmp_path_factory) -> Path:
    return write_tiny_celeba(tmp_path_factory.mktemp("faults") / "celeba", n_train=16, n_val=8, n_test=8)


@pytest.fixture(scope="module")
def oracle(celeba) -> str:
    tmp = celeba.parent
    assert main(args(tmp, celeba, "trainer.max_epochs=1", "run_id=oracle")) == 0
    return str(tmp / "runs" / NAME / "oracle" / "checkpoints" / "best.ckpt")


def args(tmp: Path, celeba: Path, *extra: str, name: str = NAME, oracle: str | None = None) -> list[str]:
    return [name, *tiny_overrides(name, tmp, celeba, oracle), *extra]


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def finite(path: Path) -> bool:
    return all(torch.isfinite(v).all() for v in state(path)["state_dict"].values() if torch.is_floating_point(v))


def error_line(capsys) -> str:
    said = capsys.readouterr()
    assert "Traceback (most recent call last)" not in said.out + said.err
    lines = [line for line in said.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, said.err
    return lines[0]


def test_a_run_that_diverges_from_the_start_leaves_nothing_and_latest_alone(tmp_path, celeba, oracle, capsys):
    assert main(args(tmp_path, celeba, "trainer.max_epochs=1", "run_id=good", name=GAN, oracle=oracle)) == 0
    latest = tmp_path / "runs" / GAN / "latest"
    assert os.readlink(latest) == "good"
    absurd = ["model.lr=1e12", "model.disc_lr=1e12", "model.aux_lr=1e12", "trainer.max_epochs=2", "run_id=absurd"]
    assert main(args(tmp_path, celeba, *absurd, name=GAN, oracle=oracle)) == 1
    line = error_line(capsys)
    assert re.match(r"error: training diverged at step \d+ \(epoch 0\): weight \S+ is no longer finite", line), line
    assert "No checkpoint of these weights was written. Lower the learning rate (e.g. model.lr)" in line
    assert not (tmp_path / "runs" / GAN / "absurd").exists(), "a failed run without a checkpoint leaves nothing"
    assert os.readlink(latest) == "good"


def test_a_run_that_diverges_later_keeps_its_last_good_checkpoint(tmp_path, celeba, oracle, capsys):
    boom = ["+callbacks.boom._target_=tests.helpers.faults.ExplodeLearningRateAt", "+callbacks.boom.epoch=1"]
    assert main(args(tmp_path, celeba, "trainer.max_epochs=3", "run_id=diverges", *boom, name=GAN, oracle=oracle)) == 1
    run_dir = tmp_path / "runs" / GAN / "diverges"
    line = error_line(capsys)
    assert "training diverged at step" in line and "(epoch 1)" in line
    assert f"The run's last good checkpoint is {run_dir}/checkpoints/last.ckpt: resume={run_dir}." in line
    assert f"The traceback is in {run_dir}/error.log." in line
    assert "TrainingDiverged" in (run_dir / "error.log").read_text()
    for name in ("last.ckpt", "best.ckpt"):
        saved = run_dir / "checkpoints" / name
        assert state(saved)["epoch"] == 0 and finite(saved), name
    assert not (run_dir / "metrics.json").exists()
    assert os.readlink(tmp_path / "runs" / GAN / "latest") == "diverges"


def test_an_unexpected_error_is_one_line_with_its_type_and_the_debug_flag(tmp_path, celeba, capsys):
    bug = ["+callbacks.bug._target_=tests.helpers.faults.BugAtTrainStart"]
    assert main(args(tmp_path, celeba, "run_id=bug", *bug)) == 1
    assert error_line(capsys) == "error: RuntimeError: something unforeseen. Run again with --debug for the traceback."
    assert not (tmp_path / "runs" / NAME / "bug").exists()
    with pytest.raises(RuntimeError, match="something unforeseen"):
        main(args(tmp_path, celeba, "run_id=bug", *bug, "--debug"))


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_mid_epoch_leaves_a_resumable_checkpoint_and_resume_latest_finishes(signum, tmp_path, celeba,
                                                                                     capsys):
    # The signal arrives in the first epoch, after its first batch: no epoch-end checkpoint exists yet.
    stop = ["+callbacks.stop._target_=tests.helpers.faults.SignalAt", "+callbacks.stop.batch=1",
            f"+callbacks.stop.signum={signum}"]
    assert main(args(tmp_path, celeba, "trainer.max_epochs=2", "run_id=stopped", *stop)) == 130
    run_dir = tmp_path / "runs" / NAME / "stopped"
    assert f"Resume with: python -m experiments {NAME} resume={run_dir}" in capsys.readouterr().err
    interrupted = state(run_dir / "checkpoints" / "last.ckpt")
    # SIGINT interrupts before the second batch, SIGTERM (Lightning's handler) after it
    assert interrupted["epoch"] == 0 and interrupted["global_step"] == (1 if signum == "SIGINT" else 2)
    assert os.readlink(tmp_path / "runs" / NAME / "latest") == "stopped"

    assert main([NAME, "resume=latest", f"paths.runs_dir={tmp_path}/runs", "callbacks.stop=null"]) == 0
    finished = state(run_dir / "checkpoints" / "last.ckpt")
    assert finished["epoch"] == 1 and finished["global_step"] == 4  # the run's 2 epochs x 2 steps, none lost
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_one(tmp_path, celeba, capsys):
    # writes: epoch 1 best.ckpt, epoch 1 last.ckpt, epoch 2 best.ckpt <- the disk is full
    full = ["+callbacks.disk._target_=tests.helpers.faults.DiskFullAt", "+callbacks.disk.write=3"]
    assert main(args(tmp_path, celeba, "trainer.max_epochs=3", "run_id=full", *full)) == 1
    run_dir = tmp_path / "runs" / NAME / "full"
    line = error_line(capsys)
    assert f"cannot write checkpoint {run_dir}/checkpoints/best.ckpt (No space left on device)" in line
    assert "the previous checkpoint is intact. Free disk space" in line and f"resume={run_dir}" in line
    assert state(run_dir / "checkpoints" / "best.ckpt")["epoch"] == 0
    assert state(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert not list((run_dir / "checkpoints").glob(".*")), "no partial file left behind"
    assert not (run_dir / "metrics.json").exists()


def test_kill_9_during_a_checkpoint_write_then_resume_continues_from_the_previous_one(tmp_path, celeba):
    """A real ``kill -9`` of ``python -m experiments`` while it writes the second epoch's last.ckpt (the writer
    stops half-way, and says so through a marker file)."""
    marker = tmp_path / "writing"
    hang = ["+callbacks.hang._target_=tests.helpers.faults.HangInWriteAt", "+callbacks.hang.write=4",
            f"+callbacks.hang.marker={marker}"]  # writes: best, last (epoch 1), best, last (epoch 2) <- killed
    proc = subprocess.Popen([sys.executable, "-m", "experiments",
                             *args(tmp_path, celeba, "trainer.max_epochs=3", "run_id=killed", *hang)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, "the run ended before the write that was to be killed"
            assert time.time() < deadline, "the checkpoint write never started"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = tmp_path / "runs" / NAME / "killed"
    partial = run_dir / "checkpoints" / ".last.ckpt.partial"
    assert partial.is_file() and partial.stat().st_size > 0, "the write was killed half-way"
    assert state(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 0, "last.ckpt is the previous good one"

    assert main([NAME, "resume=latest", f"paths.runs_dir={tmp_path}/runs", "callbacks.hang=null"]) == 0
    assert state(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 2 and not partial.exists()
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 6


class _ManualStep(pl.LightningModule):
    """One weight; its loss is NaN from the second step. ``skips`` drops non-finite updates (as the HVAE's
    guarded_step does); otherwise the NaN reaches the weight."""

    def __init__(self, skips: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.ones(1))
        self.skips = skips

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = (self.w * batch).sum() * (float("nan") if batch_idx >= 1 else 1.0)
        self.log("train/loss", loss)
        opt.zero_grad()
        if torch.isfinite(loss) or not self.skips:
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: pl.LightningModule, tmp_path: Path) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[FiniteGuard()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=1))
    return trainer


def test_finite_guard_lets_a_model_skip_non_finite_updates(tmp_path):
    module = _ManualStep(skips=True)
    trainer = _fit(module, tmp_path)
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4  # every batch, 3 of them skipped
    assert trainer.global_step == 1 and torch.isfinite(module.w).all()


def test_finite_guard_stops_when_a_non_finite_update_reaches_the_weights(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 2 \(epoch 0\): weight w is no longer "
                                               r"finite \(train/loss = nan\)"):
        _fit(_ManualStep(skips=False), tmp_path)


def test_finite_guard_refuses_to_write_non_finite_weights(tmp_path):
    module = _ManualStep(skips=True)
    trainer = _fit(module, tmp_path)
    with torch.no_grad():
        module.w.fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match="refusing to write a checkpoint at step 1: weight w is not finite"):
        trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_first_non_finite_names_the_tensor_and_ignores_an_overflowing_total():
    from callbacks.run_guards import first_non_finite

    big = torch.full((4,), 3e38)  # finite weights whose sum overflows float32
    assert first_non_finite([("a", torch.ones(3)), ("b", big)]) is None
    assert first_non_finite([("a", torch.ones(3)), ("b", torch.tensor([1.0, float("nan")]))]) == "b"
    assert first_non_finite([("a", torch.tensor([float("-inf")])), ("b", torch.ones(2))]) == "a"
    assert first_non_finite([("steps", torch.tensor([3]))]) is None  # integer buffers are not checked
