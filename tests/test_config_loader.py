"""configs/loader.py: composition order, typo detection with suggestions, _target_ instantiation."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from configs.loader import ConfigError, available, compose, instantiate, override_saved


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
