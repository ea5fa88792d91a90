"""The independent attribute classifier: the evaluation oracle of the IFcVAE-GAN paper's §4.1.

"We train an independent classifier on real images to classify the presence (y = 1) or absence (y = 0) of a
desired attribute" and apply it to edited images to score Ĉ_Smiling / Ĉ_Not-Smiling. The official code's
classifier training code and weights are not published; this module trains one (one BCE-with-logits head per
attribute, Adam) from its own experiment, and the metric callbacks load it with
``AttributeClassifier.load_from_checkpoint(path)`` and use ``predict_attributes`` in eval mode under no_grad.

The network is a built module or a ``{"_target_": ..., **kwargs}`` dict; its config is stored as a
hyperparameter so that the checkpoint alone rebuilds it (``networks.blocks``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import BinaryAccuracy

from lightning_modules.base import binary_label_matrix, network_configs
from lightning_modules.losses import bce_with_logits
from lightning_modules.networks.blocks import build_network


class AttributeClassifier(pl.LightningModule):
    """Multi-label binary attribute classifier on real images in [0, 1].

    :param network: image [B, C, H, W] -> logits [B, len(attributes)] (e.g. ``ConvClassifier``).
    :param attributes: names of the binary attributes in ``batch["pa"]``, in the network's output order.
    :param lr: Adam learning rate.
    :param weight_decay: Adam (L2) weight decay.
    :param hflip: random horizontal flips of the training images (faces are roughly mirror-symmetric; turn
        it off for data where left and right matter, e.g. digits).
    """

    def __init__(
        self,
        network: nn.Module | Mapping[str, Any],
        attributes: Sequence[str],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        hflip: bool = False,
    ):
        super().__init__()
        self.network = build_network(network)
        self.attributes = [str(a) for a in attributes]
        n_outputs = getattr(self.network, "n_outputs", None)
        if n_outputs is not None and n_outputs != len(self.attributes):
            raise ValueError(
                f"network.n_outputs={n_outputs} but {len(self.attributes)} attributes were given"
            )
        self.save_hyperparameters(ignore=["network", "attributes"])
        self.save_hyperparameters({"attributes": self.attributes})
        self.save_hyperparameters(network_configs(self, ["network"]))
        # One metric per stage and attribute, indexed by position (a ModuleDict rejects names with dots).
        self.train_acc = nn.ModuleList(BinaryAccuracy() for _ in self.attributes)
        self.val_acc = nn.ModuleList(BinaryAccuracy() for _ in self.attributes)
        self.test_acc = nn.ModuleList(BinaryAccuracy() for _ in self.attributes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The network's penultimate features [B, D] (a feature space for FID on the classifier's domain)."""
        features = getattr(self.network, "features", None)
        if features is None:
            raise TypeError(f"{type(self.network).__name__} has no `features` method: it cannot serve as a "
                            "feature extractor (use ConvClassifier)")
        return features(x)

    def predict_attributes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: P(attribute = 1 | x)} with tensors [B]."""
        probs = torch.sigmoid(self.network(x))
        return {name: probs[:, i] for i, name in enumerate(self.attributes)}

    def _targets(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return binary_label_matrix(pa, self.attributes, "AttributeClassifier")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, y = batch["x"], self._targets(batch["pa"])
        if self.hparams.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        logits = self.network(x)
        loss = bce_with_logits(logits, y)
        self.log("train/loss", loss, batch_size=x.shape[0])
        self._update_accuracy(logits.detach(), y, self.train_acc)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def _eval_step(self, batch: dict[str, Any], stage: str, metrics: nn.ModuleList) -> None:
        x, y = batch["x"], self._targets(batch["pa"])
        logits = self.network(x)
        self.log(f"{stage}/loss", bce_with_logits(logits, y), batch_size=x.shape[0])
        self._update_accuracy(logits, y, metrics)

    @staticmethod
    def _update_accuracy(logits: torch.Tensor, y: torch.Tensor, metrics: nn.ModuleList) -> None:
        # Probabilities, not logits: BinaryAccuracy applies a sigmoid only when some value lies outside [0, 1].
        probs = torch.sigmoid(logits)
        for i, metric in enumerate(metrics):
            metric.update(probs[:, i], y[:, i].long())

    def on_train_epoch_end(self) -> None:
        # The training accuracy as it is usually reported (CDVAE-GAN Table 3's Train column): over the epoch's
        # batches as they were trained on (train mode, augmented, weights changing within the epoch).
        self._log_accuracy("train", self.train_acc)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val", self.val_acc)

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test", self.test_acc)

    def _log_accuracy(self, stage: str, metrics: nn.ModuleList) -> None:
        """Accuracy over the whole epoch (not a mean of batch accuracies), per attribute and averaged."""
        accs = [metric.compute() for metric in metrics]
        for name, acc in zip(self.attributes, accs, strict=True):
            self.log(f"{stage}/acc/{name}", acc)
        self.log(f"{stage}/acc_mean", torch.stack(accs).mean())
        for metric in metrics:
            metric.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.network.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
