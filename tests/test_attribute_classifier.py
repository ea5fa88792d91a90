"""AttributeClassifier: learns a separable problem, logs per-attribute accuracy, round-trips a checkpoint."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules.attribute_classifier import AttributeClassifier
from lightning_modules.networks.classifiers import ConvClassifier

SIZE = 16
ATTRS = ["Smiling", "Eyeglasses"]


class TwoSquares(Dataset):
    """Noise images; a bright square top-left iff Smiling, bottom-right iff Eyeglasses (independent)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n, 2), generator=g).float()
        self.x = 0.4 * torch.rand(n, 3, SIZE, SIZE, generator=g)
        self.x[self.y[:, 0] == 1, :, 1:6, 1:6] += 0.5
        self.x[self.y[:, 1] == 1, :, 10:15, 10:15] += 0.5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "pa": dict(zip(ATTRS, self.y[i], strict=True)), "index": i}


def make_trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def make_classifier(**kwargs) -> AttributeClassifier:
    network = ConvClassifier(SIZE, 3, base_width=8, n_outputs=len(ATTRS), dropout=0.1)
    return AttributeClassifier(network, ATTRS, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    tmp_path = tmp_path_factory.mktemp("classifier")
    model = make_classifier(lr=3e-3, hflip=False)
    trainer = make_trainer(tmp_path, max_epochs=4)
    trainer.fit(model, DataLoader(TwoSquares(256, seed=0), batch_size=32, shuffle=True))
    path = tmp_path / "classifier.ckpt"
    trainer.save_checkpoint(path)
    return model, trainer, path


def test_fits_a_separable_problem(trained):
    model, trainer, _ = trained
    val = DataLoader(TwoSquares(128, seed=1), batch_size=64)
    (metrics,) = trainer.validate(model, val, verbose=False)
    for name in ATTRS:
        assert metrics[f"val/acc/{name}"] > 0.95
    assert metrics["val/acc_mean"] > 0.95 and "val/loss" in metrics
    (test,) = trainer.test(model, val, verbose=False)
    assert test["test/acc/Smiling"] == metrics["val/acc/Smiling"]


def test_checkpoint_round_trip(trained):
    model, _, path = trained
    loaded = AttributeClassifier.load_from_checkpoint(path).eval()
    model.eval()
    assert loaded.attributes == ATTRS and dict(loaded.hparams) == dict(model.hparams)
    x = TwoSquares(16, seed=2).x
    with torch.no_grad():
        ours, theirs = model.predict_attributes(x), loaded.predict_attributes(x)
    assert list(theirs) == ATTRS
    for name in ATTRS:
        assert theirs[name].shape == (16,)
        assert torch.equal(ours[name], theirs[name])


def test_hflip_training_step_runs_and_mismatch_is_rejected(tmp_path):
    torch.manual_seed(0)
    model = make_classifier(hflip=True)
    make_trainer(tmp_path, max_steps=2).fit(model, DataLoader(TwoSquares(16, seed=0), batch_size=8))
    with pytest.raises(ValueError, match="n_outputs"):
        AttributeClassifier(ConvClassifier(SIZE, 3, 8, n_outputs=3), ATTRS)
    with pytest.raises(KeyError, match="Eyeglasses"):
        model._targets({"Smiling": torch.zeros(2)})


def test_training_accuracy_is_over_the_epochs_batches(tmp_path):
    # lr = 0 and a network without dropout or BatchNorm: the weights the epoch trains on are the initial ones,
    # so the logged training accuracy must equal the accuracy of those weights over all training images.
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, len(ATTRS)))
    model = AttributeClassifier(network, ATTRS, lr=0.0)
    data = TwoSquares(40, seed=3)
    with torch.no_grad():
        expected = ((network(data.x) > 0).float() == data.y).float().mean(0)
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, DataLoader(data, batch_size=16))
    logged = trainer.callback_metrics
    for i, name in enumerate(ATTRS):
        assert logged[f"train/acc/{name}"].item() == pytest.approx(expected[i].item(), abs=1e-6)
    assert logged["train/acc_mean"].item() == pytest.approx(expected.mean().item(), abs=1e-6)
