"""AttributeEditingMetrics and CounterfactualGrid on a fake model, a fake oracle and a tiny in-memory DataModule.

Every pixel value in these fixtures is a multiple of 1/16, so sums of squared and absolute errors are exact
in floating point and the logged values can be compared with independent NumPy computations.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from callbacks.editing_metrics import AttributeEditingMetrics, evaluation_mode
from callbacks.image_grids import CounterfactualGrid
from callbacks.logging_utils import image_to_uint8, log_image, log_table
from datamodules.base import Attribute, CounterfactualDataModule
from lightning_modules.base import CounterfactualModule

ATTR = "Smiling"
RENDER_SHIFT = 2 / 16  # how much the attribute brightens (y=1) or darkens (y=0) the left half of an image
EDIT_SHIFT = 3 / 16  # how much the fake model brightens (do=1) or darkens (do=0) a whole image
CHANNELS, SIZE = 3, 4
OTHER = "Bright"  # a second, never intervened attribute: the identity's brightness is above 1/2


# -- fakes ------------------------------------------------------------------------------------------------
class _Split(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, rows: range) -> None:
        self.images, self.labels, self.rows = images, labels, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"x": self.images[row], "pa": {ATTR: self.labels[row]}, "index": torch.tensor(row)}


class StridedSampler(Sampler[int]):
    """Process ``rank`` of ``world`` gets items rank, rank + world, ...: every item exactly once, no padding."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class TinyEditingData(CounterfactualDataModule):
    """Rows [0, n_val) are validation (and the training split), [n_val, n_val + n_test) test; image =
    render(identity, Smiling).

    Each identity is a per-image brightness (3/16 .. 13/16) plus per-pixel jitter of ±1/16, clamped to
    [2/16, 14/16]; rendering adds ±RENDER_SHIFT to the left half of the columns (the attribute's "mouth": the
    intervention changes those pixels only), so images stay in [0, 1] and exact on a 1/16 grid.
    ``attribute_labels`` also knows ``OTHER`` (brightness above 1/2), which no intervention changes.
    """

    attributes = (Attribute(ATTR),)

    def __init__(self, n_val: int = 10, n_test: int = 7, batch_size: int = 4, true_counterfactuals: bool = True,
                 seed: int = 0, size: int = SIZE) -> None:
        super().__init__()
        self.n_val, self.n_test, self.batch_size, self.size = n_val, n_test, batch_size, size
        self._has_truth = true_counterfactuals
        g = torch.Generator().manual_seed(seed)
        n = n_val + n_test
        brightness = torch.randint(3, 14, (n, 1, 1, 1), generator=g)
        jitter = torch.randint(-1, 2, (n, CHANNELS, size, size), generator=g)
        self.identity = ((brightness + jitter).clamp(2, 14) / 16).float()
        self.bright = (brightness.flatten() > 8).float()
        self.labels = (torch.arange(n) % 3 != 0).float()  # both classes, mostly positive
        self.images = self.render(torch.arange(n), self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return CHANNELS, self.size, self.size

    @property
    def has_true_counterfactuals(self) -> bool:
        return self._has_truth

    def render(self, index: torch.Tensor, smiling: torch.Tensor) -> torch.Tensor:
        mouth = torch.zeros(1, 1, 1, self.size)
        mouth[..., : self.size // 2] = 1.0
        return self.identity[index] + RENDER_SHIFT * (2 * smiling.view(-1, 1, 1, 1) - 1) * mouth

    def attribute_labels(self, index: torch.Tensor, names) -> torch.Tensor:
        table = {ATTR: self.labels, OTHER: self.bright}
        return torch.stack([table[n][index] for n in names], dim=1)

    def true_counterfactual(self, index: torch.Tensor, do: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self._has_truth:
            raise NotImplementedError
        assert index.device.type == "cpu"
        return self.render(index, do[ATTR])

    def _rows(self, split: str) -> range:
        return range(self.n_val, self.n_val + self.n_test) if split == "test" else range(self.n_val)

    def _build_split(self, split: str) -> Dataset:
        return _Split(self.images, self.labels, self._rows(split))

    def _loader(self, rows: range) -> DataLoader:
        split = _Split(self.images, self.labels, rows)
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = StridedSampler(len(split), torch.distributed.get_rank(), torch.distributed.get_world_size())
        return DataLoader(split, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(range(self.n_val))

    def val_dataloader(self) -> DataLoader:
        return self._loader(range(self.n_val))

    def test_dataloader(self) -> DataLoader:
        return self._loader(range(self.n_val, self.n_val + self.n_test))


class FakeEditor(CounterfactualModule):
    """abduct = identity; predict brightens (attr=1) or darkens (attr=0) by EDIT_SHIFT, clamped to [0, 1].

    Its own classifier E_y calls an image positive when its first pixel is above 0.5. With ``noisy`` it draws
    (and ignores) random numbers, to check that callbacks leave the global RNG alone.
    """

    def __init__(self, noisy: bool = False) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.noisy = noisy

    def abduct(self, x, pa):
        return x + 0 * torch.rand_like(x) if self.noisy else x

    def predict(self, noise, pa):
        y = pa[ATTR].view(-1, 1, 1, 1)
        return (self.gain * noise + EDIT_SHIFT * (2 * y - 1)).clamp(0, 1)

    def predict_attributes(self, x):
        return {ATTR: torch.where(x[:, 0, 0, 0] > 0.5, 0.9, 0.1)}

    def training_step(self, batch, batch_idx):
        return (self.gain * batch["x"]).mean() - 0.5

    def validation_step(self, batch, batch_idx):
        return None

    def test_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class FakeEditorWithoutClassifier(FakeEditor):
    predict_attributes = CounterfactualModule.predict_attributes


class FakeOracle(nn.Module):
    """Probability of the attribute = sigmoid(k · (mean pixel − 0.5)): positive iff the mean exceeds 0.5; of
    ``OTHER``, the same of the right half's mean (which the attribute does not touch)."""

    attributes = (ATTR, OTHER)

    def __init__(self, k: float = 20.0) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))

    def predict_attributes(self, x):
        right = x[..., x.shape[-1] // 2:]
        return {ATTR: torch.sigmoid(self.k * (x.mean(dim=(1, 2, 3)) - 0.5)),
                OTHER: torch.sigmoid(self.k * (right.mean(dim=(1, 2, 3)) - 0.5))}


# -- hand computation -------------------------------------------------------------------------------------
def fake_editor_outputs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FakeEditor's reconstruction, do(0) and do(1) of images ``x`` with labels ``y``, by hand."""
    sign = (2 * y - 1)[:, None, None, None]
    return np.clip(x + EDIT_SHIFT * sign, 0, 1), np.clip(x - EDIT_SHIFT, 0, 1), np.clip(x + EDIT_SHIFT, 0, 1)


def expected_metrics(data: TinyEditingData, rows: range, stage: str, oracle: bool = True, e_y: bool = True,
                     true_cf: bool = True, outputs=fake_editor_outputs, preserved: bool = False,
                     prefix: str = "") -> dict[str, float]:
    """The callback's values computed independently with NumPy over the whole evaluated set; ``outputs`` gives
    the subject's (reconstruction, do(0), do(1)), ``prefix`` the reference part of the keys (``reference/x/``),
    whose oracle and E_y accuracies on real images are the model's only."""
    x = data.images[list(rows)].double().numpy()
    y = data.labels[list(rows)].double().numpy()
    x_hat, edit_0, edit_1 = outputs(x, y)
    model = not prefix

    def oracle_positive(images):
        return images.mean(axis=(1, 2, 3)) > 0.5

    positive = y == 1
    model_flip = np.where(positive[:, None, None, None], edit_0, edit_1)
    out = {f"{stage}/n_images": float(len(y)), f"{stage}/mse": float(((x_hat - x) ** 2).mean())}
    if oracle:
        out.update({
            f"{stage}/edit/{ATTR}/C_pos_paper": float(oracle_positive(edit_1)[positive].mean()),
            f"{stage}/edit/{ATTR}/C_neg_paper": float((~oracle_positive(edit_0))[positive].mean()),
            f"{stage}/edit/{ATTR}/C_pos_all": float(oracle_positive(edit_1).mean()),
            f"{stage}/edit/{ATTR}/C_neg_all": float((~oracle_positive(edit_0)).mean()),
            f"{stage}/edit/{ATTR}/n_paper": float(positive.sum()),
            f"{stage}/edit/{ATTR}/flip_acc": float(np.where(positive, ~oracle_positive(edit_0),
                                                            oracle_positive(edit_1)).mean()),
            f"{stage}/acc/oracle_on_recon/{ATTR}": float((oracle_positive(x_hat) == positive).mean()),
        })
        if model:
            out[f"{stage}/acc/oracle/{ATTR}"] = float((oracle_positive(x) == positive).mean())
    if e_y and model:
        out[f"{stage}/acc/E_y/{ATTR}"] = float(((x[:, 0, 0, 0] > 0.5) == positive).mean())
    if true_cf:
        truth = data.render(torch.as_tensor(list(rows)), 1 - data.labels[list(rows)]).double().numpy()
        out[f"{stage}/true_cf/mse"] = float(((model_flip - truth) ** 2).mean())
        out[f"{stage}/true_cf/l1"] = float(np.abs(model_flip - truth).mean())
        # the intervention changes the left half (every channel) of every image, nothing else
        inside = np.zeros_like(x, dtype=bool)
        inside[..., : x.shape[-1] // 2] = True
        out[f"{stage}/true_cf/effect_mse"] = float(((model_flip - truth) ** 2)[inside].mean())
        out[f"{stage}/true_cf/effect_l1"] = float(np.abs(model_flip - truth)[inside].mean())
        out[f"{stage}/true_cf/preservation_mse"] = float(((model_flip - x) ** 2)[~inside].mean())
        out[f"{stage}/true_cf/preservation_l1"] = float(np.abs(model_flip - x)[~inside].mean())
        out[f"{stage}/true_cf/changed_fraction"] = 0.5
        if oracle and model:
            out[f"{stage}/acc/oracle_on_true_cf/{ATTR}"] = float((oracle_positive(truth) == ~positive).mean())
    if preserved:
        bright = data.bright[list(rows)].numpy() == 1
        kept = float((oracle_positive(model_flip[..., x.shape[-1] // 2:]) == bright).mean())
        out[f"{stage}/preservation/{ATTR}/{OTHER}"] = kept
        out[f"{stage}/preservation/{ATTR}/mean"] = kept
    return {k.replace(f"{stage}/", f"{stage}/{prefix}", 1): v for k, v in out.items()}


def make_trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def as_floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


# -- AttributeEditingMetrics ------------------------------------------------------------------------------
def test_expected_values_are_not_trivial() -> None:
    # The fixture exercises both outcomes of every rate, so the equality tests below mean something.
    data = TinyEditingData()
    for stage, rows in (("val", range(8)), ("test", range(10, 17))):
        values = expected_metrics(data, rows, stage)
        rates = [v for k, v in values.items() if "/C_" in k or "/acc/" in k]
        assert any(0 < v < 1 for v in rates), values
        assert values[f"{stage}/true_cf/mse"] > 0 and values[f"{stage}/mse"] > 0


def test_validate_logs_hand_computed_values(tmp_path) -> None:
    data = TinyEditingData(n_val=10, batch_size=4)
    callback = AttributeEditingMetrics(ATTR, oracle=FakeOracle(), limit_val_batches=2)
    logged = make_trainer(tmp_path, [callback]).validate(FakeEditor(), datamodule=data, verbose=False)[0]
    expected = expected_metrics(data, range(8), "val")  # 2 batches of 4
    assert as_floats(logged) == pytest.approx(expected, rel=1e-6)
    assert callback.results["val"] == pytest.approx(expected, rel=1e-12)


def test_test_uses_whole_set_and_stores_results(tmp_path) -> None:
    data = TinyEditingData(n_val=10, n_test=7, batch_size=3)  # batches of 3, 3, 1
    callback = AttributeEditingMetrics(ATTR, oracle=FakeOracle(), limit_val_batches=1)
    trainer = make_trainer(tmp_path, [callback], logger=CSVLogger(tmp_path))
    logged = trainer.test(FakeEditor(), datamodule=data, verbose=False)[0]
    expected = expected_metrics(data, range(10, 17), "test")
    assert callback.results["test"] == pytest.approx(expected, rel=1e-6)  # float32 metric states
    assert as_floats(logged) == pytest.approx(expected, rel=1e-6)
    assert set(as_floats(trainer.callback_metrics)) == set(expected)


def test_missing_capabilities_are_skipped_and_reported_once(tmp_path, monkeypatch) -> None:
    reports = []
    monkeypatch.setattr("callbacks.editing_metrics.rank_zero_info", reports.append)
    data = TinyEditingData(true_counterfactuals=False)
    callback = AttributeEditingMetrics(ATTR, oracle=None)
    trainer = make_trainer(tmp_path, [callback])
    model = FakeEditorWithoutClassifier()
    trainer.validate(model, datamodule=data, verbose=False)
    trainer.validate(model, datamodule=data, verbose=False)
    logged = trainer.test(model, datamodule=data, verbose=False)[0]
    expected = expected_metrics(data, range(10, 17), "test", oracle=False, e_y=False, true_cf=False)
    assert as_floats(logged) == pytest.approx(expected, rel=1e-6)
    assert set(callback.skipped) == {"oracle", "E_y", "true_cf", "preservation"}
    assert len(reports) == 4
    assert "ground-truth counterfactuals" in callback.skipped["true_cf"]


def test_empty_paper_subset_is_not_logged(tmp_path) -> None:
    data = TinyEditingData(n_val=10, batch_size=1)
    callback = AttributeEditingMetrics(ATTR, oracle=FakeOracle(), limit_val_batches=1)  # row 0: y = 0
    logged = make_trainer(tmp_path, [callback]).validate(FakeEditor(), datamodule=data, verbose=False)[0]
    assert logged[f"val/edit/{ATTR}/n_paper"] == 0
    assert f"val/edit/{ATTR}/C_pos_paper" not in logged and f"val/edit/{ATTR}/C_pos_all" in logged


def test_every_n_epochs_and_no_sanity_check(tmp_path) -> None:
    data = TinyEditingData()
    metrics = AttributeEditingMetrics(ATTR, oracle=FakeOracle(), every_n_epochs=2)
    grid = CounterfactualGrid(ATTR, n_images=2, every_n_epochs=2)
    trainer = make_trainer(tmp_path, [metrics, grid], max_epochs=3, limit_train_batches=1,
                           logger=CSVLogger(tmp_path, name="csv", version=0), log_every_n_steps=1)
    trainer.fit(FakeEditor(), datamodule=data)
    lines = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    epochs_with_mse = {int(row.split(",")[header.index("epoch")]) for row in lines[1:]
                       if row.split(",")[header.index("val/mse")]}
    assert epochs_with_mse == {1}
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["val_cf_grid_epoch001.png"]


def test_missing_oracle_file_fails_in_init(tmp_path) -> None:
    missing = tmp_path / "ckpt" / "classifier.ckpt"
    with pytest.raises(FileNotFoundError) as info:
        AttributeEditingMetrics(ATTR, oracle=str(missing), oracle_experiment="classifier_smiling_synth")
    assert str(missing) in str(info.value)
    assert "make train EXP=classifier_smiling_synth" in str(info.value)


def test_oracle_from_path_stays_out_of_the_model(tmp_path, monkeypatch) -> None:
    checkpoint = tmp_path / "oracle.ckpt"
    checkpoint.write_bytes(b"")
    oracle = FakeOracle()
    loaded = []
    monkeypatch.setattr("callbacks.editing_metrics.load_oracle", lambda path: loaded.append(path) or oracle)
    callback = AttributeEditingMetrics(ATTR, oracle=checkpoint)
    model, data = FakeEditor(), TinyEditingData()
    trainer = make_trainer(tmp_path, [callback])
    trainer.validate(model, datamodule=data, verbose=False)
    assert loaded == [checkpoint]
    assert not oracle.training and not any(p.requires_grad for p in oracle.parameters())
    assert all(m is not oracle for m in model.modules())
    assert set(model.state_dict()) == {"gain"}
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    saved = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == {"gain"}
    assert all(not state for state in saved.get("callbacks", {}).values())


def test_real_attribute_classifier_as_oracle(tmp_path) -> None:
    classifier_module = pytest.importorskip("lightning_modules.attribute_classifier")
    from lightning_modules.networks.classifiers import ConvClassifier

    data = TinyEditingData(size=8)
    classifier = classifier_module.AttributeClassifier(ConvClassifier(8, CHANNELS, base_width=4, n_outputs=1),
                                                       [ATTR])
    trainer = make_trainer(tmp_path, [])
    trainer.validate(classifier, datamodule=data, verbose=False)
    checkpoint = tmp_path / "classifier.ckpt"
    trainer.save_checkpoint(checkpoint)

    callback = AttributeEditingMetrics(ATTR, oracle=str(checkpoint))
    logged = make_trainer(tmp_path, [callback]).test(FakeEditor(), datamodule=data, verbose=False)[0]
    classifier.eval()
    with torch.no_grad():
        probs = classifier.predict_attributes(data.images[10:17])[ATTR]
    accuracy = ((probs > 0.5).float() == data.labels[10:17]).float().mean().item()
    assert logged[f"test/acc/oracle/{ATTR}"] == pytest.approx(accuracy, rel=1e-6)
    assert f"test/edit/{ATTR}/C_pos_all" in logged


def test_load_frozen_leaves_the_global_rng_alone(tmp_path) -> None:
    from callbacks.editing_metrics import load_frozen, load_oracle
    from lightning_modules.attribute_classifier import AttributeClassifier
    from lightning_modules.networks.classifiers import ConvClassifier

    classifier = AttributeClassifier(ConvClassifier(8, CHANNELS, base_width=4, n_outputs=1), [ATTR])
    checkpoint = tmp_path / "classifier.ckpt"
    trainer = make_trainer(tmp_path, [])
    trainer.validate(classifier, datamodule=TinyEditingData(size=8), verbose=False)
    trainer.save_checkpoint(checkpoint)
    state = torch.get_rng_state()
    frozen = load_frozen(checkpoint)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in frozen.state_dict().items())
    load_oracle(checkpoint)  # the published runs' loader draws the initial weights from it
    assert not torch.equal(torch.get_rng_state(), state)


def test_attribute_classifier_features_are_the_heads_input() -> None:
    from lightning_modules.attribute_classifier import AttributeClassifier
    from lightning_modules.networks.classifiers import ConvClassifier

    classifier = AttributeClassifier(ConvClassifier(8, CHANNELS, base_width=4, n_outputs=2), [ATTR, "other"]).eval()
    x = torch.rand(5, CHANNELS, 8, 8)
    with torch.no_grad():
        features = classifier.features(x)
        assert features.shape == (5, classifier.network.trunk.out_features)
        assert torch.allclose(classifier.network.head(features), classifier(x))
    headless = AttributeClassifier(nn.Sequential(nn.Flatten(), nn.Linear(CHANNELS * 64, 1)), [ATTR])
    with pytest.raises(TypeError, match="has no `features` method"):
        headless.features(x)


def test_callbacks_leave_global_rng_and_modes_untouched(tmp_path) -> None:
    def rng_after_validate(callbacks) -> torch.Tensor:
        torch.manual_seed(123)
        make_trainer(tmp_path, callbacks).validate(FakeEditor(noisy=True), datamodule=TinyEditingData(),
                                                   verbose=False)
        return torch.get_rng_state()

    with_callbacks = rng_after_validate([AttributeEditingMetrics(ATTR, oracle=FakeOracle()),
                                         CounterfactualGrid(ATTR, n_images=2)])
    assert torch.equal(with_callbacks, rng_after_validate([]))

    model = nn.Sequential(nn.Linear(1, 1), nn.Dropout())
    model[1].eval()  # a frozen part must stay frozen after evaluation
    before = torch.get_rng_state()
    with evaluation_mode(model, seed=5):
        assert not any(m.training for m in model.modules())
        torch.rand(3)
    assert [m.training for m in model.modules()] == [True, True, False]
    assert torch.equal(torch.get_rng_state(), before)


# -- CounterfactualGrid -----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_truth", [True, False], ids=["true_cf", "no_true_cf"])
def test_grid_png_layout(tmp_path, with_truth) -> None:
    data = TinyEditingData(n_val=10, n_test=7, batch_size=4, true_counterfactuals=with_truth)
    grid = CounterfactualGrid(ATTR, n_images=3)
    trainer = make_trainer(tmp_path, [grid])
    trainer.validate(FakeEditor(), datamodule=data, verbose=False)
    trainer.test(FakeEditor(), datamodule=data, verbose=False)

    columns = 5 if with_truth else 4
    pad, tile = 2, SIZE + 2  # make_grid puts `pad` pixels around and between tiles
    for path, first_row in ((tmp_path / "images" / "val_cf_grid_epoch000.png", 0),
                            (tmp_path / "images" / "test_cf_grid.png", 10)):
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (3 * tile + pad, columns * tile + pad, 3)

        def cell(row: int, column: int, pixels: np.ndarray = pixels) -> np.ndarray:
            top, left = pad + row * tile, pad + column * tile
            return pixels[top:top + SIZE, left:left + SIZE]

        index = first_row + 1  # second row of the grid
        y = data.labels[index]
        assert np.array_equal(cell(1, 0), image_to_uint8(data.images[index]))
        assert np.array_equal(cell(1, 3), image_to_uint8((data.images[index] + EDIT_SHIFT).clamp(0, 1)))
        if with_truth:
            truth = data.render(torch.tensor([index]), 1 - y.view(1))[0]
            assert np.array_equal(cell(1, 4), image_to_uint8(truth))


# -- logging helpers --------------------------------------------------------------------------------------
class RecordingWandbLogger(WandbLogger):
    """A WandbLogger whose final write is recorded instead of sent, so no W&B run is started."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.records = []

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((metrics, step))


def test_log_helpers_use_only_loggers_that_support_them(tmp_path) -> None:
    import wandb

    recorder = RecordingWandbLogger(offline=True, save_dir=str(tmp_path))
    trainer = SimpleNamespace(is_global_zero=True, loggers=[CSVLogger(tmp_path), recorder])
    image = torch.rand(3, 6, 10, generator=torch.Generator().manual_seed(0))
    assert log_image(trainer, "val/cf_grid/Smiling", image, step=7) == ["RecordingWandbLogger"]
    assert log_table(trainer, "test/table", ["metric", "value"], [["mse", 0.5]], step=7) == ["RecordingWandbLogger"]
    (images, step), (tables, _) = recorder.records
    assert step == 7 and isinstance(images["val/cf_grid/Smiling"][0], wandb.Image)
    assert isinstance(tables["test/table"], wandb.Table)
    with pytest.raises(ValueError, match="cells"):
        log_table(trainer, "bad", ["a", "b"], [[1]])
    assert log_image(SimpleNamespace(is_global_zero=False, loggers=[recorder]), "k", image) == []


def test_intervention_values_by_kind() -> None:
    from callbacks.image_grids import intervention_values
    from datamodules.base import Attribute, equal_width_bins

    assert intervention_values(Attribute("s", "binary")) == [0.0, 1.0]
    assert intervention_values(Attribute("d", "categorical", num_classes=3)) == [0.0, 1.0, 2.0]
    assert intervention_values(Attribute("t", "continuous", low=0.0, high=10.0), k=3) == [-1.0, 0.0, 1.0]
    # ten bins over [0, 10]: centres 0.5 .. 9.5; five of them evenly: 0.5, 2.5, 4.5, 7.5, 9.5 (indices 0,2,4,7,9)
    binned = Attribute("t", "continuous", low=0.0, high=10.0, bins=equal_width_bins(0.0, 10.0, 10))
    raw = [0.5, 2.5, 4.5, 7.5, 9.5]
    assert intervention_values(binned, k=5) == pytest.approx([r / 5.0 - 1.0 for r in raw])


@pytest.mark.parametrize("with_truth", [True, False], ids=["true_cf", "no_true_cf"])
def test_intervention_grid_per_parent(tmp_path, with_truth) -> None:
    data = TinyEditingData(n_val=10, n_test=7, batch_size=4, true_counterfactuals=with_truth)
    grid = CounterfactualGrid(ATTR, n_images=3, intervene=[ATTR])
    trainer = make_trainer(tmp_path, [grid])
    trainer.test(FakeEditor(), datamodule=data, verbose=False)

    pixels = np.asarray(Image.open(tmp_path / "images" / f"test_do_{ATTR}.png"))
    columns = 5 if with_truth else 3  # factual | do(0) | do(1) [| truth(0) | truth(1)]
    pad, tile = 2, SIZE + 2
    assert pixels.shape == (3 * tile + pad, columns * tile + pad, 3)

    def cell(row: int, column: int) -> np.ndarray:
        top, left = pad + row * tile, pad + column * tile
        return pixels[top:top + SIZE, left:left + SIZE]

    index = 10 + 2  # third test row
    image = data.images[index]
    assert np.array_equal(cell(2, 0), image_to_uint8(image))
    assert np.array_equal(cell(2, 1), image_to_uint8((image - EDIT_SHIFT).clamp(0, 1)))
    assert np.array_equal(cell(2, 2), image_to_uint8((image + EDIT_SHIFT).clamp(0, 1)))
    if with_truth:
        for column, value in ((3, 0.0), (4, 1.0)):
            truth = data.render(torch.tensor([index]), torch.tensor([value]))[0]
            assert np.array_equal(cell(2, column), image_to_uint8(truth))
