"""IFcVAE-GAN's four manual optimizer steps under 2-process CPU DDP (gloo): training runs and the replicas stay
identical (gradients are all-reduced for every player)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from configs.loader import compose, instantiate
from tests.helpers.celeba_layout import write_tiny_celeba


class ParameterDigest(pl.Callback):
    """Every rank sums its parameters at the end of training; rank 0 gets all the sums back."""

    def on_train_end(self, trainer, pl_module):
        total = torch.stack([p.detach().double().sum() for p in pl_module.parameters()]).sum()
        gathered = trainer.strategy.all_gather(total)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            torch.save(gathered.cpu(), trainer.default_root_dir + "/digest.pt")


@pytest.mark.slow
def test_ifcvae_trains_under_ddp_and_replicas_agree(tmp_path):
    root = write_tiny_celeba(tmp_path / "celeba", n_train=16, n_val=4, n_test=4, image_size=32)
    cfg = compose("ifcvae_smiling", [f"data.root={root}", "data.crop_size=null", "data.image_size=32",
                                     "data.num_workers=0", "data.batch_size=4", "model._width=8", "model._latent=8"])
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn_find_unused_parameters_true",
                         max_steps=8, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=str(tmp_path), callbacks=[ParameterDigest()])
    trainer.fit(model, datamodule=datamodule)
    digest = torch.load(tmp_path / "digest.pt")
    assert digest.shape == (2,) and torch.isfinite(digest).all()
    assert digest[0] == digest[1], "replicas diverged: some player's gradients were not synchronised"
