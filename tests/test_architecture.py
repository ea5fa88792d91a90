"""The one-way layers of the code (pyproject.toml's import-linter contracts) hold, and a back-arrow breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmarks", "experiments", "callbacks", "lightning_modules", "configs", "datamodules")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    # The packages are found on PYTHONPATH before the editable install, so a copy of the tree is checked as it is.
    env = {**os.environ, "PYTHONPATH": str(root)}
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _copy_tree(tmp_path: Path) -> Path:
    copy = tmp_path / "tree"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def test_the_layers_hold() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_arrow_back_up_breaks_the_contract(tmp_path) -> None:
    tree = _copy_tree(tmp_path)
    base = tree / "datamodules" / "base.py"
    base.write_text(base.read_text() + "\nimport callbacks.editing_metrics  # a back-arrow: data -> callbacks\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "datamodules.base -> callbacks.editing_metrics" in result.stdout


def test_a_metric_that_imports_a_method_breaks_the_contract(tmp_path) -> None:
    tree = _copy_tree(tmp_path)
    metric = tree / "callbacks" / "metrics" / "leakage.py"
    metric.write_text(metric.read_text() + "\nimport lightning_modules.base  # metrics must stay pure\n")
    result = _lint_imports(tree)
    assert result.returncode != 0 and "The metrics are pure" in result.stdout


def test_a_module_outside_every_layer_is_refused(tmp_path) -> None:
    tree = _copy_tree(tmp_path)
    (tree / "lightning_modules" / "newmethod.py").write_text('"""A method file the contract does not place."""\n')
    result = _lint_imports(tree)
    assert result.returncode != 0 and "newmethod" in result.stdout
