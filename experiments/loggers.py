"""Logger factories named by ``configs/logger/*.yaml``.

Every factory takes the run's ``save_dir`` (the run directory: nothing is written outside it), ``name``,
``run_id``, ``tags`` and the resolved ``config`` (logged as hyperparameters).
"""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

_said_offline = False
# Cache and staging folders the user chose before starting; others are pointed into each run's directory.
_USER_WANDB_DIRS = {v for v in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR") if v in os.environ}


@rank_zero_only
def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wandb_has_credentials() -> bool:
    """True when W&B can authenticate: an API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(mode: str = "auto") -> str:
    """'online', 'offline' or 'disabled'. 'auto' honours WANDB_MODE, else goes offline when no credentials exist,
    because wandb itself raises ``UsageError: No API key configured`` in that case."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    return "online" if wandb_has_credentials() else "offline"


def wandb_logger(
    save_dir: str,
    name: str,
    run_id: str,
    tags: list[str],
    config: dict[str, Any],
    project: str = "cfgen",
    entity: str | None = None,
    group: str | None = None,
    mode: str = "auto",
    log_model: bool = False,
) -> WandbLogger:
    global _said_offline
    resolved = wandb_mode(mode)
    if resolved == "offline" and not _said_offline:
        _said_offline = True
        _say(
            f"W&B: no credentials found (WANDB_API_KEY or `wandb login`), logging OFFLINE under {save_dir}/wandb. "
            f"Upload later with `wandb sync {save_dir}/wandb/offline-run-*`."
        )
    # wandb writes caches and staged artifacts under the user's home by default; keep them in the run directory.
    for var, sub in (("WANDB_CACHE_DIR", ".wandb-cache"), ("WANDB_DATA_DIR", ".wandb-data")):
        if var not in _USER_WANDB_DIRS:
            os.environ[var] = str(Path(save_dir) / sub)
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(
        name=f"{name}/{run_id}",
        id=run_id.replace("/", "-"),
        save_dir=save_dir,
        project=project,
        entity=entity,
        group=group or name,
        tags=list(tags),
        mode=resolved,
        resume="allow",
        log_model=log_model,
    )
    logger.log_hyperparams(config)
    return logger


@contextmanager
def finishing(loggers: list[Any]) -> Iterator[None]:
    """Close a run's loggers when the block ends, as "failed" if it raised. Lightning leaves a W&B run open after
    ``fit``/``test``; the next run in the same process (the quick start, an offline sweep) would then log into
    it, so each run finishes its own."""
    status = "failed"
    try:
        yield
        status = "success"
    finally:
        for logger in loggers:
            logger.finalize(status)
            if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
                logger.experiment.finish(exit_code=0 if status == "success" else 1)


def csv_logger(save_dir: str, name: str, run_id: str, tags: list[str], config: dict[str, Any]) -> CSVLogger:
    """``<run dir>/csv/metrics.csv``. A resumed run appends to it: Lightning's writer deletes an existing file on
    creation, so its rows are put back and their columns kept (rows logged after the last checkpoint of the
    interrupted run stay, and the resumed run logs those steps again)."""
    logger = CSVLogger(save_dir=save_dir, name="csv", version="")
    metrics_file = Path(logger.log_dir) / "metrics.csv"
    kept = metrics_file.read_text() if rank_zero_only.rank == 0 and metrics_file.is_file() else ""
    logger.log_hyperparams(config)  # creates the writer
    if kept.strip():
        metrics_file.write_text(kept)
        logger.experiment.metrics_keys = kept.splitlines()[0].split(",")
    return logger


def no_logger(save_dir: str, name: str, run_id: str, tags: list[str], config: dict[str, Any]) -> bool:
    return False
