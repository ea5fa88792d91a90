"""Sweeps from a W&B sweep spec: ``python -m experiments.sweep configs/sweep/<name>.yaml [key=value ...]``.

The spec is W&B's own format (``method: grid|random``, ``parameters`` named by config path, ``command`` calling
``python -m experiments <experiment> ${args_no_hyphens}``), so the same file works in both modes:

* **online** (W&B credentials and not WANDB_MODE=offline): ``wandb sweep`` creates the sweep on the server and
  ``wandb agent`` runs it; the agent calls the runner with ``key=value`` arguments, i.e. an OmegaConf dotlist.
* **offline**: the spec is expanded here (grid: every combination; random: ``run_cap`` seeded draws) and the runs
  are executed one after another as ordinary runs. ``runs/sweeps/<name>/ledger.jsonl`` records each finished run,
  so an interrupted sweep started again skips them, and resumes a half-finished run from its last checkpoint.

Extra ``key=value`` arguments are appended to every run (e.g. a smaller ``trainer.max_epochs`` for a smoke test).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from configs.loader import ConfigError, compose
from experiments import cli
from experiments.cli import EXIT_INTERRUPTED

RunFn = Callable[[list[str]], int]


class SweepInterrupted(Exception):
    """A run stopped on Ctrl-C: the sweep stops too, leaving that run resumable and out of the ledger."""


PARAMETER_FORMS = "'values: [a, b, ...]', 'value: a' or 'min: lo, max: hi' (with an optional 'distribution')"


def load_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Sweep spec {path} does not exist. Specs live in configs/sweep/.")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where} is not valid YAML ({getattr(err, 'problem', None) or err}); a sweep "
                          f"spec is W&B's YAML format, see configs/sweep/ifcvae_grid.yaml.") from None
    if not isinstance(spec, dict) or "parameters" not in spec:
        raise ConfigError(f"{path}: a sweep spec needs 'method', 'parameters' and 'command' (W&B's format).")
    if spec.get("method", "grid") not in ("grid", "random"):
        raise ConfigError(f"{path}: method must be grid or random offline (bayes needs the W&B server).")
    params = spec["parameters"]
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: 'parameters' must map config paths to {PARAMETER_FORMS}.")
    for name, p in params.items():
        _check_parameter(path, str(name), p)
    if spec.get("method", "grid") == "random" and not (isinstance(spec.get("run_cap"), int) and spec["run_cap"] > 0):
        raise ConfigError(f"{path}: a random sweep needs 'run_cap', a positive whole number of runs.")
    if not isinstance(spec.get("command"), list):
        raise ConfigError(f"{path}: 'command' must be a list calling `-m experiments <experiment> "
                          f"${{args_no_hyphens}}`.")
    experiment_of(spec, path)
    return spec


def _check_parameter(path: Path, name: str, p: Any) -> None:
    ok = isinstance(p, dict) and (
        "value" in p
        or ("values" in p and isinstance(p["values"], list) and len(p["values"]) > 0)
        or ("min" in p and "max" in p and all(isinstance(p[k], int | float) and not isinstance(p[k], bool)
                                              for k in ("min", "max")))
    )
    if not ok:
        raise ConfigError(f"{path}: parameter '{name}' = {p!r} is not a parameter spec; give {PARAMETER_FORMS}.")


def experiment_of(spec: dict[str, Any], path: Path | str = "spec") -> str:
    """The experiment name in ``command: [..., -m, experiments, NAME, ${args_no_hyphens}]``."""
    command = [str(c) for c in spec.get("command", [])]
    try:
        i = command.index("experiments")
        return command[i + 1]
    except (ValueError, IndexError):
        raise ConfigError(f"{path}: 'command' must call `-m experiments <experiment> ${{args_no_hyphens}}`.") from None


def _sample(name: str, p: dict[str, Any], rng: random.Random) -> Any:
    if "value" in p:
        return p["value"]
    if "values" in p:
        return rng.choice(p["values"])
    dist = p.get("distribution", "uniform")
    lo, hi = p["min"], p["max"]
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    raise ConfigError(f"parameter '{name}': distribution '{dist}' is not supported offline.")


def expand(spec: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """The list of parameter assignments the sweep runs, in a fixed order."""
    params: dict[str, dict[str, Any]] = spec["parameters"]
    if spec.get("method", "grid") == "grid":
        for name, p in params.items():
            if "value" not in p and "values" not in p:
                raise ConfigError(f"grid sweep: parameter '{name}' needs 'values' or 'value'.")
        names = list(params)
        choices = [params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]
    if "run_cap" not in spec:
        raise ConfigError("random sweep: set 'run_cap' (the number of runs).")
    rng = random.Random(seed)
    return [{n: _sample(n, p, rng) for n, p in params.items()} for _ in range(int(spec["run_cap"]))]


def _key(assignment: dict[str, Any], extra: Sequence[str]) -> str:
    blob = json.dumps({"params": assignment, "extra": list(extra)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _read_ledger(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            done[entry["key"]] = entry
    return done


def _subprocess_run(argv: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "experiments", *argv])


def run_offline(spec_path: str | Path, extra: Sequence[str] = (), run_fn: RunFn = _subprocess_run) -> list[dict]:
    """Run every assignment not yet in the ledger; returns the ledger entries of this sweep in order."""
    spec = load_spec(spec_path)
    name = Path(spec_path).stem
    experiment = experiment_of(spec, spec_path)
    assignments = expand(spec, seed=int(spec.get("seed", 0)))
    # Compose every run before starting any: a misspelt parameter path or a value of the wrong type fails here,
    # naming the key.
    from experiments.runner import check

    configs = [compose(experiment, [*extra, *(f"{k}={json.dumps(v)}" for k, v in a.items())]) for a in assignments]
    for config in configs:
        check(config)
    cfg = configs[0]
    sweep_dir = Path(cfg.paths.runs_dir) / "sweeps" / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ledger_path = sweep_dir / "ledger.jsonl"
    ledger = _read_ledger(ledger_path)
    entries = []
    for i, assignment in enumerate(assignments):
        key = _key(assignment, extra)
        if key in ledger and ledger[key]["status"] == "done":
            print(f"[sweep {name}] {i + 1}/{len(assignments)} already done: {assignment}")
            entries.append(ledger[key])
            continue
        run_id = f"sweep-{name}-{key}"
        run_dir = Path(cfg.paths.runs_dir) / experiment / run_id
        args = [f"{k}={json.dumps(v)}" for k, v in assignment.items()] + list(extra)
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            argv = [experiment, f"resume={run_dir}"]
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            argv = [experiment, *args, f"run_id={run_id}"]
        print(f"[sweep {name}] {i + 1}/{len(assignments)}: {' '.join(argv)}")
        code = run_fn(argv)
        if code == EXIT_INTERRUPTED:
            print(f"[sweep {name}] interrupted during run {i + 1}; run the same command again to resume it.")
            raise SweepInterrupted
        entry = {"key": key, "params": assignment, "extra": list(extra), "run_dir": str(run_dir),
                 "status": "done" if code == 0 else "failed", "exit_code": code}
        metrics_file = run_dir / "metrics.json"
        if metrics_file.is_file():
            entry["metrics"] = json.loads(metrics_file.read_text()).get("metrics", {})
        with ledger_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        entries.append(entry)
    return entries


def sweep_home(spec: dict[str, Any]) -> tuple[str | None, str]:
    """(entity, project) of an online sweep: the spec's ``entity``/``project``, else W&B's environment variables
    (``WANDB_ENTITY``, ``WANDB_PROJECT``), else the account's default entity and the project ``cfgen``."""
    project = spec.get("project") or os.environ.get("WANDB_PROJECT") or "cfgen"
    entity = spec.get("entity") or os.environ.get("WANDB_ENTITY")
    if entity is None:
        import wandb

        entity = wandb.Api().default_entity
    return entity, project


