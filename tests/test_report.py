"""The report beside the references: verdicts by hand, and a degenerate model that Ĉ alone would pass."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from callbacks.editing_metrics import AttributeEditingMetrics
from callbacks.references import ReferenceCounterfactuals
from datamodules.celeba import CelebADataModule
from datamodules.synthetic.faces import SyntheticFacesBuilder
from experiments.report import markdown_report, split_subjects, summary_lines, verdicts
from lightning_modules.base import CounterfactualModule


def _metrics(effect: float, preservation: float, flip: float) -> dict[str, float]:
    return {
        "test/true_cf/effect_mse": effect, "test/true_cf/preservation_mse": preservation,
        "test/edit/Smiling/flip_acc": flip, "test/edit/Smiling/C_pos_paper": 1.0,
        "test/reference/identity/true_cf/effect_mse": 0.02, "test/reference/identity/true_cf/preservation_mse": 0.0,
        "test/reference/identity/edit/Smiling/flip_acc": 0.01,
        "test/reference/mean/true_cf/effect_mse": 0.03, "test/reference/mean/true_cf/preservation_mse": 0.028,
        "test/reference/mean/edit/Smiling/flip_acc": 0.5,
    }


def test_split_subjects() -> None:
    model, references = split_subjects(_metrics(0.01, 0.002, 0.9))
    assert model["test/true_cf/effect_mse"] == 0.01 and "test/reference/mean/true_cf/effect_mse" not in model
    assert references["mean"]["test/true_cf/preservation_mse"] == 0.028
    assert set(references) == {"identity", "mean"}


@pytest.mark.parametrize(("effect", "preservation", "flip", "failed"), [
    (0.01, 0.002, 0.9, set()),
    (0.02, 0.002, 0.9, {"effect"}),               # the identity's effect error: not better than doing nothing
    (0.01, 0.014, 0.9, {"preservation"}),         # half the mean image's error is the bar, not reached
    (0.01, 0.0139, 0.005, {"edit success"}),
])
def test_verdicts_by_hand(effect, preservation, flip, failed) -> None:
    judged = verdicts(_metrics(effect, preservation, flip))
    assert {v.what for v in judged} == {"effect", "preservation", "edit success"}
    assert {v.what for v in judged if not v.passes} == failed
    report = markdown_report(_metrics(effect, preservation, flip))
    assert ("FAILS" in report.splitlines()[0]) == bool(failed)
    header = next(line for line in report.splitlines() if line.startswith("| metric"))
    assert header == "| metric | model | x* = x | mean image |"
    for what in failed:
        key = next(v.key for v in judged if v.what == what)
        assert f"| {key} ✗ |" in report


def test_summary_lines_put_the_references_beside_the_model() -> None:
    lines = summary_lines(_metrics(0.01, 0.002, 0.9))
    effect = next(line for line in lines if "true_cf/effect_mse" in line and "x* = x" in line)
    assert "0.0100" in effect and "0.0200" in effect and "0.0300" in effect
    assert any(line.strip().startswith("ok") and "preservation" in line for line in lines)


# -- a degenerate model ---------------------------------------------------------------------------------------
class MeanFaceWithMouth(CounterfactualModule):
    """The degenerate counterfactual of issue 13: the mean training face, with the mean mouth of the faces that
    have the requested Smiling value pasted into the pixels where the two classes' mean faces differ."""

    def __init__(self, mean: torch.Tensor, by_class: torch.Tensor, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("by_class", by_class)  # [2, C, H, W]
        self.register_buffer("region", region)

    def counterfactual(self, x, pa, do):
        y = {**pa, **do}["Smiling"].long()
        return torch.where(self.region, self.by_class[y], self.mean.expand_as(x))

    def reconstruct(self, x, pa):
        return self.counterfactual(x, pa, {})

    def test_step(self, batch, batch_idx):
        return None


class MouthTemplateOracle(nn.Module):
    """An oracle that reads only the mouth pixels and calls Smiling the closer of the two class means there."""

    attributes = ("Smiling",)

    def __init__(self, by_class: torch.Tensor, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("by_class", by_class)
        self.register_buffer("region", region.float())

    def predict_attributes(self, x):
        d = [((x - m) ** 2 * self.region).sum(dim=(1, 2, 3)) for m in self.by_class]
        return {"Smiling": torch.sigmoid(50.0 * (d[0] - d[1]))}


def test_a_mean_face_with_a_pasted_mouth_passes_C_and_fails_preservation(tmp_path) -> None:
    builder = SyntheticFacesBuilder(n_train=300, n_val=8, n_test=96, image_size=32, seed=0)
    data = CelebADataModule(str(tmp_path / "faces"), ["Smiling"], image_size=32, crop_size=None, batch_size=32,
                            builder=builder)
    data.prepare_data()
    train = data.dataset("train")
    x = torch.stack([train[i]["x"] for i in range(len(train))])
    y = torch.tensor([float(train[i]["pa"]["Smiling"]) for i in range(len(train))])
    by_class = torch.stack([x[y == v].mean(0) for v in (0.0, 1.0)])
    region = (by_class[1] - by_class[0]).abs().amax(0, keepdim=True) > 4 / 255
    model = MeanFaceWithMouth(x.mean(0), by_class, region)
    callback = AttributeEditingMetrics("Smiling", oracle=MouthTemplateOracle(by_class, region))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[callback, ReferenceCounterfactuals()])
    trainer.test(model, datamodule=data, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # Ĉ alone would call it a perfect editor ...
    assert metrics["test/edit/Smiling/C_pos_paper"] >= 0.9 and metrics["test/edit/Smiling/C_neg_paper"] >= 0.9
    # ... beside the references it is a mean face
    judged = {v.what: v for v in verdicts(metrics)}
    assert not judged["preservation"].passes
    assert judged["preservation"].model > 0.5 * metrics["test/reference/mean/true_cf/preservation_mse"]
    assert metrics["test/reference/identity/true_cf/preservation_mse"] == 0.0
    assert markdown_report(metrics).startswith("**Verdict: the model FAILS") and "preservation" in \
        markdown_report(metrics).splitlines()[0]
