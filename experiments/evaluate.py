"""Evaluate a checkpoint on the test split: ``python -m experiments.evaluate NAME CKPT [key=value ...]``.

Composes experiment NAME (with overrides), loads the weights of CKPT, runs the experiment's metric callbacks on
the whole test split and writes ``metrics.json``, ``metrics.md`` and the image grids into a new run directory
``<runs_dir>/<NAME>/eval-<time>/``; the same numbers go to the configured logger.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytorch_lightning as pl

from configs.loader import ConfigError, compose
from datamodules.base import DatasetError
from experiments.loggers import finishing
from experiments.runner import _run_dir, build, report_test


def evaluate(name: str, ckpt: str, overrides: list[str]) -> dict[str, float | None]:
    if not Path(ckpt).is_file():
        raise ConfigError(f"Checkpoint {ckpt} does not exist (CKPT=runs/<exp>/<run>/checkpoints/last.ckpt).")
    cfg = compose(name, overrides)
    if cfg.run_id is None:
        cfg.run_id = "eval-" + time.strftime("%Y%m%d-%H%M%S")
    run_dir = _run_dir(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model, trainer = build(cfg, run_dir)
    with finishing(trainer.loggers):
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=False)
        return report_test(trainer, datamodule, cfg, run_dir, {"checkpoint": str(Path(ckpt).resolve())})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print("usage: python -m experiments.evaluate NAME CKPT [key=value ...]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        evaluate(argv[0], argv[1], argv[2:])
    except (ConfigError, DatasetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
