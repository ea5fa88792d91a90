"""A callback that presses Ctrl-C in the middle of training, for interruption and resume tests."""

from __future__ import annotations

import pytorch_lightning as pl


class InterruptAt(pl.Callback):
    """Raise KeyboardInterrupt (what Ctrl-C raises) before training batch ``batch`` (counted over all epochs)."""

    def __init__(self, batch: int) -> None:
        self.batch, self.seen = batch, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.seen == self.batch:
            raise KeyboardInterrupt
        self.seen += 1
