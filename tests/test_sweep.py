"""experiments/sweep.py: W&B spec expansion and the offline ledger that lets a sweep resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from configs.loader import ConfigError
from experiments.sweep import SweepInterrupted, expand, load_spec, run_offline

SPEC = Path(__file__).resolve().parents[1] / "configs" / "sweep" / "ifcvae_grid.yaml"


def test_shipped_grid_expands_to_the_cartesian_product():
    spec = load_spec(SPEC)
    runs = expand(spec)
    assert runs == [
        {"model.alpha": 0.005, "model.delta": 0.005},
        {"model.alpha": 0.005, "model.delta": 0.1},
        {"model.alpha": 0.2, "model.delta": 0.005},
        {"model.alpha": 0.2, "model.delta": 0.1},
    ]


def test_random_sweep_is_seeded_and_capped():
    spec = {"method": "random", "run_cap": 5, "parameters": {
        "model.alpha": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1.0},
        "model._width": {"values": [16, 32]}, "seed": {"value": 3}}}
    a, b, c = expand(spec, seed=0), expand(spec, seed=0), expand(spec, seed=1)
    assert a == b and a != c and len(a) == 5
    assert all(1e-3 <= r["model.alpha"] <= 1.0 and r["model._width"] in (16, 32) and r["seed"] == 3 for r in a)


def _spec(tmp_path: Path, params: dict) -> Path:
    spec = {"method": "grid", "parameters": params,
            "command": ["${env}", "${interpreter}", "-m", "experiments", "ifcvae_smiling_synth", "${args_no_hyphens}"]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class FakeRunner:
    """Stands in for `python -m experiments`: records calls, writes metrics.json, can die on a given call."""

    def __init__(self, runs_dir: Path, die_on: int | None = None):
        self.runs_dir, self.die_on, self.calls = runs_dir, die_on, []

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        if self.die_on is not None and len(self.calls) == self.die_on:
            raise KeyboardInterrupt
        run_id = next(a.split("=", 1)[1] for a in argv if a.startswith("run_id="))
        run_dir = self.runs_dir / argv[0] / run_id
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps({"metrics": {"test/mse": 0.1 * len(self.calls)}}))
        return 0


def test_interrupted_sweep_skips_finished_runs(tmp_path):
    spec = _spec(tmp_path, {"model.alpha": {"values": [0.1, 0.2]}, "model.delta": {"values": [0.01, 0.02]}})
    extra = [f"paths.runs_dir={tmp_path}/runs", f"paths.data_dir={tmp_path}/data"]
    first = FakeRunner(tmp_path / "runs", die_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_offline(spec, extra, run_fn=first)
    ledger = (tmp_path / "runs" / "sweeps" / "tiny" / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 2

    second = FakeRunner(tmp_path / "runs")
    entries = run_offline(spec, extra, run_fn=second)
    assert len(second.calls) == 2  # only the two runs that had not finished
    assert [c[1:3] for c in second.calls] == [["model.alpha=0.2", "model.delta=0.01"],
                                              ["model.alpha=0.2", "model.delta=0.02"]]
    assert [e["status"] for e in entries] == ["done"] * 4
    assert entries[0]["metrics"] == {"test/mse": 0.1}

    third = FakeRunner(tmp_path / "runs")
    run_offline(spec, extra, run_fn=third)
    assert third.calls == []


def test_run_stopped_by_ctrl_c_stops_the_sweep_and_stays_out_of_the_ledger(tmp_path, capsys):
    spec = _spec(tmp_path, {"model.alpha": {"values": [0.1, 0.2, 0.3]}})
    extra = [f"paths.runs_dir={tmp_path}/runs"]
    calls = []

    def runner(argv):  # the second run exits as `python -m experiments` does after Ctrl-C
        calls.append(argv)
        return 0 if len(calls) == 1 else 130

    with pytest.raises(SweepInterrupted):
        run_offline(spec, extra, run_fn=runner)
    assert len(calls) == 2  # the third run never started
    ledger = (tmp_path / "runs" / "sweeps" / "tiny" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["params"] for line in ledger] == [{"model.alpha": 0.1}]
    assert "run the same command again" in capsys.readouterr().out


def test_half_finished_run_is_resumed_from_its_checkpoint(tmp_path):
    spec = _spec(tmp_path, {"model.alpha": {"values": [0.1]}})
    extra = [f"paths.runs_dir={tmp_path}/runs"]
    calls = []
    run_offline(spec, extra, run_fn=lambda argv: calls.append(argv) or 1)  # the run fails mid-way
    run_dir = Path(next(a.split("=", 1)[1] for a in calls[0] if a.startswith("run_id=")))
    ckpt_dir = tmp_path / "runs" / "ifcvae_smiling_synth" / run_dir.name / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "last.ckpt").write_bytes(b"")
    run_offline(spec, extra, run_fn=lambda argv: calls.append(argv) or 0)
    assert calls[1] == ["ifcvae_smiling_synth", f"resume={ckpt_dir.parent}"]


def test_misspelt_parameter_path_fails_before_any_run(tmp_path):
    spec = _spec(tmp_path, {"model.alpah": {"values": [0.1]}})
    calls = []
    with pytest.raises(ConfigError, match="Did you mean 'model.alpha'"):
        run_offline(spec, [f"paths.runs_dir={tmp_path}/runs"], run_fn=calls.append)
    assert calls == []


def test_bayes_is_refused_offline(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"method": "bayes", "parameters": {}, "command": ["-m", "experiments", "x"]}))
    with pytest.raises(ConfigError, match="bayes needs the W&B server"):
        load_spec(path)


def _stand_in_wandb(tmp_path: Path, monkeypatch) -> Path:
    """A `wandb` executable first on PATH that records its arguments, and a wandb.sweep that records its call."""
    record = tmp_path / "wandb_calls.txt"
    script = tmp_path / "bin" / "wandb"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    import wandb

    created = []
    monkeypatch.setattr(wandb, "sweep", lambda spec, entity=None, project=None: created.append(
        (spec["command"], entity, project)) or "abc123")
    return record, created


def test_online_agent_gets_the_sweeps_full_path(tmp_path, monkeypatch):
    from experiments.sweep import run_online

    record, created = _stand_in_wandb(tmp_path, monkeypatch)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    spec = yaml.safe_load(SPEC.read_text())
    spec["entity"] = "my-team"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_online(path, ["trainer.max_epochs=1"]) == 0
    assert record.read_text().split() == ["agent", "my-team/cfgen/abc123"]
    command, entity, project = created[0]
    assert (entity, project) == ("my-team", "cfgen") and command[-1] == "trainer.max_epochs=1"


def test_online_sweep_falls_back_to_the_environment_then_the_account(tmp_path, monkeypatch):
    from experiments.sweep import run_online

    record, _ = _stand_in_wandb(tmp_path, monkeypatch)
    spec = {k: v for k, v in yaml.safe_load(SPEC.read_text()).items() if k != "project"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("WANDB_ENTITY", "env-entity")
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    assert run_online(path) == 0
    monkeypatch.delenv("WANDB_ENTITY")
    import wandb

    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {"default_entity": "me"})())
    assert run_online(path) == 0
    assert record.read_text().splitlines() == ["agent env-entity/env-project/abc123", "agent me/env-project/abc123"]
