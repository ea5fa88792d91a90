"""Every user mistake we know of, through the real entry points (``python -m experiments``, ``make eval``,
``make sweep``) on real-format files: each ends with exit code 2 and ONE line ``error: <the thing> <the fix>``, no
traceback, before any optimizer step, and with nothing written or changed on disk. The README's "When something
goes wrong" table lists the same cases and messages.

Also here: untrusted files. A checkpoint that is a malicious pickle (its unpickling would create a file) is
refused, and the file never appears, for ``resume=``, ``make eval`` and every option that names a checkpoint.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.core.optimizer import LightningOptimizer

from datamodules.chexpert_format import TRAIN_CSV
from experiments.cli import train as train_main
from experiments.evaluate import main as evaluate_main
from experiments.sweep import main as sweep_main
from tests.helpers.celeba_layout import write_tiny_celeba
from tests.helpers.chexpert_layout import image_path, write_tiny_chexpert
from tests.helpers.faults import write_malicious_checkpoint
from tests.helpers.morphomnist_layout import write_morphomnist
from tests.helpers.runs import tiny_overrides

REFUSED = r"was refused: it asks to import \S+, which no checkpoint of weights needs and loading it could run code"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mistakes")


@pytest.fixture(scope="module")
def data(ws) -> dict[str, Path]:
    """Pristine tiny datasets in their official layouts (tests that damage one copy it first)."""
    write_morphomnist(ws / "morpho", n_train=24, n_test=8)
    return {"celeba": write_tiny_celeba(ws / "celeba", n_train=16, n_val=8, n_test=8),
            "chexpert": write_tiny_chexpert(ws / "chexpert", extra_patients=12),
            "morpho": ws / "morpho"}


@pytest.fixture(scope="module")
def trained(ws, data) -> Path:
    """The run folder of a finished (tiny) classifier_smiling run, for make eval and resume."""
    name = "classifier_smiling"
    args = [*tiny_overrides(name, ws, data["celeba"]), "trainer.max_epochs=1", "run_id=trained"]
    assert train_main([name, *args]) == 0
    return ws / "runs" / name / "trained"


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """Records every optimizer step taken (manual and automatic optimization both go through it)."""
    taken: list[int] = []
    original = LightningOptimizer.step

    def step(self, *args, **kwargs):
        taken.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LightningOptimizer, "step", step)
    return taken


def snapshot(root: Path) -> list[tuple]:
    """Every path under ``root`` with what it holds: links by target, files by size and modification time."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out.append((str(p), "->", os.readlink(p)))
        elif p.is_file():
            out.append((str(p), p.stat().st_size, p.stat().st_mtime_ns))
        else:
            out.append((str(p), "dir"))
    return out


