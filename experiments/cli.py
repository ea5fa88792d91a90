"""The command-line front ends, and what they say when something goes wrong.

``python -m experiments NAME key=value ...`` (``train``), ``python -m experiments.evaluate`` and
``python -m experiments.sweep`` end every failure with one line on stderr, ``error: <what went wrong> <the fix>``,
and an exit code:

* 0: finished;
* 1: the run failed after it started (training diverged, a checkpoint could not be written, an unexpected
  error); a run that saved a checkpoint keeps it, with the traceback in its ``error.log``;
* 2: a mistake found before any training (command line, config, dataset files, a checkpoint given);
* 130: interrupted (Ctrl-C, SIGTERM); the message says how to resume.

``--debug`` anywhere on the command line lets the exception through, traceback and all.

This module imports the config loader and nothing heavier: the config is composed and checked first, and torch
and Lightning (seconds to import) only once it is sound, so a misspelt key is reported at once.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from configs.loader import ConfigError, compose, override_saved

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CONFIG_FILE = "config.yaml"
ERROR_LOG = "error.log"
DEBUG_FLAG = "--debug"

_WORKER_WRAPPER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.")


def _imported(module: str, name: str) -> tuple[type, ...]:
    # An exception class of a module that was never imported cannot have been raised; looking it up this way
    # keeps torch out of a process that only composed a config.
    found = getattr(sys.modules.get(module), name, None)
    return (found,) if isinstance(found, type) else ()


def user_error_types() -> tuple[type, ...]:
    """Mistakes in what the user gave (exit code 2): config, dataset files, checkpoints, missing files."""
    return (ConfigError, FileNotFoundError, *_imported("datamodules.base", "DatasetError"),
            *_imported("lightning_modules.checkpoints", "CheckpointError"))


def fault_types() -> tuple[type, ...]:
    """Faults of a started run that carry their own explanation (exit code 1)."""
    return (*_imported("callbacks.run_guards", "TrainingDiverged"),
            *_imported("lightning_modules.checkpoints", "CheckpointWriteError"))


def one_line(err: BaseException) -> str:
    """The message of ``err`` as one line."""
    text = str(err)
    if _WORKER_WRAPPER.match(text):
        # torch re-raises a DataLoader worker's exception with the worker's traceback as the message; its last
        # line is the original "<module>.<Type>: <message>".
        last = text.rstrip().splitlines()[-1]
        marker = f"{type(err).__name__}: "
        text = last[last.index(marker) + len(marker):] if marker in last else last
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def report(err: BaseException, run_dir: Path | None = None) -> int:
    """Print the one-line message for ``err`` and return the exit code."""
    if isinstance(err, KeyboardInterrupt):
        print("Interrupted before training started.", file=sys.stderr)
        return EXIT_INTERRUPTED
    user, fault = isinstance(err, user_error_types()), isinstance(err, fault_types())
    message = one_line(err) if user or fault else f"{type(err).__name__}: {one_line(err)}"
    if not message.endswith((".", "?", "!")):
        message += "."
    if not user:
        last = run_dir / "checkpoints" / "last.ckpt" if run_dir is not None else None
        if last is not None and last.is_file():
            message += f" The run's last good checkpoint is {last}: resume={run_dir}."
        log = run_dir / ERROR_LOG if run_dir is not None else None
        if log is not None and log.is_file():
            message += f" The traceback is in {log}."
        else:
            message += f" Run again with {DEBUG_FLAG} for the traceback."
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE if user else EXIT_FAILED


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv


def resolve_resume(resume: str, name: str, runs_dir: str) -> Path:
    """The run folder that ``resume=latest`` or ``resume=<run dir>`` names; it must hold a config and a last.ckpt."""
    run_dir = Path(runs_dir) / name / "latest" if resume == "latest" else Path(resume)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"Cannot resume: {run_dir / CONFIG_FILE} does not exist (resume=latest or a run directory).")
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        raise ConfigError(f"Cannot resume: {run_dir}/checkpoints/last.ckpt does not exist; the run never finished "
                          f"an epoch. Start it again instead.")
    return run_dir.resolve()


# What a saved config may build. A run folder can come from anyone, and its config.yaml names the callables that
# resume= calls (`_target_`): one naming `os.system` would run a command. Within these packages, nothing runs
# code named by its arguments.
TRUSTED_TARGETS = ("lightning_modules.", "datamodules.", "callbacks.", "experiments.", "configs.", "tests.helpers.",
                   "torch.nn.", "torch.optim.", "pytorch_lightning.", "torchmetrics.", "normflows.")


def _targets(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [str(node["_target_"])] if "_target_" in node else []
        return own + [t for k, v in node.items() if k != "_target_" for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def check_saved_targets(cfg: Any, path: Path) -> None:
    """Refuse a saved config that would build something outside the packages cfgen builds from."""
    from omegaconf import OmegaConf

    foreign = [t for t in _targets(OmegaConf.to_container(cfg, resolve=False)) if not t.startswith(TRUSTED_TARGETS)]
    if foreign:
        raise ConfigError(f"Cannot resume: {path} names _target_ '{foreign[0]}', outside the packages cfgen builds "
                          f"from, and resuming would call it. Nothing was run. Start the run again, or edit that "
                          f"config if you trust where it came from.")


def load_saved_config(run_dir: Path, name: str, overrides: list[str]):
    """A run folder's saved config with ``overrides``; it must be a config of experiment ``name`` that builds only
    from cfgen's packages."""
    from omegaconf import DictConfig, OmegaConf

    try:
        cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    except Exception as err:
        raise ConfigError(f"Cannot resume: {run_dir / CONFIG_FILE} is not a readable config ({one_line(err)}).") from None
    if not isinstance(cfg, DictConfig) or cfg.get("name") != name:
        saved = cfg.get("name") if isinstance(cfg, DictConfig) else None
        raise ConfigError(f"Cannot resume: {run_dir} is a run of experiment {saved!r}, not {name!r}. Use "
                          f"python -m experiments {saved} resume={run_dir}, or another run folder.")
    check_saved_targets(cfg, run_dir / CONFIG_FILE)
    return override_saved(cfg, overrides)


