"""End to end through the runner: every experiment survives fast_dev_run; runs write their directory;
resuming continues identically; W&B falls back to offline; a missing CelebA fails at once."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.loader import ConfigError, available, compose
from experiments.evaluate import main as evaluate_main
from experiments.runner import main, resolve_resume, run
from tests.helpers.celeba_layout import write_tiny_celeba
from tests.helpers.runs import ensure_upstream_runs, tiny_overrides


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def celeba_root(workspace) -> Path:
    return write_tiny_celeba(workspace / "celeba", n_train=16, n_val=8, n_test=8)


@pytest.fixture(scope="module")
def oracle_run(workspace):
    """A real (one-epoch) run of the synthetic Smiling classifier: the oracle of the editing experiments."""
    name = "classifier_smiling_synth"
    return run(compose(name, [*tiny_overrides(name, workspace), "trainer.max_epochs=1", "run_id=oracle"]))


def test_a_full_run_writes_its_directory(oracle_run, workspace):
    run_dir = oracle_run.run_dir
    assert run_dir == workspace / "runs" / "classifier_smiling_synth" / "oracle"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()
    payload = json.loads((run_dir / "metrics.json").read_text())
    assert payload["experiment"] == "classifier_smiling_synth" and payload["seed"] == 0
    assert payload["n_test_samples"] == 16
    assert 0.0 <= payload["metrics"]["test/acc/Smiling"] <= 1.0
    assert "| test/acc/Smiling |" in (run_dir / "metrics.md").read_text()


@pytest.mark.parametrize("name", available("experiment"))
def test_every_experiment_survives_fast_dev_run(name, workspace, celeba_root, oracle_run):
    args = tiny_overrides(name, workspace, celeba_root, oracle_run.best_checkpoint)
    ensure_upstream_runs(name, workspace, celeba_root, oracle_run.best_checkpoint)
    result = run(compose(name, [*args, "trainer.fast_dev_run=true", f"run_id=fdr-{name}"]))
    assert result.metrics, "the test stage ran and logged metrics"
    latest = workspace / "runs" / name / "latest"
    assert not latest.exists() or latest.resolve() != result.run_dir.resolve(), "a smoke run must not become latest"
    if compose(name).choices.model == "ifcvae":
        assert {"test/mse", "test/edit/Smiling/C_pos_all", "test/edit/Smiling/C_neg_all"} <= set(result.metrics)


def test_editing_run_reports_ground_truth_and_grids(workspace, oracle_run):
    name = "ifcvae_smiling_synth"
    args = tiny_overrides(name, workspace, oracle=oracle_run.best_checkpoint)
    result = run(compose(name, [*args, "trainer.max_epochs=1", "run_id=editing"]))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())["metrics"]
    for key in ("test/mse", "test/edit/Smiling/C_pos_paper", "test/edit/Smiling/C_neg_paper",
                "test/acc/E_y/Smiling", "test/acc/oracle/Smiling", "test/true_cf/mse", "test/true_cf/l1"):
        assert key in metrics
    assert 0 < metrics["test/true_cf/mse"] < 1
    assert (result.run_dir / "images" / "test_cf_grid.png").is_file()
    assert (result.run_dir / "images" / "val_cf_grid_epoch000.png").is_file()


def test_make_eval_evaluates_a_checkpoint_into_its_own_run(workspace, oracle_run):
    name = "ifcvae_smiling_synth"
    args = tiny_overrides(name, workspace, oracle=oracle_run.best_checkpoint)
    trained = run(compose(name, [*args, "trainer.max_epochs=1", "run_id=to-evaluate", "test.enabled=false"]))
    ckpt = trained.run_dir / "checkpoints" / "last.ckpt"
    assert evaluate_main([name, str(ckpt), *args, "run_id=eval-check"]) == 0
    eval_dir = workspace / "runs" / name / "eval-check"
    payload = json.loads((eval_dir / "metrics.json").read_text())
    assert payload["checkpoint"] == str(ckpt.resolve()) and payload["n_test_samples"] == 16
    assert payload["metrics"]["test/n_images"] == 16 and "test/edit/Smiling/C_neg_paper" in payload["metrics"]
    assert (eval_dir / "images" / "test_cf_grid.png").is_file()
    assert (eval_dir / "per_sample.csv").is_file()
    assert evaluate_main([name, str(workspace / "nope.ckpt"), *args]) == 2

    # SEEDS=2: one run per evaluation seed, then mean and std (ddof 1) of every metric over them
    assert evaluate_main([name, str(ckpt), "--seeds", "2", *args, "run_id=eval-seeds", "eval_seed=5"]) == 0
    runs = [json.loads((workspace / "runs" / name / f"eval-seeds-s{s}" / "metrics.json").read_text())["metrics"]
            for s in (5, 6)]
    summary = json.loads((workspace / "runs" / name / "eval-seeds" / "metrics.json").read_text())
    assert summary["eval_seeds"] == [5, 6]
    key = "test/reversibility/Smiling/l1"
    values = [r[key] for r in runs]
    assert summary["per_seed"][key] == values
    assert summary["metrics"][key] == pytest.approx(sum(values) / 2)
    assert summary["std"][key] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    # the model's weights and the data do not depend on the evaluation seed
    assert runs[0]["test/mse"] == runs[1]["test/mse"]
    assert evaluate_main([name, str(ckpt), "--seeds", "x", *args]) == 2


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_resume_continues_identically(workspace, oracle_run):
    name = "ifcvae_smiling_synth"
    args = [*tiny_overrides(name, workspace, oracle=oracle_run.best_checkpoint), "test.enabled=false"]
    straight = run(compose(name, [*args, "trainer.max_epochs=2", "run_id=straight"]))
    first = run(compose(name, [*args, "trainer.max_epochs=1", "run_id=interrupted"]))
    assert main([name, f"resume={first.run_dir}", "trainer.max_epochs=2"]) == 0

    a = _state(straight.run_dir / "checkpoints" / "last.ckpt")
    b = _state(first.run_dir / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"] > 0
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for pid, st in opt_a["state"].items():
            for k, v in st.items():
                assert torch.equal(v, opt_b["state"][pid][k]) if torch.is_tensor(v) else v == opt_b["state"][pid][k]


def test_ctrl_c_mid_epoch_exits_130_and_resumes_from_last_checkpoint(workspace, oracle_run, capsys):
    name = "ifcvae_smiling_synth"
    args = [*tiny_overrides(name, workspace, oracle=oracle_run.best_checkpoint), "test.enabled=false",
            "trainer.max_epochs=2", "run_id=ctrl-c"]
    # 48 training faces in batches of 8: 6 batches per epoch; Ctrl-C before the 3rd batch of epoch 2.
    stop = ["+callbacks.stop._target_=tests.helpers.interrupt.InterruptAt", "+callbacks.stop.batch=8"]
    assert main([name, *args, *stop]) == 130
    run_dir = workspace / "runs" / name / "ctrl-c"
    assert f"resume={run_dir}" in capsys.readouterr().err
    interrupted = _state(run_dir / "checkpoints" / "last.ckpt")  # the state at Ctrl-C, two batches into epoch 2
    assert interrupted["epoch"] == 1
    assert interrupted["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 2
    assert main([name, f"resume={run_dir}"]) == 0
    finished = _state(run_dir / "checkpoints" / "last.ckpt")
    assert finished["epoch"] == 1
    assert finished["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 12  # 2 epochs x 6


def test_resumed_run_appends_to_its_csv_log(workspace, oracle_run):
    name = "ifcvae_smiling_synth"
    args = [a for a in tiny_overrides(name, workspace, oracle=oracle_run.best_checkpoint) if a != "logger=none"]
    first = run(compose(name, [*args, "logger=csv", "test.enabled=false", "trainer.max_epochs=1", "run_id=csv-resume"]))
    assert main([name, f"resume={first.run_dir}", "trainer.max_epochs=2", "test.enabled=true"]) == 0
    with open(first.run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["epoch"] for r in rows if r.get("val/mse")} == {"0", "1"}  # the first run's rows are still there
    assert any(r.get("test/mse") for r in rows)  # and columns new in the resumed run were added


def test_resume_latest_and_missing_checkpoint_errors(workspace, oracle_run, tmp_path):
    name = "classifier_smiling_synth"
    (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / name / "latest").symlink_to(oracle_run.run_dir)
    assert resolve_resume("latest", name, str(tmp_path / "runs")) == oracle_run.run_dir.resolve()
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="last.ckpt does not exist"):
        resolve_resume(str(tmp_path), name, str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="config.yaml does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), name, str(tmp_path / "runs"))


def test_wandb_goes_offline_without_credentials(workspace, oracle_run, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(workspace / "home"))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(workspace / "home" / ".netrc"))
    name = "ifcvae_smiling_synth"
    args = [a for a in tiny_overrides(name, workspace, oracle=oracle_run.best_checkpoint) if a != "logger=none"]
    result = run(compose(name, [*args, "logger=wandb", "trainer.max_epochs=1", "run_id=wandb-offline"]))
    offline = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("run-*.wandb"))
    images = [str(p) for p in (offline[0] / "files" / "media" / "images").rglob("*.png")]
    assert any("val/cf_grid" in p for p in images) and any("test/cf_grid" in p for p in images)
    said = capsys.readouterr()
    assert (said.err + said.out).count("W&B: no credentials found") == 1
    # A second run in the same process (the quick start, an offline sweep) gets its own W&B run.
    second = run(compose(name, [*args, "logger=wandb", "trainer.max_epochs=1", "run_id=wandb-offline-2"]))
    offline2 = list((second.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline2) == 1 and list(offline2[0].glob("run-*.wandb"))
    assert any("test/cf_grid" in str(p) for p in (offline2[0] / "files" / "media" / "images").rglob("*.png"))
    said = capsys.readouterr()
    assert "W&B: no credentials found" not in said.err + said.out and "already in progress" not in said.err
    home = workspace / "home"
    assert not home.exists() or not any(home.rglob("*")), "nothing written outside the run directory"


def test_missing_celeba_fails_at_once_with_one_clear_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "ifcvae_smiling", f"data.root={tmp_path}/nowhere",
         f"paths.runs_dir={tmp_path}/runs"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "list_attr_celeba.txt" in proc.stderr and "synthetic" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
