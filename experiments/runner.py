"""The experiment runner: ``python -m experiments NAME key=value ...``.

compose the config -> seed everything -> build data, model, callbacks, logger, trainer -> fit -> test.

Each run lives in ``<paths.runs_dir>/<name>/<run_id>/``::

    config.yaml            the fully resolved config (also logged as hyperparameters)
    checkpoints/last.ckpt  the last epoch (resume from here), checkpoints/best.ckpt by ``checkpoint.monitor``
    metrics.json           final test metrics with protocol information; metrics.md the same as a table
    images/                counterfactual grids
    wandb/ or csv/         the logger's files

``<paths.runs_dir>/<name>/latest`` points at the newest run that saved a checkpoint (``fast_dev_run`` smoke runs
excepted), so later experiments can refer to a checkpoint (``.../classifier_smiling_synth/latest/checkpoints/best.ckpt``).
``resume=latest`` or ``resume=<run dir>`` continues an interrupted run from its last checkpoint with its saved config.

What a failure leaves (``experiments.cli`` prints the message): a mistake found while building (config values,
dataset files, checkpoints) leaves nothing, because the run folder is written only once data, model and callbacks
are built; a run that fails before its first checkpoint is removed; one that fails later keeps its checkpoints
and gets ``error.log`` (the traceback). Checkpoints are written then renamed (``lightning_modules.checkpoints``),
and a run whose weights stop being finite stops before writing them (``callbacks.run_guards``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks.rng_state import RNGState
from callbacks.run_guards import CheckpointOnInterrupt, FiniteGuard
from configs.loader import ConfigError, check_config, instantiate
from experiments import cli
from experiments.cli import CONFIG_FILE, ERROR_LOG, EXIT_INTERRUPTED, resolve_resume
from experiments.loggers import finishing
from experiments.report import markdown_report, split_subjects, verdicts
from lightning_modules.checkpoints import AtomicCheckpointIO, check_fits, load_checkpoint, weight_shapes

__all__ = ["CONFIG_FILE", "EXIT_INTERRUPTED", "RunResult", "build", "main", "report_test", "resolve_resume", "run",
           "write_metrics"]


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM before finishing; resumable from last.ckpt


def _run_dir(cfg: DictConfig) -> Path:
    """``<runs_dir>/<name>/<run_id>`` of a new run (nothing is written yet)."""
    run_id = cfg.run_id or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.paths.runs_dir) / cfg.name / str(run_id)
    if any((run_dir / "checkpoints").glob("*.ckpt")):
        raise ConfigError(
            f"Run directory {run_dir} already holds checkpoints. Use resume={run_dir} to continue it, or choose "
            f"another run_id."
        )
    _check_latest_slot(run_dir)
    cfg.run_id = str(run_id)
    return run_dir


def _check_latest_slot(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        kind = "folder" if latest.is_dir() else "file"
        raise ConfigError(f"{latest} is a {kind}, not the link cfgen keeps there to the newest run; move it away "
                          f"(cfgen never deletes it).")


def _checkpoint_callbacks(cfg: DictConfig, run_dir: Path) -> list[ModelCheckpoint]:
    """``last.ckpt`` every ``every_n_epochs`` (what resuming needs) and ``best.ckpt`` by ``checkpoint.monitor``.

    Two callbacks, because Lightning's ``save_last`` only refreshes last.ckpt when the monitored metric improves.
    last.ckpt is written at the end of each training epoch (Lightning's choice when every epoch validates) also
    with ``trainer.check_val_every_n_epoch`` > 1, where Lightning would save it only in validated epochs: an
    interrupted run would lose the epochs since, and a run would end without the weights of its last epochs.
    """
    ck = cfg.checkpoint
    common = dict(dirpath=run_dir / "checkpoints", every_n_epochs=ck.every_n_epochs,
                  every_n_train_steps=ck.every_n_train_steps, enable_version_counter=False)
    last = ModelCheckpoint(filename="last", monitor=None, save_top_k=1, save_on_train_epoch_end=True, **common)
    if not ck.monitor:
        return [last]
    return [ModelCheckpoint(filename="best", monitor=ck.monitor, mode=ck.mode, save_top_k=1, **common), last]


def _point_latest(run_dir: Path) -> None:
    """Point ``<run_dir>/../latest`` at ``run_dir``: a new link renamed over the old one, which is replaced only
    if it is a link (``_check_latest_slot`` refused anything else before the run started)."""
    latest = run_dir.parent / "latest"
    if latest.is_symlink() and os.readlink(latest) == run_dir.name:
        return
    if latest.exists() and not latest.is_symlink():
        return
    fresh = run_dir.parent / f".latest-{os.getpid()}"
    fresh.unlink(missing_ok=True)
    fresh.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(fresh, latest)


def _finite(value: Any) -> float | None:
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return value if math.isfinite(value) else None


def write_metrics(run_dir: Path, cfg: DictConfig, metrics: dict[str, float], extra: dict[str, Any]) -> None:
    """metrics.json (every value, the reference counterfactuals' under ``test/reference/<name>/``, and the
    verdicts against them) and metrics.md (the model and the references side by side, ``experiments.report``)."""
    payload = {
        "experiment": cfg.name,
        "run_id": cfg.run_id,
        "seed": cfg.seed,
        "metrics": metrics,
        "verdicts": [v.as_dict() for v in verdicts(metrics)],
        **extra,
    }
    (run_dir / "metrics.json").write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    (run_dir / "metrics.md").write_text(markdown_report(metrics) + "\n")


def markdown_table(metrics: dict[str, float | None]) -> str:
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {k} | {'n/a' if v is None else f'{v:.4f}'} |" for k, v in sorted(metrics.items())]
    return "\n".join(rows)


SECTIONS = ("data", "model", "callbacks", "logger")


def check(cfg: DictConfig) -> None:
    """Every ``_target_`` of the config against its signature (names and value types), before anything is built."""
    for section in SECTIONS:
        check_config(cfg[section], section)
    check_config({"_target_": "pytorch_lightning.Trainer", **OmegaConf.to_container(cfg.trainer, resolve=True)},
                 "trainer")


def _write_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / CONFIG_FILE, resolve=True)
        (run_dir / ERROR_LOG).unlink(missing_ok=True)  # a previous failure's, resolved or not
        for stale in (run_dir / "checkpoints").glob(".*.partial"):  # left by a write that was killed
            stale.unlink()
    except OSError as err:
        raise ConfigError(f"Cannot write the run folder {run_dir} ({err.strerror or err}); choose a writable "
                          f"paths.runs_dir.") from None


def build(cfg: DictConfig, run_dir: Path, verify: Callable[[pl.LightningModule], None] | None = None,
          check_test_split: bool = True):
    """Data, model, callbacks, logger and trainer of a composed config, in the order that fails fastest on a
    user mistake: the config's types first, then the data (a missing dataset is the commonest mistake; the
    test split, first read after training, is read once now), the model, its callbacks and ``verify(model)``
    (e.g. that a checkpoint fits it); only then is the run directory with its config.yaml written, and the
    logger and trainer made."""
    check(cfg)
    datamodule = instantiate(cfg.data, "data")
    # Data that a builder writes (in prepare_data, inside fit) is generated here, not downloaded: not checked.
    if check_test_split and cfg.test.enabled and getattr(datamodule, "builder", None) is None:
        datamodule.check_split("test")
    model = instantiate(cfg.model, "model")
    callbacks = [instantiate(c, f"callbacks.{k}") for k, c in cfg.callbacks.items() if c is not None]
    if verify is not None:
        verify(model)
    _write_run_dir(run_dir, cfg)
    callbacks += [*_checkpoint_callbacks(cfg, run_dir), RNGState(), FiniteGuard(),
                  CheckpointOnInterrupt(run_dir / "checkpoints" / "last.ckpt")]
    logger = instantiate(
        cfg.logger,
        "logger",
        save_dir=str(run_dir),
        name=cfg.name,
        run_id=str(cfg.run_id),
        tags=list(cfg.tags),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    # Only a run that saved a checkpoint becomes `latest`: resume=latest and .../latest/checkpoints/... never
    # point at a failed run. Smoke runs save none.
    io = AtomicCheckpointIO(on_saved=lambda path: _point_latest(run_dir))
    trainer = instantiate(
        {"_target_": "pytorch_lightning.Trainer", **trainer_kwargs},
        "trainer",
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        plugins=[io],
    )
    return datamodule, model, trainer


def run(cfg: DictConfig, resume_dir: Path | None = None) -> RunResult:
    """Fit then test one composed experiment; returns where it went and its final metrics."""
    verify = None
    if resume_dir is None:
        run_dir = _run_dir(cfg)
        ckpt_path = None
    else:
        run_dir = resume_dir
        _check_latest_slot(run_dir)
        ckpt_path = str(run_dir / "checkpoints" / "last.ckpt")
        # Weights only: a last.ckpt that would run code is refused here, and one of another model before anything
        # is written.
        shapes = weight_shapes(load_checkpoint(ckpt_path))
        verify = lambda model: check_fits(model, shapes, ckpt_path, cfg.name)  # noqa: E731
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    created = [d for d in (run_dir.parent.parent, run_dir.parent, run_dir) if not d.exists()]

    try:
        with warnings.catch_warnings():
            if resume_dir is not None:
                # Lightning warns that the checkpoint and CSV folders are not empty: on a resume they are meant to
                # be (and the CSV history is kept, experiments.loggers.csv_logger).
                warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            datamodule, model, trainer = build(cfg, run_dir, verify)
            with finishing(trainer.loggers):
                result = _fit_and_test(cfg, run_dir, datamodule, model, trainer, ckpt_path, started)
    except BaseException as err:
        _after_failure(run_dir, created, err)
        raise
    if result.interrupted and not _has_checkpoint(run_dir) and run_dir in created:
        _remove(created)
    return result


def _has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("*.ckpt"))


def _remove(created: list[Path]) -> None:
    """Remove the folders this run created: the run folder (the last), then those above it that are empty."""
    if not created:
        return
    shutil.rmtree(created[-1], ignore_errors=True)
    for folder in reversed(created[:-1]):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _after_failure(run_dir: Path, created: list[Path], err: BaseException) -> None:
    """A failed run that saved no checkpoint leaves nothing (there is nothing to resume or evaluate); one that
    did keeps its folder, resumable, with the traceback in error.log."""
    if not run_dir.is_dir():
        return
    if not _has_checkpoint(run_dir):
        if run_dir in created:
            _remove(created)
        return
    with open(run_dir / ERROR_LOG, "w") as f:
        traceback.print_exception(type(err), err, err.__traceback__, file=f)


def _fit_and_test(cfg: DictConfig, run_dir: Path, datamodule, model, trainer: pl.Trainer, ckpt_path: str | None,
                  started: float) -> RunResult:
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        # Lightning shuts down gracefully on Ctrl-C and SIGTERM, then raises SystemExit(1); report it as an
        # interruption (exit code 130 and how to resume) rather than as an unexplained failure.
        if not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning left Ctrl-C ignored
    if trainer.interrupted:
        if _has_checkpoint(run_dir):
            print(f"Interrupted. Resume with: python -m experiments {cfg.name} resume={run_dir}", file=sys.stderr)
        else:
            print("Interrupted before the first training step; nothing was saved.", file=sys.stderr)
        return RunResult(run_dir, interrupted=True)

    # The files of this run folder, not the paths remembered in a restored ModelCheckpoint state: those are
    # absolute, and name another folder's files once a run folder has been moved or copied.
    saved = {c.filename for c in trainer.callbacks if isinstance(c, ModelCheckpoint)}
    best, last = (run_dir / "checkpoints" / f"{n}.ckpt" for n in ("best", "last"))
    result = RunResult(run_dir, best_checkpoint=str(best) if "best" in saved and best.is_file() else None,
                       last_checkpoint=str(last) if last.is_file() else None)
    if cfg.test.enabled:
        which = cfg.test.ckpt
        test_ckpt = result.best_checkpoint if which == "best" and result.best_checkpoint else result.last_checkpoint
        if trainer.fast_dev_run:
            test_ckpt = None  # fast_dev_run saves no checkpoint: test the weights in memory
        trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=True)
        result.metrics = report_test(trainer, datamodule, cfg, run_dir, {
            "checkpoint": test_ckpt,
            "test_checkpoint_rule": which,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "wall_time_s": round(time.time() - started, 1),
        })
    return result


def report_test(trainer: pl.Trainer, datamodule, cfg: DictConfig, run_dir: Path, extra: dict[str, Any]):
    """Collect the ``test/`` metrics after ``trainer.test``; write metrics.json/.md, log a table, print it."""
    metrics = {k: _finite(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if trainer.is_global_zero:
        write_metrics(run_dir, cfg, metrics, {**extra, "n_test_samples": _dataset_size(datamodule, "test")})
        model, references = split_subjects(metrics)
        names = sorted(references)
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table("test/summary", columns=["metric", "model", *names],
                                 data=[[k, v, *(references[n].get(k) for n in names)] for k, v in sorted(model.items())])
        print(f"\n{cfg.name} ({run_dir})\n{markdown_report(metrics)}")
    return metrics


def _dataset_size(datamodule, split: str) -> int | None:
    loader = getattr(datamodule, f"{split}_dataloader", None)
    try:
        return len(loader().dataset) if loader else None
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments NAME key=value ...``: see ``experiments.cli.train``."""
    return cli.train(argv)


if __name__ == "__main__":
    cli.main()