def the_error_line(capsys) -> str:
    said = capsys.readouterr()
    assert "Traceback" not in said.out + said.err
    errors = [line for line in said.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, said.err
    return errors[0]


# -- the table ------------------------------------------------------------------------------------------------
@dataclass
class Env:
    tmp: Path  # this test's own folder: runs go to tmp/runs, damaged data copies live here
    data: dict[str, Path]
    trained: Path | None = None  # last.ckpt of a finished classifier_smiling run

    def tiny(self, name: str, **roots: Path) -> list[str]:
        """tiny_overrides with this test's runs folder, reading the pristine (or the given) data."""
        args = tiny_overrides(name, self.tmp, roots.get("celeba", self.data["celeba"]))
        args = [a for a in args if not a.startswith(("data.root=", "callbacks.editing_metrics.oracle="))]
        args += [f"paths.runs_dir={self.tmp}/runs"]
        if name.startswith("ifcvae"):  # the trained classifier_smiling is a Smiling oracle
            args += [f"callbacks.editing_metrics.oracle={self.trained}"]
        for key in ("celeba", "chexpert", "morpho"):
            if key in roots or _reads(name, key):
                args.append(f"data.root={roots.get(key, self.data[key])}")
        return args

    def copy(self, key: str) -> Path:
        """A private copy of dataset ``key`` to damage."""
        src = self.data[key]
        dst = self.tmp / "data-copy" / src.name
        shutil.copytree(src, dst)
        return dst


def _reads(name: str, key: str) -> bool:
    from configs.loader import compose

    data = compose(name).choices.data
    return {"celeba": data in ("celeba", "celeba_38"), "chexpert": data == "chexpert", "morpho": data == "morphomnist"}[key]


def _truncate_idx(env: Env) -> list[str]:
    root = env.copy("morpho")
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    return ["predictors_morphomnist", *env.tiny("predictors_morphomnist", morpho=root)]


def _morpho_csv(env: Env, edit: Callable[[list[str]], list[str]]) -> list[str]:
    root = env.copy("morpho")
    csv = root / "train-morpho.csv"
    csv.write_text("\n".join(edit(csv.read_text().splitlines())) + "\n")
    return ["predictors_morphomnist", *env.tiny("predictors_morphomnist", morpho=root)]


def _chexpert_csv(env: Env, edit: Callable[[list[str]], list[str]]) -> list[str]:
    root = env.copy("chexpert")
    (root / TRAIN_CSV).write_text("\n".join(edit((root / TRAIN_CSV).read_text().splitlines())) + "\n")
    return ["predictors_chexpert", *env.tiny("predictors_chexpert", chexpert=root)]


def _corrupt_celeba_jpeg(env: Env) -> list[str]:
    root = env.copy("celeba")
    (root / "img_align_celeba" / "000003.jpg").write_bytes(b"not a jpeg at all")
    # DataLoader workers on, as CelebA's default config has them: the message must not drown in a worker traceback
    return ["classifier_smiling", *env.tiny("classifier_smiling", celeba=root), "data.num_workers=2"]


def _corrupt_chexpert_jpeg(env: Env) -> list[str]:
    root = env.copy("chexpert")
    image_path(root, 0).write_bytes(image_path(root, 0).read_bytes()[:200])
    return ["predictors_chexpert", *env.tiny("predictors_chexpert", chexpert=root), "data.num_workers=2"]


def _unwritable_runs_dir(env: Env) -> list[str]:
    (env.tmp / "a-file").write_text("")
    return ["classifier_smiling", *env.tiny("classifier_smiling"), f"paths.runs_dir={env.tmp}/a-file"]


def _users_file_named_latest(env: Env) -> list[str]:
    folder = env.tmp / "runs" / "classifier_smiling"
    folder.mkdir(parents=True)
    (folder / "latest").write_text("my notes")
    return ["classifier_smiling", *env.tiny("classifier_smiling")]


def _eval(env: Env, name: str, ckpt: Path) -> list[str]:
    return [name, str(ckpt), *env.tiny(name)]


def _truncated_checkpoint(env: Env) -> list[str]:
    (env.tmp / "half.ckpt").write_bytes(env.trained.read_bytes()[:5000])
    return _eval(env, "classifier_smiling", env.tmp / "half.ckpt")


def _sweep_spec(env: Env, text: str) -> list[str]:
    spec = env.tmp / "spec.yaml"
    spec.write_text(text)
    return [str(spec), f"paths.runs_dir={env.tmp}/runs"]


_GOOD_COMMAND = "command: [python, -m, experiments, classifier_smiling, '${args_no_hyphens}']\n"


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    message: str  # a regex the single error line must match (it names the thing and the fix)
    entry: Callable[[list[str]], int] = train_main


CASES = [
    # -- config values ---------------------------------------------------------------------------------------
    Case("misspelt key", lambda e: ["classifier_smiling", *e.tiny("classifier_smiling"), "model.lrr=0.1"],
         r"Unknown config key 'model\.lrr' \(from the command line\)\. Did you mean 'model\.lr'\?"),
    Case("string for a float", lambda e: ["classifier_smiling", *e.tiny("classifier_smiling"), "model.lr=abc"],
         r"Config value 'model\.lr' = 'abc' is a string, but AttributeClassifier declares 'lr' as float\. "
         r"Give model\.lr a value of that type\."),
    Case("string for a float (IFcVAE-GAN)", lambda e: ["ifcvae_smiling", *e.tiny("ifcvae_smiling"), "model.alpha=abc"],
         r"Config value 'model\.alpha' = 'abc' is a string, but IFCVAE declares 'alpha' as float"),
    Case("float for an int", lambda e: ["classifier_smiling", *e.tiny("classifier_smiling"), "trainer.max_epochs=1.5"],
         r"Config value 'trainer\.max_epochs' = 1\.5 is a float, but Trainer declares 'max_epochs' as int or null"),
    Case("negative batch size", lambda e: ["classifier_smiling", *e.tiny("classifier_smiling"), "data.batch_size=-4"],
         r"'data' \(datamodules\.celeba\.CelebADataModule\): batch_size must be >= 1 and num_workers >= 0, got -4"),
    Case("image size the networks cannot take",
         lambda e: ["ifcvae_smiling", *e.tiny("ifcvae_smiling"), "data.image_size=48"],
         r"'model\.encoder' \(lightning_modules\.networks\.encoders\.ConvEncoder\): image_size must be a power of "
         r"two >= 8, got 48"),
    Case("unknown experiment", lambda e: ["ifcvae_smilling", f"paths.runs_dir={e.tmp}/runs"],
         r"No experiment named 'ifcvae_smilling'\. Did you mean 'ifcvae_smiling'\? Experiments: "),
    Case("experiment name that is a path", lambda e: ["../configs/base", f"paths.runs_dir={e.tmp}/runs"],
         r"No experiment named '\.\./configs/base'\."),
    Case("run_id outside runs/", lambda e: ["classifier_smiling", *e.tiny("classifier_smiling"), "run_id=../../x"],
         r"run_id='\.\./\.\./x' is not a plain folder name: a run is always written to "
         r"<paths\.runs_dir>/<experiment>/<run_id>/"),
    Case("run_id an absolute path",
         lambda e: ["classifier_smiling", *e.tiny("classifier_smiling"), f"run_id={e.tmp}/abs"],
         r"run_id='/.*/abs' is not a plain folder name"),
    # -- datasets --------------------------------------------------------------------------------------------
    Case("missing CelebA folder", lambda e: ["classifier_smiling", *e.tiny("classifier_smiling", celeba=e.tmp / "no")],
         r"CelebA root folder not found: .*/no\. .*synthetic"),
    Case("missing MorphoMNIST folder",
         lambda e: ["predictors_morphomnist", *e.tiny("predictors_morphomnist", morpho=e.tmp / "no")],
         r"MorphoMNIST folder not found: .*/no\..*make data-morphomnist"),
    Case("missing MNIST folder (colored MNIST)",
         lambda e: ["predictor_colored_mnist_digit", *e.tiny("predictor_colored_mnist_digit"),
                    f"data.mnist_source={e.tmp}/no"],
         r"MNIST folder not found: .*/no\. "),
    Case("missing CheXpert folder",
         lambda e: ["predictors_chexpert", *e.tiny("predictors_chexpert", chexpert=e.tmp / "no")],
         r"CheXpert root folder not found: .*/no\. .*CheXpert-v1\.0-small"),
    Case("corrupt JPEG, CelebA layout, workers on", _corrupt_celeba_jpeg,
         r"cannot decode image .*/000003\.jpg \(UnidentifiedImageError: .*\); the file is corrupt or truncated\. "
         r"Re-download img_align_celeba\.zip, or regenerate the synthetic data\.$"),
    Case("corrupt JPEG, CheXpert layout, workers on", _corrupt_chexpert_jpeg,
         r"cannot decode image .*patient00001/study1/view1_frontal\.jpg .*corrupt or truncated"),
    Case("truncated MorphoMNIST IDX", _truncate_idx,
         r"train-images-idx3-ubyte\.gz declares shape \(24, 28, 28\).*truncated"),
    Case("morpho CSV without a column",
         lambda e: _morpho_csv(e, lambda lines: [",".join(line.split(",")[:2]) for line in lines]),
         r"train-morpho\.csv lacks the column\(s\) \['intensity'\]"),
    Case("morpho CSV with another row count", lambda e: _morpho_csv(e, lambda lines: lines[:-3]),
         r"counts differ \(.*train-images-idx3-ubyte\.gz: 24.*train-morpho\.csv: 21"),
    Case("CheXpert CSV without a column",
         lambda e: _chexpert_csv(e, lambda lines: [lines[0].replace("Cardiomegaly", "Cardiomegally"), *lines[1:]]),
         r"train\.csv lacks the column\(s\) \['Cardiomegaly'\]"),
    Case("CheXpert CSV naming a missing image",
         lambda e: _chexpert_csv(e, lambda lines: [lines[0], lines[1].replace("patient00001", "patient09999"),
                                                   *lines[2:]]),
         r"image\(s\) of the \w+ split listed in train\.csv are missing.*patient09999"),
    Case("attribute CelebA does not have",
         lambda e: ["classifier_smiling", *e.tiny("classifier_smiling"), "data.attributes=[Smilling]"],
         r"unknown CelebA attribute 'Smilling'; did you mean 'Smiling'\?"),
    Case("attribute MorphoMNIST does not have",
         lambda e: ["predictors_morphomnist", *e.tiny("predictors_morphomnist"), "data.attributes=[thickness,slant]"],
         r"'data' \(datamodules\.morphomnist\.MorphoMNISTDataModule\): attributes must be distinct names from "
         r"\['thickness', 'intensity', 'digit'\]"),
    # -- where runs go ---------------------------------------------------------------------------------------
    Case("run folder that cannot be written", _unwritable_runs_dir,
         r"Cannot write the run folder .*/a-file/classifier_smiling/\S+ \(Not a directory\); choose a writable "
         r"paths\.runs_dir\."),
    Case("a user's file where `latest` goes", _users_file_named_latest,
         r"runs/classifier_smiling/latest is a file, not the link cfgen keeps there to the newest run; move it away"),
    # -- make eval -------------------------------------------------------------------------------------------
    Case("make eval: missing checkpoint", lambda e: _eval(e, "classifier_smiling", e.tmp / "nope.ckpt"),
         r"Checkpoint .*/nope\.ckpt does not exist \(CKPT=runs/<exp>/<run>/checkpoints/last\.ckpt\)\.",
         evaluate_main),
    Case("make eval: checkpoint of another method", lambda e: _eval(e, "ifcvae_smiling", e.trained),
         r"is not a checkpoint of experiment 'ifcvae_smiling' \(IFCVAE\): \d+ \(e\.g\. '\S+'\) of the model's "
         r"weights are missing from it, \d+ .* It was written by experiment 'classifier_smiling': evaluate it with "
         r"EXP=classifier_smiling\.", evaluate_main),
    Case("make eval: checkpoint of another experiment of the same method",
         lambda e: _eval(e, "classifier_celeba_38", e.trained),
         r"is not a checkpoint of experiment 'classifier_celeba_38' \(AttributeClassifier\): 0 of the model's weights "
         r"are missing from it, 0 of its weights are not in the model and \d+ \(e\.g\. '\S+'\) have another shape\. "
         r"It was written by experiment 'classifier_smiling'", evaluate_main),
    Case("make eval: a malicious pickle as CKPT",
         lambda e: _eval(e, "classifier_smiling", write_malicious_checkpoint(e.tmp / "evil.ckpt", e.tmp / "MARKER")),
         r"checkpoint .*/evil\.ckpt " + REFUSED, evaluate_main),
    Case("make eval: a bare pickle as CKPT",
         lambda e: _eval(e, "classifier_smiling", write_malicious_checkpoint(e.tmp / "evil.pkl", e.tmp / "MARKER",
                                                                            raw=True)),
         r"checkpoint .*/evil\.pkl was refused: it holds an object that no checkpoint of weights needs", evaluate_main),
    Case("make eval: a truncated checkpoint", _truncated_checkpoint,
         r"checkpoint .*/half\.ckpt cannot be read: it is truncated or not a PyTorch checkpoint", evaluate_main),
    # -- make sweep ------------------------------------------------------------------------------------------
    Case("malformed sweep YAML",
         lambda e: _sweep_spec(e, "method: grid\nparameters:\n  model.lr: {values: [0.1, 0.2]\n" + _GOOD_COMMAND),
         r"spec\.yaml, line \d+, column \d+ is not valid YAML \(.*\); a sweep spec is W&B's YAML format", sweep_main),
    Case("sweep parameter that is not a mapping",
         lambda e: _sweep_spec(e, "method: grid\nparameters:\n  model.lr: 0.1\n" + _GOOD_COMMAND),
         r"spec\.yaml: parameter 'model\.lr' = 0\.1 is not a parameter spec; give 'values: \[a, b, \.\.\.\]'",
         sweep_main),
    Case("sweep value of the wrong type",
         lambda e: _sweep_spec(e, "method: grid\nparameters:\n  model.lr: {values: [0.1, fast]}\n" + _GOOD_COMMAND),
         r"Config value 'model\.lr' = 'fast' is a string, but AttributeClassifier declares 'lr' as float",
         sweep_main),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_user_mistake_ends_with_one_line_before_training_and_writes_nothing(case, ws, data, trained, tmp_path,
                                                                            steps, capsys):
    env = Env(tmp_path / "t", data, trained / "checkpoints" / "last.ckpt")
    env.tmp.mkdir()
    argv = case.argv(env)
    before, data_before = snapshot(env.tmp), snapshot(ws / "celeba") + snapshot(ws / "chexpert")
    assert case.entry(argv) == 2
    line = the_error_line(capsys)
    assert line.startswith("error: ")
    assert re.search(case.message, line), line
    assert steps == [], "an optimizer step was taken"
    assert snapshot(env.tmp) == before, "something was written"
    assert snapshot(ws / "celeba") + snapshot(ws / "chexpert") == data_before
    assert not (env.tmp / "x").exists(), "run_id=../../x escaped runs/"
    assert not (env.tmp / "MARKER").exists(), "a checkpoint's code ran"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_runs_folder(data, tmp_path, steps, capsys):
    env = Env(tmp_path, data)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs").chmod(0o500)
    try:
        assert train_main(["classifier_smiling", *env.tiny("classifier_smiling")]) == 2
        assert re.search(r"Cannot write the run folder .* \(Permission denied\); choose a writable paths\.runs_dir",
                         the_error_line(capsys))
        assert steps == [] and not any((tmp_path / "runs").iterdir())
    finally:
        (tmp_path / "runs").chmod(0o700)


def test_the_probes_of_the_table_see_training_and_writes(ws, data, tmp_path, steps, capsys):
    """The same run without the mistake trains and writes, so the table's "nothing happened" checks can fail."""
    env = Env(tmp_path, data)
    assert train_main(["classifier_smiling", *env.tiny("classifier_smiling"), "trainer.max_epochs=1"]) == 0
    assert steps and (tmp_path / "runs" / "classifier_smiling" / "latest" / "checkpoints" / "last.ckpt").is_file()


# -- untrusted checkpoints: no code runs -------------------------------------------------------------------------
def _morpho_model_run(ws: Path, data: dict[str, Path], name: str, extra: list[str]) -> Path:
    """A tiny one-step run of ``name`` on the tiny MorphoMNIST without attribute mechanisms or metrics."""
    run_dir = ws / "runs" / name / "stage1"
    if not run_dir.exists():
        args = [*tiny_overrides(name, ws), f"data.root={data['morpho']}", "callbacks=none", "model.scm_checkpoint=null",
                "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                "test.enabled=false", "run_id=stage1", *extra]
        assert train_main([name, *args]) == 0
    return run_dir / "checkpoints" / "last.ckpt"


OPTIONS = [  # (experiment, the option naming a checkpoint, overrides that make every earlier load succeed)
    ("cvae_morphomnist", "model.scm_checkpoint", []),
    ("cvae_morphomnist", "callbacks.counterfactual_metrics.predictors", ["model.scm_checkpoint=null"]),
    ("cvae_morphomnist", "callbacks.counterfactual_metrics.vae",
     ["model.scm_checkpoint=null", "callbacks.counterfactual_metrics.predictors=null",
      "callbacks.counterfactual_metrics.distances=[l1]", "callbacks.counterfactual_metrics.fid=null"]),
    ("hvae_cf_morphomnist", "model.pretrained", []),
    ("hvae_cf_morphomnist", "model.predictors", ["model.pretrained={hvae}"]),
    ("bigan_cyclic_morphomnist", "model.pretrained", []),
    ("ifcvae_smiling", "callbacks.editing_metrics.oracle", []),
    ("ifcvae_smiling", "callbacks.editing_metrics.preservation_oracle", []),
    ("cdvaegan_celeba", "callbacks.counterfactual_metrics.fid_features",
     ["callbacks.editing_metrics.oracle={oracle}", "callbacks.counterfactual_metrics.fid=fid_domain"]),
]


@pytest.mark.parametrize("name, option, extra", OPTIONS, ids=[f"{n}:{o}" for n, o, _ in OPTIONS])
def test_a_malicious_checkpoint_option_is_refused_and_runs_nothing(name, option, extra, ws, data, trained, tmp_path,
                                                                  steps, capsys):
    hvae = _morpho_model_run(ws, data, "hvae_morphomnist", []) if "{hvae}" in " ".join(extra) else None
    steps.clear()  # that was the stage-1 run
    marker, evil = tmp_path / "MARKER", write_malicious_checkpoint(tmp_path / "evil.ckpt", tmp_path / "MARKER")
    env = Env(tmp_path / "t", data, trained / "checkpoints" / "last.ckpt")
    env.tmp.mkdir()
    args = [name, *env.tiny(name), *(x.format(hvae=hvae, oracle=env.trained) for x in extra), f"{option}={evil}"]
    if name.startswith(("cvae", "hvae_cf", "bigan")):
        args.append(f"data.root={data['morpho']}")
    before = snapshot(env.tmp)
    assert train_main(args) == 2
    assert re.search(rf"{evil} {REFUSED}", the_error_line(capsys))
    assert not marker.exists(), "the checkpoint's code ran"
    assert steps == [] and snapshot(env.tmp) == before


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "classifier_smiling" / "copied"
    shutil.copytree(trained, run_dir, symlinks=True)
    return run_dir


def test_resume_refuses_a_malicious_last_checkpoint(trained, tmp_path, steps, capsys):
    run_dir = _copy_run(trained, tmp_path)
    write_malicious_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "MARKER")
    before = snapshot(tmp_path)
    assert train_main(["classifier_smiling", f"resume={run_dir}"]) == 2
    assert re.search(rf"checkpoint {run_dir}/checkpoints/last\.ckpt {REFUSED}",
                                            the_error_line(capsys))
    assert not (tmp_path / "MARKER").exists() and steps == [] and snapshot(tmp_path) == before


def test_testing_refuses_a_malicious_best_checkpoint(data, trained, tmp_path, capsys):
    """best.ckpt swapped for a malicious pickle between training and testing: Lightning's own loading (trainer.test
    with ckpt_path) refuses it too."""
    env = Env(tmp_path, data, trained / "checkpoints" / "last.ckpt")
    swap = ["+callbacks.swap._target_=tests.helpers.faults.MaliciousAtTrainEnd", "+callbacks.swap.filename=best.ckpt",
            f"+callbacks.swap.marker={tmp_path}/MARKER"]
    assert train_main(["classifier_smiling", *env.tiny("classifier_smiling"), "trainer.max_epochs=1", "run_id=swap",
                       *swap]) == 2
    run_dir = tmp_path / "runs" / "classifier_smiling" / "swap"
    assert re.search(rf"checkpoint {run_dir}/checkpoints/best\.ckpt {REFUSED}", the_error_line(capsys))
    assert not (tmp_path / "MARKER").exists() and not (run_dir / "metrics.json").exists()


def test_resume_refuses_a_run_config_that_would_call_anything(trained, tmp_path, steps, capsys):
    """A run folder's config.yaml names what resume= builds: one naming a callable outside cfgen's packages (here
    one that would create a file) is refused before anything is built."""
    run_dir = _copy_run(trained, tmp_path)
    config = run_dir / "config.yaml"
    marker = tmp_path / "MARKER"
    saved = OmegaConf.load(config)
    saved.callbacks.extra = {"_target_": "pathlib.Path.touch", "self": str(marker)}  # a "callback" that makes a file
    OmegaConf.save(saved, config)
    before = snapshot(tmp_path)
    assert train_main(["classifier_smiling", f"resume={run_dir}"]) == 2
    assert re.search(rf"Cannot resume: {config} names _target_ 'pathlib\.Path\.touch', outside the packages cfgen "
                     rf"builds from, and resuming would call it\. Nothing was run\.", the_error_line(capsys))
    assert not marker.exists() and steps == [] and snapshot(tmp_path) == before


def test_resume_of_another_experiments_run_names_it(trained, capsys):
    assert train_main(["ifcvae_smiling", f"resume={trained}"]) == 2
    assert "is a run of experiment 'classifier_smiling', not 'ifcvae_smiling'" in the_error_line(capsys)


def test_every_kind_of_checkpoint_the_experiments_write_loads_weights_only(ws, data, trained):
    """Weights-only loading needs no allow-list: a classifier (automatic optimization, ModelCheckpoint and RNG
    states), an HVAE (manual optimization, EMA, LR scheduler) and a BiGAN (three optimizers) all load."""
    paths = [trained / "checkpoints" / "last.ckpt", trained / "checkpoints" / "best.ckpt",
             _morpho_model_run(ws, data, "hvae_morphomnist", []), _morpho_model_run(ws, data, "bigan_morphomnist", [])]
    for path in paths:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert {"state_dict", "optimizer_states", "callbacks", "hyper_parameters"} <= set(checkpoint)


def test_a_config_mistake_is_reported_before_torch_is_imported(tmp_path):
    code = ("import sys; from experiments.cli import train; rc = train(['ifcvae_smiling_synth', 'model.alpah=0.1', "
            f"'paths.runs_dir={tmp_path}/runs']); print(rc, 'torch' in sys.modules, 'pytorch_lightning' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False", "False"]
    assert proc.stderr.startswith("error: Unknown config key 'model.alpah'") and proc.stderr.count("\n") == 1


def test_debug_shows_the_traceback(data, tmp_path):
    env = Env(tmp_path, data)
    with pytest.raises(Exception, match="batch_size must be >= 1") as info:
        train_main(["classifier_smiling", *env.tiny("classifier_smiling"), "data.batch_size=0", "--debug"])
    assert type(info.value).__name__ == "ConfigError" and isinstance(info.value.__cause__, ValueError)
