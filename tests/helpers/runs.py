"""Overrides that shrink any experiment to seconds on a CPU, for end-to-end runner tests."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from configs.loader import compose
from tests.helpers.chexpert_layout import write_tiny_chexpert
from tests.helpers.morphomnist_layout import write_morphomnist


def tiny_overrides(name: str, tmp: Path, celeba_root: Path | None = None, oracle: str | None = None) -> list[str]:
    """Command-line overrides that make experiment ``name`` tiny: 32x32 images, widths of 8, a few dozen
    synthetic faces (or the tiny CelebA at ``celeba_root``), no logger, everything under ``tmp``."""
    choices = compose(name).choices
    args = [
        f"paths.runs_dir={tmp}/runs", f"paths.data_dir={tmp}/data", "logger=none",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
        "data.num_workers=0", "data.batch_size=8", "data.image_size=32",
    ]
    if choices.data in ("synthetic_faces", "synthetic_faces_38"):
        args += ["data.builder.n_train=48", "data.builder.n_val=16", "data.builder.n_test=16"]
    elif choices.data in ("celeba", "celeba_38"):
        if celeba_root is None:
            raise ValueError(f"{name} reads CelebA: pass celeba_root")
        args += [f"data.root={celeba_root}"]
    elif choices.data in ("morphomnist", "morphomnist_synth"):
        # a tiny folder in the published layout stands in for both (building the synthetic one takes minutes)
        root = tmp / "tiny_morphomnist"
        if not root.exists():
            write_morphomnist(root, n_train=24, n_test=8)
        args = [a for a in args if a != "data.image_size=32"] + [f"data.root={root}", "data.n_val=8", "data.builder=null"]
    elif choices.data in ("colored_mnist", "double_colored_mnist", "wildlife_mnist"):
        args = [a for a in args if a != "data.image_size=32"] + ["data.limit_per_split=16"]
    elif choices.data == "chexpert":
        root = tmp / "tiny_chexpert" / "CheXpert-v1.0-small"
        if not root.exists():
            write_tiny_chexpert(tmp / "tiny_chexpert", extra_patients=12)
        args += [f"data.root={root}", "data.image_size=64"]
    elif choices.data == "chest_phantom":
        args += ["data.builder.n_train_patients=6", "data.builder.n_valid_patients=3", "data.builder.image_size=64",
                 "data.split_fractions=[0.5,0.5,0.0]"]
    if choices.model == "ifcvae":
        args += ["model._width=8", "model._latent=8"]
    elif choices.model == "classifier":
        args += ["model.network.base_width=8"]
    elif choices.model in ("cdvae_gan", "vae_bernoulli", "vaegan"):  # Table 1's layer pattern, 4 channels wide
        args += ["model._latent=4", "model._widths=[4,4,4,4]", "model._hidden=[8]", "model._decoder_widths=[4,4,4,4]",
                 "model._start_width=4", "model._disc_hidden=8"]
    elif choices.model == "predictor":
        args += ["model._width=4", "model.feature_dim=8"]
    elif choices.model == "vae":
        args += ["model._width=4", "model._latent=4"]
    elif choices.model in ("cvae", "cvae_celeba"):
        args += ["model._hidden=8", "model._latent=4"]
    elif choices.model in ("bigan", "bigan_celeba"):  # 32x32 (3 stride-2 stages) whatever the data
        args += ["model._latent=8", "model.encoder.widths=[4,8,8,8]", "model.encoder.hidden=[]",
                 "model.encoder.embed_resolution=4", "model.generator.widths=[8,8,8,4]", "model.generator.embed_dim=4",
                 "model.discriminator.x_widths=[4,8,8,8,8]", "model.discriminator.z_widths=[8]",
                 "model.discriminator.z_dropout=0.2", "model.discriminator.xz_widths=[8]",
                 "model.discriminator.embed_resolution=4"]
    elif choices.model in ("hvae", "hvae_celeba", "hvae_finetune"):  # 32x32, 3 stochastic layers
        if choices.model != "hvae_finetune":  # the fine-tuning takes its network from the pretrained run
            args += ["model.network.encoder_arch=32b1d4,8b1d8,1b1", "model.network.decoder_arch=1b1,8b1,32b1",
                     "model.network.widths=[4,8,8]", "model.network.latent_channels=2"]
        args += ["model.warmup_steps=1"] + (["model.elbo_batches=1"] if choices.model == "hvae_finetune" else [])
    if choices.callbacks == "editing":
        args += [f"callbacks.editing_metrics.oracle={oracle}", "callbacks.grid.n_images=4"]
    return args


def upstream_experiments(cfg, tmp: Path) -> list[str]:
    """Experiments whose runs ``cfg`` reads (``<runs_dir>/<experiment>/latest/...`` anywhere in its resolved
    config): the stage-1 model of a fine-tuning, the predictors of a metric, the flows of an SCM."""
    text = OmegaConf.to_yaml(cfg)
    return sorted(set(re.findall(rf"{re.escape(str(tmp))}/runs/([A-Za-z0-9_]+)/latest/", text)))


def ensure_upstream_runs(name: str, tmp: Path, celeba_root: Path | None = None, oracle: str | None = None,
                         overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Train, tiny and in ``tmp``, every experiment that ``name`` reads the run of (recursively), so that a
    stage-2 experiment finds its stage-1 checkpoints."""
    from experiments.runner import run

    cfg = compose(name, [*tiny_overrides(name, tmp, celeba_root, oracle), *overrides])
    for up in upstream_experiments(cfg, tmp):
        if (tmp / "runs" / up / "latest").exists():
            continue
        ensure_upstream_runs(up, tmp, celeba_root, oracle)
        run(compose(up, [*tiny_overrides(up, tmp, celeba_root, oracle), "trainer.max_epochs=1",
                         "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                         "trainer.limit_test_batches=1", "run_id=upstream"]))
