"""The counterfactual-metrics callback end to end, on a model whose counterfactuals are exact by construction.

Images carry their parents in two pixels: x[0, 0, 0] = b (binary) and x[0, 0, 1] = (c + 1) / 2 (continuous,
normalised); the rest is identity texture. ``WritingModel`` abducts the image and predicts by writing the
parents into those pixels, so its counterfactuals are exactly the true ones, and ``ReadingPredictors`` reads
them back: composition, reversibility and the true-counterfactual error are 0, effectiveness is perfect.
``LazyModel`` never changes the image: its edits fail, which the same metrics must show.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from callbacks.counterfactual_metrics import CounterfactualMetrics
from datamodules.base import ArrayDataset, Attribute, CounterfactualDataModule, equal_width_bins
from lightning_modules.base import CounterfactualModule

B = Attribute("b")
# pixel = (c_norm + 1) / 2 = c_raw / 2.55: the raw values below are whole grey levels, exact in uint8
C = Attribute("c", "continuous", low=0.0, high=2.55, bins=equal_width_bins(0.0, 2.55, 4))
N, SIZE = 24, 6


def _write(x: torch.Tensor, pa: dict[str, torch.Tensor]) -> torch.Tensor:
    x = x.clone()
    x[:, 0, 0, 0] = pa["b"].to(x.dtype)
    x[:, 0, 0, 1] = (pa["c"].to(x.dtype) + 1) / 2
    return x


class PixelParentsData(CounterfactualDataModule):
    attributes = (B, C)

    def __init__(self) -> None:
        super().__init__(batch_size=5)
        g = torch.Generator().manual_seed(0)
        self.texture = torch.randint(0, 16, (N, 1, SIZE, SIZE), generator=g).float() * 17 / 255  # grey levels
        self.b = (torch.arange(N) % 2).float()
        self.c_raw = torch.tensor([0.51, 1.02, 1.53, 2.04]).repeat(N // 4)  # one per bin

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, SIZE, SIZE)

    @property
    def has_true_counterfactuals(self) -> bool:
        return True

    def render(self, index: torch.Tensor, pa: dict[str, torch.Tensor]) -> torch.Tensor:
        return _write(self.texture[index], pa)

    def _build_split(self, split: str) -> ArrayDataset:
        rows = torch.arange(N)
        pa = {"b": self.b, "c": C.normalise(self.c_raw)}
        images = (self.render(rows, pa) * 255).round().to(torch.uint8)
        return ArrayDataset(images, {"b": self.b, "c": self.c_raw}, rows, self.attributes)

    def true_counterfactual(self, index: torch.Tensor, do: dict[str, torch.Tensor]) -> torch.Tensor:
        pa = {"b": self.b[index], "c": C.normalise(self.c_raw[index])}
        return self.render(index, {**pa, **do})


class WritingModel(CounterfactualModule):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)  # must stay untouched by the metrics

    def abduct(self, x, pa):
        return x

    def predict(self, noise, pa):
        return _write(noise, pa)

    def test_step(self, batch, batch_idx):
        return None


class LazyModel(WritingModel):
    def predict(self, noise, pa):
        return noise


class ReadingPredictors(nn.Module):
    def predict_parents(self, x, pa=None):
        return {"b": (x[:, 0, 0, 0] > 0.5).float(), "c": x[:, 0, 0, 1] * 2 - 1}

    def features(self, x):
        return x.flatten(1)


class PixelVAE(nn.Module):
    def posterior(self, x):
        return x.flatten(1), torch.zeros_like(x.flatten(1))


def _run(model: CounterfactualModule, root, **kwargs) -> dict[str, float]:
    callback = CounterfactualMetrics(predictors=ReadingPredictors(), vae=PixelVAE(), composition_m=(1, 3),
                                     distances=("l1", "embedding"), fid="fid_domain", fid_real="eval", **kwargs)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=root)
    trainer.test(model, datamodule=PixelParentsData(), verbose=False)
    return callback.results["test"]


def test_an_exact_model_scores_perfectly(tmp_path):
    model = WritingModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = _run(model, tmp_path)
    for key in ("composition/l1/1", "composition/l1/3", "composition/embedding/3", "reversibility/b/l1",
                "reversibility/c/l1", "true_cf/do_b/mse", "true_cf/do_c/l1"):
        assert r[f"test/{key}"] == pytest.approx(0.0, abs=1e-4), key
    assert r["test/effectiveness/do_b/b"] == 1.0  # F1
    assert r["test/effectiveness/do_c/c"] == pytest.approx(0.0, abs=1e-5)  # MAE in original units
    assert r["test/effectiveness/do_c/b"] == 1.0  # the other parent is left as it was
    assert {"test/cld", "test/cld_p_sx_star_le_div", "test/cld_p_sx_ge_div", "test/fid_domain"} <= set(r)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_that_ignores_interventions_fails_effectiveness_but_not_composition(tmp_path):
    r = _run(LazyModel(), tmp_path)
    assert r["test/composition/l1/1"] == 0.0  # composition alone cannot tell: why effectiveness exists
    assert r["test/effectiveness/do_b/b"] == 0.0  # every flip missed
    # do(c) draws a value from another bin: every error is at least the 0.51 between neighbouring values
    assert r["test/effectiveness/do_c/c"] >= 0.5
    assert r["test/true_cf/do_b/mse"] > 0


class ScaledFeatures(nn.Module):
    """A stand-in feature network (an oracle's ``features``): the pixels times ``scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def features(self, x):
        return self.scale * x.flatten(1)


def test_fid_domain_uses_fid_features_instead_of_the_predictors(tmp_path):
    # FID is quadratic in the features (mean distance squared, covariance traces): features twice the
    # predictors' give exactly four times the FID, so the callback must have measured with `fid_features`.
    predictors_fid = _run(WritingModel(), tmp_path)["test/fid_domain"]
    doubled_fid = _run(WritingModel(), tmp_path, fid_features=ScaledFeatures(2.0))["test/fid_domain"]
    assert predictors_fid > 0
    assert doubled_fid == pytest.approx(4 * predictors_fid, rel=1e-6)
    with pytest.raises(ValueError, match="fid_features is the feature network of fid_domain"):
        CounterfactualMetrics(fid="fid_inception", fid_features=ScaledFeatures(1.0))
    with pytest.raises(ValueError, match="set `predictors` or `fid_features`"):
        CounterfactualMetrics(fid="fid_domain")
    missing = tmp_path / "no_oracle.ckpt"
    with pytest.raises(FileNotFoundError, match="no_oracle.ckpt"):
        CounterfactualMetrics(fid="fid_domain", fid_features=str(missing))


class AugmentedTrainingData(PixelParentsData):
    """Training batches through a random augmentation that draws from the global RNG (as torchvision's do)."""

    def train_dataloader(self):
        return ({**batch, "x": batch["x"] + 0 * torch.rand_like(batch["x"])} for batch in super().train_dataloader())


def test_fid_on_the_training_split_leaves_the_global_rng_alone(tmp_path):
    # The real-image pass iterates the training pipeline, whose augmentations may draw from the global RNG; in
    # validation during fit that would change the training run being measured.
    def rng_after_test(callbacks) -> torch.Tensor:
        torch.manual_seed(7)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
        trainer.test(WritingModel(), datamodule=AugmentedTrainingData(), verbose=False)
        return torch.get_rng_state()

    fid = CounterfactualMetrics(fid="fid_domain", fid_real="train", fid_features=ScaledFeatures(1.0),
                                composition_m=(1,), per_sample_csv=False)
    assert torch.equal(rng_after_test([fid]), rng_after_test([]))
    assert fid.results["test"]["test/fid_domain"] > 0


class CountedTrainingData(PixelParentsData):
    train_loaders = 0

    def train_dataloader(self):
        type(self).train_loaders += 1
        return super().train_dataloader()


def test_fid_reads_the_whole_training_split_once_per_stage(tmp_path):
    # The training split through a frozen extractor has the same moments at every evaluation.
    fid = CounterfactualMetrics(fid="fid_domain", fid_real="train", fid_features=ScaledFeatures(1.0),
                                composition_m=(1,), per_sample_csv=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[fid], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    data, model = CountedTrainingData(), WritingModel()
    trainer.test(model, datamodule=data, verbose=False)
    first = fid.results["test"]["test/fid_domain"]
    trainer.test(model, datamodule=data, verbose=False)
    assert CountedTrainingData.train_loaders == 1
    assert fid.results["test"]["test/fid_domain"] == first


def test_interventions_must_be_parents_and_embedding_needs_predictors(tmp_path):
    with pytest.raises(ValueError, match="uses the predictors' features"):
        CounterfactualMetrics(distances=("embedding",))
    callback = CounterfactualMetrics(intervene=["smile"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"intervene lists \['smile'\]"):
        trainer.test(WritingModel(), datamodule=PixelParentsData(), verbose=False)


def test_per_sample_csv_has_one_row_per_test_image(tmp_path):
    import csv

    callback = CounterfactualMetrics(composition_m=(1,))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.test(LazyModel(), datamodule=PixelParentsData(), verbose=False)
    rows = list(csv.DictReader(open(tmp_path / "per_sample.csv")))
    assert [int(r["index"]) for r in rows] == list(range(N))
    assert set(rows[0]) == {"index", "composition/l1/1", "reversibility/b/l1", "reversibility/c/l1"}
    assert all(float(r["composition/l1/1"]) == 0.0 for r in rows)
    assert (tmp_path / "images" / "test_composition_best_median_worst.png").is_file()


class NoisyPropagationModel(WritingModel):
    """An SCM-like model whose do(b) moves c by a fresh random amount on every call (as a stochastic
    abduction would): the image must be predicted from the very parents effectiveness is judged against."""

    def counterfactual_parents(self, pa, do):
        out = {**pa, **do}
        if "b" in do and "c" not in do:  # an intervened descendant keeps its do value, as in AttributeSCM
            out["c"] = (pa["c"] + 0.5 * torch.rand_like(pa["c"])).clamp(-1, 1)
        return out


def test_the_image_is_predicted_from_the_judged_parents(tmp_path):
    results = _run(NoisyPropagationModel(), tmp_path)
    assert results["test/effectiveness/do_b/c"] == pytest.approx(0.0, abs=1e-6)
    assert results["test/effectiveness/do_b/b"] == 1.0


class BrighteningModel(WritingModel):
    """Deterministic and not exact: writes the parents and brightens the texture by the continuous parent, so
    that reversibility is not 0 and depends on the x* it starts from."""

    def predict(self, noise, pa):
        out = noise.clone()
        out[:, :, 1:] = (noise[:, :, 1:] + 0.1 * pa["c"].view(-1, 1, 1, 1)).clamp(0, 1)
        return _write(out, pa)


def _with_references(model: CounterfactualModule, root) -> dict[str, float]:
    from callbacks.references import ReferenceCounterfactuals

    callback = CounterfactualMetrics(predictors=ReadingPredictors(), vae=PixelVAE(), composition_m=(1, 2),
                                     distances=("l1", "embedding"), fid="fid_domain", fid_real="eval")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         callbacks=[callback, ReferenceCounterfactuals(retrieval_resolution=2)],
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=root)
    trainer.test(model, datamodule=PixelParentsData(), verbose=False)
    return callback.results["test"]


@pytest.mark.parametrize("model", [BrighteningModel, LazyModel], ids=["deterministic", "copy"])
def test_deterministic_models_score_as_when_reversibility_made_its_own_x_star(model, tmp_path, monkeypatch):
    from callbacks.metrics.composition import Reversibility

    reused = _with_references(model(), tmp_path / "reused")
    update = Reversibility.update
    monkeypatch.setattr(Reversibility, "update", lambda self, subject, x, pa, do, index=None, x_star=None:
                        update(self, subject, x, pa, do, index))  # the callback before x* was passed on
    remade = _with_references(model(), tmp_path / "remade")
    assert reused == remade  # bit for bit, the references (x* = x, mean, retrieval) included
    assert {"identity", "mean", "retrieval"} == {k.split("/")[2] for k in reused if "/reference/" in k}
    if model is BrighteningModel:
        assert reused["test/reversibility/c/l1"] > 0


class RecordingModel(BrighteningModel):
    """Records every counterfactual call (its input and output) and adds fresh noise to each output: a stochastic
    model, whose second x* would differ from the first."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def counterfactual(self, x, pa, do):
        out = super().counterfactual(x, pa, do) + torch.rand_like(x) / 64
        self.calls.append((x, out))
        return out


def test_reversibility_goes_back_from_the_judged_x_star(tmp_path):
    model = RecordingModel()
    callback = CounterfactualMetrics(composition_m=(1,), per_sample_csv=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.test(model, datamodule=PixelParentsData(), verbose=False)
    # per batch: composition^1 (1 call), then per parent b, c: x* and the way back from that very x* (2 calls)
    batches = -(-N // 5)
    assert len(model.calls) == batches * 5
    for first in range(0, len(model.calls), 5):
        for x_star_call in (first + 1, first + 3):
            assert model.calls[x_star_call + 1][0] is model.calls[x_star_call][1]
