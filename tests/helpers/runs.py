"""Overrides that shrink any experiment to seconds on a CPU, for end-to-end runner tests."""

from __future__ import annotations

from pathlib import Path

from configs.loader import compose


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
    if choices.data == "synthetic_faces":
        args += ["data.builder.n_train=48", "data.builder.n_val=16", "data.builder.n_test=16"]
    elif choices.data == "celeba":
        if celeba_root is None:
            raise ValueError(f"{name} reads CelebA: pass celeba_root")
        args += [f"data.root={celeba_root}"]
    if choices.model == "ifcvae":
        args += ["model._width=8", "model._latent=8"]
    elif choices.model == "classifier":
        args += ["model.network.base_width=8"]
    if choices.callbacks == "editing":
        args += [f"callbacks.editing_metrics.oracle={oracle}", "callbacks.grid.n_images=4"]
    return args
