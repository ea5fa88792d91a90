"""configs/loader.py: composition order, typo detection with suggestions, _target_ instantiation."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
from omegaconf import OmegaConf

from configs.loader import ConfigError, available, check_config, compose, instantiate, override_saved


@pytest.mark.parametrize("name", available("experiment"))
def test_every_experiment_composes(name):
    cfg = compose(name)
    assert cfg.name == name
    for group in ("model", "data", "trainer", "callbacks", "logger"):
        assert group in cfg.choices
    assert OmegaConf.missing_keys(cfg) == set()


def test_merge_order_base_groups_experiment_cli():
    base = compose("ifcvae_smiling")
    assert base.model.alpha == 0.2  # group file (paper Table 1)
    ablation = compose("ifcvae_smiling_no_aux")
    assert ablation.model.aux_weight == 0.0  # experiment body over the group
    assert ablation.trainer.max_epochs == base.trainer.max_epochs  # inherited through `extends`
    cli = compose("ifcvae_smiling_no_aux", ["model.aux_weight=0.5", "trainer.max_epochs=3"])
    assert cli.model.aux_weight == 0.5 and cli.trainer.max_epochs == 3  # command line last


def test_interpolation_passes_data_shape_to_networks():
    cfg = compose("ifcvae_smiling_synth", ["data.image_size=128", "model._latent=16"])
    assert cfg.model.encoder.image_size == 128
    assert cfg.model.decoder.in_features == 17  # z plus the one attribute unit
    assert cfg.data.builder.image_size == 128


def test_misspelt_key_names_path_and_suggestion():
    with pytest.raises(ConfigError) as err:
        compose("ifcvae_smiling_synth", ["model.alpah=0.1"])
    msg = str(err.value)
    assert "'model.alpah'" in msg and "Did you mean 'model.alpha'?" in msg


def test_misspelt_nested_key_and_top_level_key():
    with pytest.raises(ConfigError, match=r"'model\.encoder\.base_widht'.*'model\.encoder\.base_width'"):
        compose("ifcvae_smiling_synth", ["model.encoder.base_widht=8"])
    with pytest.raises(ConfigError, match=r"'sed'.*Did you mean 'seed'"):
        compose("ifcvae_smiling_synth", ["sed=3"])


def test_unknown_group_option_and_experiment():
    with pytest.raises(ConfigError, match=r"No 'wandbb' in config group 'logger'\. Did you mean 'wandb'\?"):
        compose("ifcvae_smiling_synth", ["logger=wandbb"])
    with pytest.raises(ConfigError, match=r"No experiment named 'ifcvae_smilling'\. Did you mean 'ifcvae_smiling'\?"):
        compose("ifcvae_smilling")


def test_group_switch_and_explicit_addition():
    cfg = compose("ifcvae_smiling_synth", ["logger=csv", "+model.extra_note=hello"])
    assert cfg.choices.logger == "csv" and cfg.logger._target_.endswith("csv_logger")
    assert cfg.model.extra_note == "hello"


def test_replacing_a_target_takes_the_mapping_whole():
    cfg = compose("ifcvae_smiling_synth", ["model.auxiliary={_target_: torch.nn.Linear, in_features: 100, out_features: 1}"])
    assert set(cfg.model.auxiliary) == {"_target_", "in_features", "out_features"}


def test_override_saved_config_rejects_typos():
    cfg = compose("ifcvae_smiling_synth")
    assert override_saved(cfg, ["trainer.max_epochs=7"]).trainer.max_epochs == 7
    with pytest.raises(ConfigError, match="Did you mean 'trainer.max_epochs'"):
        override_saved(cfg, ["trainer.max_epoch=7"])


def test_instantiate_nested_partial_and_config_only_variables():
    node = OmegaConf.create({"_target_": "torch.nn.Linear", "_width": 3, "in_features": "${._width}",
                             "out_features": 2})
    lin = instantiate(node)
    assert lin.in_features == 3  # `_width` fed the interpolation but was not passed to Linear
    opt = instantiate({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    assert isinstance(opt, functools.partial) and opt.keywords == {"lr": 0.1}
    nested = instantiate({"a": [{"_target_": "torch.nn.Identity"}], "b": 2})
    assert type(nested["a"][0]).__name__ == "Identity" and nested["b"] == 2


def test_instantiate_rejects_unknown_parameter_with_suggestion():
    with pytest.raises(ConfigError) as err:
        instantiate({"_target_": "torch.nn.Linear", "in_feature": 3, "out_features": 2}, "model.head")
    assert "'model.head.in_feature'" in str(err.value) and "Did you mean 'in_features'?" in str(err.value)
    with pytest.raises(ConfigError, match=r"'model\._target_' = 'torch\.nn\.Nope' cannot be imported"):
        instantiate({"_target_": "torch.nn.Nope"}, "model")


def test_command_line_typo_fails_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "ifcvae_smiling_synth", "model.alpah=0.1",
         f"paths.runs_dir={tmp_path}/runs", f"paths.data_dir={tmp_path}/data"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Unknown config key 'model.alpah'" in proc.stderr and "Did you mean 'model.alpha'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("data, channels", [("celeba", 3), ("synthetic_faces", 3), ("morphomnist", 1),
                                            ("colored_mnist", 3), ("wildlife_mnist", 3), ("chexpert", 1),
                                            ("chest_phantom", 1)])
def test_models_take_their_image_channels_from_the_data_config(data, channels):
    cfg = compose("ifcvae_smiling_synth", [f"data={data}"])
    assert cfg.data._channels == channels
    assert cfg.model.encoder.in_channels == cfg.model.decoder.out_channels == channels
    assert cfg.model.discriminator.in_channels == channels


def test_parents_width_resolver_counts_one_hot_columns():
    cfg = OmegaConf.create({"p": {"t": {"kind": "continuous", "low": 0, "high": 1},
                                  "d": {"kind": "categorical", "num_classes": 10}},
                            "names": ["Smiling", "Eyeglasses"],
                            "a": "${parents_width:${p}}", "b": "${parents_width:${names}}"})
    assert cfg.a == 11 and cfg.b == 2


# -- value types against the annotations of the target -----------------------------------------------------
def typed_target(rate: float, steps: int, name: str = "x", flag: bool = False, size: int | None = None,
                 names: Sequence[str] = (), pair: tuple[int, int] = (1, 2), mode: Literal["a", "b"] = "a",
                 root: Path | None = None, loose: int = None, anything: Any = None,  # loose: `int = None`, as some declare
                 table: Mapping[str, float] | None = None) -> dict:
    return locals()


TYPED = "tests.test_config_loader.typed_target"


@pytest.mark.parametrize("good", [
    {"rate": 1, "steps": 3},  # an int is a float
    {"rate": 0.5, "steps": 3, "size": None, "names": ["a", "b"], "pair": [3, 4], "mode": "b", "root": "/x",
     "loose": None, "anything": [1, "a"], "table": {"a": 1.0}},
])
def test_check_config_accepts_what_the_annotations_allow(good):
    check_config({"_target_": TYPED, **good}, "model")
    assert instantiate({"_target_": TYPED, **good})["rate"] == good["rate"]


@pytest.mark.parametrize("key, value, said", [
    ("rate", "abc", "'model.rate' = 'abc' is a string, but typed_target declares 'rate' as float"),
    ("steps", 1.5, "'model.steps' = 1.5 is a float, but typed_target declares 'steps' as int"),
    ("steps", True, "'model.steps' = True is a bool, but typed_target declares 'steps' as int"),
    ("flag", 1, "'model.flag' = 1 is an int, but typed_target declares 'flag' as bool"),
    ("size", "big", "declares 'size' as int or null"),
    ("names", "ab", "'model.names' = 'ab' is a string, but typed_target declares 'names' as a list of str"),
    ("names", ["a", 2], "declares 'names' as a list of str"),
    ("pair", [1, 2, 3], "declares 'pair' as a list of 2 (int, int)"),
    ("mode", "c", "declares 'mode' as one of 'a', 'b'"),
    ("table", {"a": "x"}, "declares 'table' as a mapping to float or null"),
    ("rate", None, "'model.rate' = None is null, but typed_target declares 'rate' as float"),
])
def test_check_config_names_the_key_and_the_declared_type(key, value, said):
    node = {"_target_": TYPED, "rate": 0.1, "steps": 1, key: value}
    with pytest.raises(ConfigError, match=re.escape(said)):
        check_config(node, "model")


def test_check_config_checks_nested_targets_and_names_before_building():
    node = {"_target_": TYPED, "rate": 0.1, "steps": 1, "anything": {"_target_": TYPED, "rate": "fast", "steps": 1}}
    with pytest.raises(ConfigError, match=r"'model\.anything\.rate' = 'fast'"):
        check_config(node, "model")
    with pytest.raises(ConfigError, match=r"'model\.stepz' is not a parameter of .*typed_target\. Did you mean 'steps'"):
        check_config({"_target_": TYPED, "rate": 0.1, "stepz": 1}, "model")


def refusing_target(size: int) -> int:
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return size


def test_constructor_value_errors_name_the_config_entry():
    target = "tests.test_config_loader.refusing_target"
    with pytest.raises(ConfigError, match=rf"^'model\.head' \({re.escape(target)}\): size must be >= 1, got -3$"):
        instantiate({"_target_": target, "size": -3}, "model.head")


@pytest.mark.parametrize("run_id", ["../../x", "/abs/path", "a/b", "latest", ".hidden", "..", "a\\b"])
def test_run_id_must_be_a_plain_folder_name(run_id):
    with pytest.raises(ConfigError, match="is not a plain folder name"):
        compose("ifcvae_smiling_synth", [f"run_id={run_id}"])


def test_experiment_and_option_names_are_file_stems_only():
    with pytest.raises(ConfigError, match=r"No experiment named '\.\./configs/base'"):
        compose("../configs/base")
    with pytest.raises(ConfigError, match=r"No '\.\./data/celeba' in config group 'model'"):
        compose("ifcvae_smiling_synth", ["model=../data/celeba"])


@pytest.mark.parametrize("target, key, value, said", [
    ("datamodules.celeba.CelebADataModule", "cache_max_bytes", "big", "declares 'cache_max_bytes' as int"),
    ("datamodules.chexpert.CheXpertDataModule", "limit_per_split", "all", "declares 'limit_per_split' as int or null"),
    ("lightning_modules.hvae_finetune.CounterfactualFinetunedHVAE", "grad_clip", "high",
     "declares 'grad_clip' as float or null"),
])
def test_options_a_class_takes_as_kwargs_are_checked_by_their_listed_types(target, key, value, said):
    """The image-file DataModules' loading options and the fine-tuned HVAE's training options are declared once
    (``**options`` / ``**training``) and listed in the class's signature with their types: the config check
    reads those types, and a misspelt option is named with its likely fix."""
    with pytest.raises(ConfigError, match=re.escape(said)):
        check_config({"_target_": target, key: value}, "x")
    with pytest.raises(ConfigError, match=rf"'x\.{key}s' is not a parameter of .*Did you mean '{key}'"):
        check_config({"_target_": target, f"{key}s": 1}, "x")


def test_the_image_file_datamodules_save_their_loading_options_with_the_defaults(tmp_path):
    from datamodules.chexpert import CheXpertDataModule

    class Builder:
        def build(self, root):  # never called: the DataModule only keeps it
            raise AssertionError

    dm = CheXpertDataModule(str(tmp_path), builder=Builder(), limit_per_split=3)
    assert dm.hparams.limit_per_split == 3 and dm.limit_per_split == 3
    assert dm.hparams.cache == "auto" and dm.hparams.num_workers == 0  # defaults, written once, saved too
    assert "builder" not in dm.hparams
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['cach'\]"):
        CheXpertDataModule(str(tmp_path), builder=Builder(), cach="never")
