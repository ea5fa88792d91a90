"""Faults injected into real runs: malicious checkpoints, signals, a diverging learning rate, checkpoint writes
that fail or are killed half-way. The callbacks are added from the command line
(``+callbacks.fault._target_=tests.helpers.faults.SignalAt``), so the run under test is the real runner's."""

from __future__ import annotations

import builtins
import errno
import os
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_modules.checkpoints import AtomicCheckpointIO


class _CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the loader ran the pickle's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def write_malicious_checkpoint(path: Path, marker: Path, raw: bool = False) -> Path:
    """A checkpoint whose loading with ``weights_only=False`` would create ``marker``: torch's zip format (what a
    tampered ``.ckpt`` looks like), or a bare pickle when ``raw``."""
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {"weight": torch.zeros(2)}, "epoch": 0, "hyper_parameters": _CreatesFile(marker)}
    if raw:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


class SignalAt(pl.Callback):
    """Send this process ``signum`` (``SIGINT`` or ``SIGTERM``) before training batch ``batch`` (over all epochs)."""

    def __init__(self, batch: int, signum: str = "SIGINT") -> None:
        self.batch, self.signum, self.seen = batch, signal.Signals[signum], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.seen == self.batch:
            os.kill(os.getpid(), self.signum)
            if self.signum == signal.SIGINT:
                time.sleep(1)  # Python raises KeyboardInterrupt at its next check; do not start the batch first
        self.seen += 1


class BugAtTrainStart(pl.Callback):
    """An unexpected error (a bug, not a user mistake) when training starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("something unforeseen")


class MaliciousAtTrainEnd(pl.Callback):
    """When training ends, replace the run's checkpoint ``filename`` by a malicious one (``write_malicious_checkpoint``)."""

    def __init__(self, filename: str, marker: str) -> None:
        self.filename, self.marker = filename, marker

    def on_train_end(self, trainer, pl_module) -> None:
        folder = Path(trainer.default_root_dir) / "checkpoints"
        write_malicious_checkpoint(folder / self.filename, Path(self.marker))


class ExplodeLearningRateAt(pl.Callback):
    """At the start of epoch ``epoch``, set every optimizer's learning rate to ``lr`` (a run that diverges after it
    has saved good checkpoints)."""

    def __init__(self, epoch: int, lr: float = 1e12) -> None:
        self.epoch, self.lr = epoch, lr

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr


class _FaultyIO(AtomicCheckpointIO):
    def __init__(self, fault: _CheckpointFault, on_saved) -> None:
        super().__init__(on_saved=on_saved)
        self.fault, self.writes = fault, 0

    def _write(self, f, data) -> None:
        self.writes += 1
        if self.writes == self.fault.write:
            self.fault.strike(f, data)
        super()._write(f, data)


class _CheckpointFault(pl.Callback):
    """Replace the run's checkpoint writer by one that fails on checkpoint write number ``write`` (1-based)."""

    def __init__(self, write: int) -> None:
        self.write = write

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            trainer.strategy.checkpoint_io = _FaultyIO(self, trainer.strategy.checkpoint_io.on_saved)

    def strike(self, f, data) -> None:
        raise NotImplementedError


class DiskFullAt(_CheckpointFault):
    """The ``write``-th checkpoint write fails as on a full disk."""

    def strike(self, f, data) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class HangInWriteAt(_CheckpointFault):
    """The ``write``-th checkpoint write stops half-way: half the bytes written and flushed, ``marker`` created,
    then it waits to be killed."""

    def __init__(self, write: int, marker: str) -> None:
        super().__init__(write)
        self.marker = marker

    def strike(self, f, data) -> None:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        Path(self.marker).write_text(str(os.getpid()))
        time.sleep(120)