def _run_folder(cfg: Any, resume_dir: Path | None) -> Path | None:
    if resume_dir is not None:
        return resume_dir
    if cfg is None or cfg.get("run_id") is None:
        return None
    folder = Path(cfg.paths.runs_dir) / str(cfg.name) / str(cfg.run_id)
    return folder if folder.is_dir() else None


def train(argv: list[str] | None = None) -> int:
    """``python -m experiments NAME [key=value ...] [resume=latest|<run dir>] [--debug]``."""
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        from configs.loader import available

        print("usage: python -m experiments NAME [key=value ...] [resume=latest|<run dir>] [--debug]\n")
        print("experiments:\n  " + "\n  ".join(available("experiment")))
        return EXIT_OK
    name, overrides = argv[0], argv[1:]
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    overrides = [o for o in overrides if not o.startswith("resume=")]
    cfg, resume_dir = None, None
    try:
        if resume:
            # paths.* given with resume= say where the runs are (resume=latest paths.runs_dir=/scratch/runs)
            runs_dir = compose(name, [o for o in overrides if o.startswith("paths.")]).paths.runs_dir
            resume_dir = resolve_resume(resume, name, runs_dir)
            cfg = load_saved_config(resume_dir, name, overrides)
        else:
            cfg = compose(name, overrides)
        from experiments.runner import run  # torch and Lightning: only once the config is known to be sound

        result = run(cfg, resume_dir)
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        return report(err, _run_folder(cfg, resume_dir))
    # 130, the shell's code for Ctrl-C: callers (sweeps, schedulers) must not take an interrupted run as finished.
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(train())
