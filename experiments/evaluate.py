"""Evaluate a checkpoint on the test split: ``python -m experiments.evaluate NAME CKPT [--seeds N] [key=value ...]``.

Composes experiment NAME (with overrides), loads the weights of CKPT, runs the experiment's metric callbacks on
the whole test split and writes ``metrics.json``, ``metrics.md``, ``per_sample.csv`` and the image grids into a
new run directory ``<runs_dir>/<NAME>/eval-<time>/``; the same numbers go to the configured logger.

With ``--seeds N`` (``make eval SEEDS=N``) the evaluation runs N times with ``eval_seed`` = seed, seed + 1, ...
(the interventions drawn and the model's noise change; the data and the weights do not), each into
``eval-<time>-s<eval_seed>/``, and ``eval-<time>/metrics.json`` holds every metric's mean, its standard
deviation over the seeds (ddof = 1) and the per-seed values.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from configs.loader import ConfigError, compose
from experiments import cli


def evaluate(name: str, ckpt: str, overrides: list[str]) -> dict[str, float | None]:
    if not Path(ckpt).is_file():
        raise ConfigError(f"Checkpoint {ckpt} does not exist (CKPT=runs/<exp>/<run>/checkpoints/last.ckpt).")
    cfg = compose(name, overrides)
    if cfg.run_id is None:
        cfg.run_id = "eval-" + time.strftime("%Y%m%d-%H%M%S")
    # torch and Lightning only once the config is sound (experiments.cli)
    import pytorch_lightning as pl

    from experiments.loggers import finishing
    from experiments.runner import _remove, _run_dir, build, report_test
    from lightning_modules.checkpoints import check_fits, load_checkpoint, weight_shapes

    # Weights only: a checkpoint that would run code is refused here, before anything is built or written; and it
    # must hold this experiment's weights (a checkpoint of another one is named, not a page of missing keys).
    shapes = weight_shapes(load_checkpoint(ckpt))
    run_dir = _run_dir(cfg)
    created = [d for d in (run_dir.parent.parent, run_dir.parent, run_dir) if not d.exists()]
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        datamodule, model, trainer = build(cfg, run_dir, verify=lambda model: check_fits(model, shapes, ckpt, name),
                                           check_test_split=False)  # the test split is all it reads
        with finishing(trainer.loggers):
            trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
            return report_test(trainer, datamodule, cfg, run_dir, {"checkpoint": str(Path(ckpt).resolve())})
    except BaseException:
        _remove(created)  # a failed evaluation leaves no half-written folder
        raise


def evaluate_seeds(name: str, ckpt: str, overrides: list[str], seeds: int) -> dict[str, dict[str, float | None]]:
    """``evaluate`` with ``eval_seed`` = base, base + 1, ...; writes the aggregate; returns {key: {mean, std}}."""
    if seeds < 1:
        raise ConfigError(f"SEEDS must be >= 1, got {seeds}")
    if seeds == 1:
        return {k: {"mean": v, "std": None} for k, v in evaluate(name, ckpt, overrides).items()}
    cfg = compose(name, overrides)
    run_id = cfg.run_id or "eval-" + time.strftime("%Y%m%d-%H%M%S")
    base = int(cfg.eval_seed)
    per_seed: dict[str, list[float | None]] = {}
    for k in range(seeds):
        metrics = evaluate(name, ckpt, [*overrides, f"eval_seed={base + k}", f"run_id={run_id}-s{base + k}"])
        for key in metrics.keys() | per_seed.keys():
            per_seed.setdefault(key, [None] * k).append(metrics.get(key))
    summary = {key: _mean_std(values) for key, values in per_seed.items()}
    run_dir = Path(cfg.paths.runs_dir) / name / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"experiment": name, "run_id": run_id, "checkpoint": str(Path(ckpt).resolve()),
               "eval_seeds": [base + k for k in range(seeds)], "std_ddof": 1,
               "metrics": {k: v["mean"] for k, v in summary.items()}, "std": {k: v["std"] for k, v in summary.items()},
               "per_seed": per_seed}
    (run_dir / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    rows = ["| metric | mean | std |", "|---|---|---|"] + [
        f"| {k} | {_fmt(v['mean'])} | {_fmt(v['std'])} |" for k, v in sorted(summary.items())]
    (run_dir / "metrics.md").write_text("\n".join(rows) + "\n")
    print(f"\n{name}: {seeds} evaluation seeds ({run_dir})\n" + "\n".join(rows))
    return summary


def _mean_std(values: list[float | None]) -> dict[str, float | None]:
    finite = [v for v in values if v is not None]
    if not finite:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else None}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    argv, debug = cli.split_debug(list(sys.argv[1:] if argv is None else argv))
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(f"usage: python -m experiments.evaluate NAME CKPT [--seeds N] [key=value ...] [{cli.DEBUG_FLAG}]")
        return cli.EXIT_OK if argv and argv[0] in ("-h", "--help") else cli.EXIT_USAGE
    seeds = 1
    rest = argv[2:]
    if "--seeds" in rest:
        i = rest.index("--seeds")
        try:
            seeds = int(rest[i + 1])
        except (IndexError, ValueError):
            print("error: --seeds needs a whole number, e.g. --seeds 3", file=sys.stderr)
            return cli.EXIT_USAGE
        rest = rest[:i] + rest[i + 2:]
    try:
        evaluate_seeds(argv[0], argv[1], rest, seeds)
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        return cli.report(err)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
