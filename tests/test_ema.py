"""EMA of a network's weights: the update rule by hand, evaluation with the average, checkpoint round trips."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.ema import EMAMixin, ExponentialMovingAverage


def test_update_rule_by_hand():
    net = nn.Linear(1, 1, bias=False)
    ema = ExponentialMovingAverage(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(2.0)
    ema.update(net)  # the first update copies
    assert ema.module.weight.item() == pytest.approx(2.0)
    with torch.no_grad():
        net.weight.fill_(4.0)
    ema.update(net)  # 0.9 * 2 + 0.1 * 4
    assert ema.module.weight.item() == pytest.approx(2.2)
    assert ema.n_updates == 2
    assert not any(p.requires_grad for p in ema.parameters())


def test_buffers_are_averaged_too():
    net = nn.BatchNorm1d(1)
    ema = ExponentialMovingAverage(net, decay=0.5)
    ema.update(net)
    net.running_mean.fill_(2.0)
    ema.update(net)
    assert ema.module.running_mean.item() == pytest.approx(1.0)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_decay_outside_the_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        ExponentialMovingAverage(nn.Linear(1, 1), decay)


class Regressor(EMAMixin, pl.LightningModule):
    """y = w x with automatic optimization: the mixin's on_train_batch_end keeps the average."""

    def __init__(self, ema_decay: float | None = 0.9):
        super().__init__()
        self.net = nn.Linear(1, 1)
        self.init_ema("net", ema_decay)
        self.save_hyperparameters()

    def forward(self, x):
        return self.ema_network()(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def fit(model, tmp_path, steps: int = 5) -> pl.Trainer:
    x = torch.linspace(-1, 1, 8)[:, None]
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TensorDataset(x, 3 * x), batch_size=8))
    return trainer


def test_training_updates_the_average_and_evaluation_uses_it(tmp_path):
    torch.manual_seed(0)
    model = Regressor()
    fit(model, tmp_path)
    assert model.ema.n_updates == 5
    assert not torch.equal(model.ema.module.weight, model.net.weight)
    x = torch.ones(1, 1)
    model.train()
    assert torch.equal(model(x), model.net(x))
    model.eval()
    assert torch.equal(model(x), model.ema.module(x))


def test_checkpoints_hold_and_restore_the_average(tmp_path):
    torch.manual_seed(0)
    model = Regressor()
    trainer = fit(model, tmp_path)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = Regressor.load_from_checkpoint(tmp_path / "m.ckpt")
    for a, b in zip(model.ema.state_dict().values(), restored.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert restored.ema.n_updates == 5


def test_a_checkpoint_without_average_starts_it_from_the_raw_weights(tmp_path):
    torch.manual_seed(0)
    plain = Regressor(ema_decay=None)
    fit(plain, tmp_path).save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.warns(UserWarning, match="no EMA weights"):
        restored = Regressor.load_from_checkpoint(tmp_path / "plain.ckpt", ema_decay=0.9)
    assert torch.equal(restored.ema.module.weight, plain.net.weight)