def run_online(spec_path: str | Path, extra: Sequence[str] = ()) -> int:
    """Create the sweep on the W&B server and run one ``wandb agent`` on it.

    The agent is given the sweep's full path ``entity/project/id``: with a bare id it looks the sweep up in the
    entity and project of its environment, which a user who set them only in the spec does not have, and stops
    with "sweep not found".
    """
    import wandb

    spec = load_spec(spec_path)
    if extra:
        spec["command"] = [*spec["command"], *extra]
    entity, project = sweep_home(spec)
    sweep_id = wandb.sweep(spec, entity=entity, project=project)
    path = f"{entity}/{project}/{sweep_id}" if entity else f"{project}/{sweep_id}"
    print(f"[sweep] created {path}; more agents: wandb agent {path}")
    return subprocess.call(["wandb", "agent", path])


def main(argv: list[str] | None = None) -> int:
    argv, debug = cli.split_debug(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    spec_path, extra = argv[0], argv[1:]
    try:
        from experiments.loggers import wandb_mode

        if wandb_mode("auto") == "online":
            return run_online(spec_path, extra)
        print("W&B sweep server not available (no credentials or WANDB_MODE=offline): running the sweep locally.")
        entries = run_offline(spec_path, extra)
    except (SweepInterrupted, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        return cli.report(err)
    failed = [e for e in entries if e["status"] != "done"]
    print(f"[sweep] {len(entries) - len(failed)}/{len(entries)} runs done" + (f", {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
