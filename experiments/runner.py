"""The experiment runner: ``python -m experiments NAME key=value ...``.

compose the config -> seed everything -> build data, model, callbacks, logger, trainer -> fit -> test.

Each run lives in ``<paths.runs_dir>/<name>/<run_id>/``::

    config.yaml            the fully resolved config (also logged as hyperparameters)
    checkpoints/last.ckpt  the last epoch (resume from here), checkpoints/best.ckpt by ``checkpoint.monitor``
    metrics.json           final test metrics with protocol information; metrics.md the same as a table
    images/                counterfactual grids
    wandb/ or csv/         the logger's files

``<paths.runs_dir>/<name>/latest`` points at the newest run (``fast_dev_run`` smoke runs excepted), so later
experiments can refer to a checkpoint (``.../classifier_smiling_synth/latest/checkpoints/best.ckpt``). ``resume=latest`` or ``resume=<run dir>``
continues an interrupted run from its last checkpoint with its saved config.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks.rng_state import RNGState
from configs.loader import ConfigError, compose, instantiate, override_saved
from datamodules.base import DatasetError
from experiments.loggers import finishing
from experiments.report import markdown_report, split_subjects, verdicts

CONFIG_FILE = "config.yaml"


EXIT_INTERRUPTED = 130


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM before finishing; resumable from last.ckpt


def _run_dir(cfg: DictConfig) -> Path:
    run_id = cfg.run_id or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.paths.runs_dir) / cfg.name / str(run_id)
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(
            f"Run directory {run_dir} already holds checkpoints. Use resume={run_dir} to continue it, or choose "
            f"another run_id."
        )
    cfg.run_id = str(run_id)
    return run_dir


def resolve_resume(resume: str, name: str, runs_dir: str) -> Path:
    run_dir = Path(runs_dir) / name / "latest" if resume == "latest" else Path(resume)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"Cannot resume: {run_dir / CONFIG_FILE} does not exist (resume=latest or a run directory).")
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        raise ConfigError(f"Cannot resume: {run_dir}/checkpoints/last.ckpt does not exist; the run never finished "
                          f"an epoch. Start it again instead.")
    return run_dir.resolve()


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
    latest = run_dir.parent / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.name, target_is_directory=True)


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


def build(cfg: DictConfig, run_dir: Path):
    """Data, model, callbacks, logger and trainer of a composed config, in the order that fails fastest on a
    user mistake: the data first (a missing dataset is the commonest one), the trainer last. The run directory
    and its config.yaml are written once the data is known to exist."""
    datamodule = instantiate(cfg.data, "data")
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / CONFIG_FILE, resolve=True)
    model = instantiate(cfg.model, "model")
    callbacks = [instantiate(c, f"callbacks.{k}") for k, c in cfg.callbacks.items() if c is not None]
    callbacks += [*_checkpoint_callbacks(cfg, run_dir), RNGState()]
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
    trainer = instantiate(
        {"_target_": "pytorch_lightning.Trainer", **trainer_kwargs},
        "trainer",
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
    )
    return datamodule, model, trainer


def run(cfg: DictConfig, resume_dir: Path | None = None) -> RunResult:
    """Fit then test one composed experiment; returns where it went and its final metrics."""
    if resume_dir is None:
        run_dir = _run_dir(cfg)
        ckpt_path = None
    else:
        run_dir = resume_dir
        ckpt_path = str(run_dir / "checkpoints" / "last.ckpt")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()

    with warnings.catch_warnings():
        if resume_dir is not None:
            # Lightning warns that the checkpoint and CSV folders are not empty: on a resume they are meant to
            # be (and the CSV history is kept, experiments.loggers.csv_logger).
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        datamodule, model, trainer = build(cfg, run_dir)
        if not trainer.fast_dev_run:  # a smoke run saves no checkpoint: `latest` keeps pointing at a real one
            _point_latest(run_dir)
        with finishing(trainer.loggers):
            return _fit_and_test(cfg, run_dir, datamodule, model, trainer, ckpt_path, started)


def _fit_and_test(cfg: DictConfig, run_dir: Path, datamodule, model, trainer: pl.Trainer, ckpt_path: str | None,
                  started: float) -> RunResult:
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit:
        # Lightning shuts down gracefully on Ctrl-C and SIGTERM, then raises SystemExit(1); report it as an
        # interruption (exit code 130 and how to resume) rather than as an unexplained failure.
        if not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning left Ctrl-C ignored
    if trainer.interrupted:
        print(f"Interrupted. Resume with: python -m experiments {cfg.name} resume={run_dir}", file=sys.stderr)
        return RunResult(run_dir, interrupted=True)

    saved = {c.filename: c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)}
    best, last = saved.get("best"), saved["last"]
    result = RunResult(run_dir, best_checkpoint=(best.best_model_path or None) if best else None,
                       last_checkpoint=last.best_model_path or None)
    if cfg.test.enabled:
        which = cfg.test.ckpt
        test_ckpt = result.best_checkpoint if which == "best" and result.best_checkpoint else result.last_checkpoint
        if trainer.fast_dev_run:
            test_ckpt = None  # fast_dev_run saves no checkpoint: test the weights in memory
        trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=False)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        from configs.loader import available

        print("usage: python -m experiments NAME [key=value ...] [resume=latest|<run dir>]\n")
        print("experiments:\n  " + "\n  ".join(available("experiment")))
        return 0
    name, overrides = argv[0], argv[1:]
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    overrides = [o for o in overrides if not o.startswith("resume=")]
    try:
        if resume:
            runs_dir = compose(name, []).paths.runs_dir
            resume_dir = resolve_resume(resume, name, runs_dir)
            cfg = override_saved(OmegaConf.load(resume_dir / CONFIG_FILE), overrides)
            result = run(cfg, resume_dir)
        else:
            result = run(compose(name, overrides))
    except (ConfigError, DatasetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # 130, the shell's code for Ctrl-C: callers (sweeps, schedulers) must not take an interrupted run as finished.
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
