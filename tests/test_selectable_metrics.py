"""Every documented metric and intervention kind switched on from the callbacks' arguments (as an experiment's
config does), run through the callback, checked against hand computations on one process and equal on two.

* CounterfactualMetrics: KID (``kid``), the VGG-16 embedding distance (``distances: [vgg16]``), joint
  (``multi_parent``) and random (``random_parents``) interventions, on the pixel-parents data of
  ``tests/test_counterfactual_metrics.py`` (b and c written into two pixels).
* AttributeEditingMetrics: SR(+)/SR(−)/SR, CFD and BCA (``scores``), and one callback over a list of attributes
  giving exactly the keys and values of one callback per attribute, on the fakes of ``tests/test_callbacks.py``.

The two-process runs use ``ddp_fork``: the stand-in VGG-16 (the real weights cannot be fetched here) is patched
into the module, and forked workers inherit the patch where spawned ones would re-import the module.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import callbacks.counterfactual_metrics as cf_module
from callbacks.counterfactual_metrics import CounterfactualMetrics
from callbacks.editing_metrics import AttributeEditingMetrics
from callbacks.metrics.distances import PretrainedWeightsMissing
from callbacks.metrics.realism import kid_subsets
from callbacks.references import ReferenceCounterfactuals
from datamodules.base import Attribute
from lightning_modules.references import IdentityCounterfactual
from tests.test_callbacks import (
    ATTR,
    EDIT_SHIFT,
    OTHER,
    FakeEditor,
    FakeOracle,
    StridedSampler,
    TinyEditingData,
    _Split,
)
from tests.test_counterfactual_metrics import LazyModel, N, PixelParentsData, ReadingPredictors, WritingModel
from tests.test_ddp_metrics import ShiftingModel, _StridedPixelParentsData

N_TEST = 13


def _trainer(root, devices: int = 1, callbacks=()) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                      use_distributed_sampler=False, callbacks=list(callbacks), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root)


class HalfFeatures(nn.Module):
    """Stand-in for VGG-16's fc7: the image itself, flattened (so its embedding L1 is pixel L1 / 255)."""

    def forward(self, x):
        return x.flatten(1)


@pytest.fixture
def stand_in_vgg16(monkeypatch):
    calls = []

    def build():
        calls.append(1)
        return HalfFeatures()

    monkeypatch.setattr(cf_module, "vgg16_fc7", build)
    return calls


class RecordingWriter(WritingModel):
    """The exact model, recording the parents of every intervention it is asked for (``do``'s keys) and the
    batch size of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[frozenset, int]] = []

    def counterfactual(self, x, pa, do):
        self.calls.append((frozenset(do), len(x)))
        return super().counterfactual(x, pa, do)


def _cf(model, root, devices: int = 1, references: bool = False, **kwargs) -> dict[str, float]:
    callback = CounterfactualMetrics(predictors=ReadingPredictors(), composition_m=(1,), per_sample_csv=False,
                                     **kwargs)
    callbacks = [callback]
    if references:
        callbacks.append(ReferenceCounterfactuals({"identity": IdentityCounterfactual()}))
    trainer = _trainer(root, devices, callbacks)
    data = _StridedPixelParentsData() if devices > 1 else PixelParentsData()
    trainer.test(model, datamodule=data, verbose=False)
    return {key: value.item() for key, value in trainer.callback_metrics.items()}


# -- CounterfactualMetrics ----------------------------------------------------------------------------------
def test_joint_interventions_change_every_listed_parent_at_once(tmp_path):
    model = RecordingWriter()
    r = _cf(model, tmp_path, multi_parent=[["b", "c"]])
    # per batch: composition (no do), do(b), do(c), then do(b, c) in one call for the whole batch
    assert {keys for keys, _ in model.calls} == {frozenset(), frozenset("b"), frozenset("c"), frozenset("bc")}
    assert r["test/true_cf/do_b+c/mse"] == pytest.approx(0.0, abs=1e-9)  # exact model: x* is the truth
    assert r["test/effectiveness/do_b+c/b"] == 1.0 and r["test/effectiveness/do_b+c/c"] == pytest.approx(0, abs=1e-5)
    assert r["test/reversibility/b+c/l1"] == pytest.approx(0.0, abs=1e-4)
    lazy = _cf(LazyModel(), tmp_path / "lazy", multi_parent=[["b", "c"]])
    # both parents change: ignoring them misses b's flip on every image and c by at least one bin (0.51)
    assert lazy["test/effectiveness/do_b+c/b"] == 0.0 and lazy["test/effectiveness/do_b+c/c"] >= 0.5
    assert lazy["test/true_cf/do_b+c/mse"] > 0


def test_random_interventions_pick_subsets_of_the_parents_per_image(tmp_path):
    model = RecordingWriter()
    r = _cf(model, tmp_path, random_parents=0.5)
    sets = {keys for keys, _ in model.calls}
    # the random interventions of a batch come in one call per drawn set of parents, together covering it
    assert {frozenset("b"), frozenset("c"), frozenset("bc")} <= sets
    assert r["test/true_cf/do_random/mse"] == pytest.approx(0.0, abs=1e-9)
    assert r["test/effectiveness/do_random/b"] == 1.0
    lazy = _cf(LazyModel(), tmp_path / "lazy", random_parents=0.5)
    # with p = 0.5 some images keep b (the lazy model is right there) and some flip it (wrong): 0 < F1 < 1
    assert 0.0 < lazy["test/effectiveness/do_random/b"] < 1.0
    # p = 1 intervenes on every parent of every image: the joint intervention, in one call per batch
    every = RecordingWriter()
    _cf(every, tmp_path / "all", random_parents=1.0)
    assert frozenset("bc") in {keys for keys, _ in every.calls}


def test_random_interventions_depend_on_the_row_only(tmp_path):
    """The same image gets the same random intervention whatever its batch: the values equal those of a run with
    other batch sizes."""

    class Rebatched(PixelParentsData):
        def __init__(self):
            super().__init__()
            self.batch_size = 7

    results = []
    for data in (PixelParentsData(), Rebatched()):
        callback = CounterfactualMetrics(predictors=ReadingPredictors(), composition_m=(1,), per_sample_csv=False,
                                         random_parents=0.5)
        trainer = _trainer(tmp_path, callbacks=[callback])
        trainer.test(LazyModel(), datamodule=data, verbose=False)
        results.append(callback.results["test"])
    assert results[0] == pytest.approx(results[1], rel=1e-12)


def test_kid_of_the_identity_reference_is_the_kid_of_the_test_set_against_itself(tmp_path):
    r = _cf(WritingModel(), tmp_path, references=True, fid="fid_domain", fid_real="eval", kid=True, kid_subsets=5,
            kid_subset_size=6)
    data = PixelParentsData()
    data.setup("test")
    images = torch.stack([data.dataset("test")[i]["x"] for i in range(N)])
    features = ReadingPredictors().features(images).double()
    mean, std = kid_subsets(features, features, 5, 6, 0)
    assert r["test/reference/identity/kid_domain"] == pytest.approx(mean.item(), rel=1e-6)
    assert r["test/reference/identity/kid_domain_std"] == pytest.approx(std.item(), rel=1e-6)
    assert r["test/kid_domain_subset_size"] == 6.0
    assert {"test/kid_domain", "test/kid_domain_std", "test/fid_domain"} <= set(r)
    # a subset larger than the set is clipped to the set, and the size used is logged
    small = _cf(WritingModel(), tmp_path / "clip", fid="fid_domain", fid_real="eval", kid=True, kid_subsets=2)
    assert small["test/kid_domain_subset_size"] == float(N)


def test_kid_needs_fid_and_joint_interventions_two_parents():
    with pytest.raises(ValueError, match="kid reads FID's features"):
        CounterfactualMetrics(kid=True)
    with pytest.raises(ValueError, match="two or more distinct parents"):
        CounterfactualMetrics(multi_parent=[["b"]])
    with pytest.raises(ValueError, match=r"random_parents is the probability"):
        CounterfactualMetrics(random_parents=1.5)


def test_unknown_joint_parents_are_named(tmp_path):
    callback = CounterfactualMetrics(multi_parent=[["b", "slant"]], per_sample_csv=False)
    with pytest.raises(ValueError, match=r"multi_parent lists \['slant'\]"):
        _trainer(tmp_path, callbacks=[callback]).test(WritingModel(), datamodule=PixelParentsData(), verbose=False)


def test_vgg16_distance_is_the_l1_of_the_fc7_embedding(tmp_path, stand_in_vgg16):
    r = _cf(ShiftingModel(), tmp_path, distances=("l1", "vgg16"))
    assert stand_in_vgg16  # the callback built its VGG-16 extractor
    # the stand-in embeds the image itself: embedding L1 = mean |x - y| = pixel L1 (0-255 scale) / 255
    for key in ("reversibility/b", "reversibility/c"):
        assert r[f"test/{key}/vgg16"] == pytest.approx(r[f"test/{key}/l1"] / 255, rel=1e-6)  # float32 pixels
    assert r["test/reversibility/b/vgg16"] > 0


def test_vgg16_distance_without_its_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    callback = CounterfactualMetrics(distances=("vgg16",), per_sample_csv=False)
    with pytest.raises(PretrainedWeightsMissing, match="vgg16-397923af.pth"):
        _trainer(tmp_path, callbacks=[callback]).test(WritingModel(), datamodule=PixelParentsData(), verbose=False)


def test_selectable_counterfactual_metrics_two_processes_equal_one(tmp_path, stand_in_vgg16):
    kwargs = dict(distances=("l1", "vgg16"), multi_parent=[["b", "c"]], random_parents=0.5, fid="fid_domain",
                  fid_real="eval", kid=True, kid_subsets=4, kid_subset_size=5)
    single = _cf(ShiftingModel(), tmp_path / "single", **kwargs)
    distributed = _cf(ShiftingModel(), tmp_path / "ddp", devices=2, **kwargs)
    for key in ("test/kid_domain", "test/reversibility/b/vgg16", "test/reversibility/b+c/l1",
                "test/effectiveness/do_random/b", "test/true_cf/do_b+c/mse", "test/true_cf/do_random/mse"):
        assert key in single, key
    assert set(distributed) == set(single)
    assert distributed == pytest.approx(single, rel=1e-6, abs=1e-9)


# -- AttributeEditingMetrics: SR, CFD, BCA --------------------------------------------------------------------
class LogitOracle(FakeOracle):
    """FakeOracle with a last layer to read: ``forward`` gives both attributes' logits [B, 2]."""

    def forward(self, x):
        right = x[..., x.shape[-1] // 2:]
        return torch.stack([self.k * (x.mean(dim=(1, 2, 3)) - 0.5), self.k * (right.mean(dim=(1, 2, 3)) - 0.5)], 1)


def _editing(root, devices: int = 1, **kwargs) -> dict[str, float]:
    callback = AttributeEditingMetrics(ATTR, oracle=LogitOracle(), **kwargs)
    trainer = _trainer(root, devices, [callback])
    trainer.test(FakeEditor(), datamodule=TinyEditingData(n_val=6, n_test=N_TEST), verbose=False)
    return {key: value.item() for key, value in trainer.callback_metrics.items()}


def _scores_by_hand(seed: int = 0) -> dict[str, float]:
    data, rows = TinyEditingData(n_val=6, n_test=N_TEST), list(range(6, 6 + N_TEST))
    x, y = data.images[rows].double(), data.labels[rows]
    edit_0, edit_1 = (x - EDIT_SHIFT).clamp(0, 1), (x + EDIT_SHIFT).clamp(0, 1)
    oracle = LogitOracle().double()
    pos = y > 0.5
    accepted_1 = oracle.predict_attributes(edit_1)[ATTR] > 0.5
    accepted_0 = oracle.predict_attributes(edit_0)[ATTR] <= 0.5
    sr_plus, sr_minus = accepted_1[~pos].double().mean().item(), accepted_0[pos].double().mean().item()
    # BCA of FakeEditor's own classifier (first pixel above 1/2) on the real images: mean of the class recalls
    own = x[:, 0, 0, 0] > 0.5
    bca = 0.5 * ((own[pos]).double().mean() + (~own[~pos]).double().mean()).item()
    # CFD: the images of each class in row order, shuffled by a generator seeded with the seed, paired in order
    generator = torch.Generator().manual_seed(seed)
    ones, zeros = torch.nonzero(pos).reshape(-1), torch.nonzero(~pos).reshape(-1)
    ones, zeros = ones[torch.randperm(len(ones), generator=generator)], zeros[torch.randperm(len(zeros),
                                                                                           generator=generator)]
    k = min(len(ones), len(zeros))
    flipped = torch.where(pos.view(-1, 1, 1, 1), edit_0, edit_1)
    f_x, f_flip = oracle(x), oracle(flipped)
    distances = [(f_x[ones[i]] - f_flip[zeros[i]]).norm() for i in range(k)]
    distances += [(f_x[zeros[i]] - f_flip[ones[i]]).norm() for i in range(k)]
    return {f"test/edit/{ATTR}/sr_plus": sr_plus, f"test/edit/{ATTR}/sr_minus": sr_minus,
            f"test/edit/{ATTR}/sr": (sr_plus + sr_minus) / 2, f"test/bca/E_y/{ATTR}": bca,
            f"test/edit/{ATTR}/cfd": torch.stack(distances).mean().item()}


def test_swap_scores_through_the_editing_callback_match_a_hand_computation(tmp_path):
    r = _editing(tmp_path, scores=["sr", "cfd", "bca"])
    expected = _scores_by_hand()
    assert {k: r[k] for k in expected} == pytest.approx(expected, rel=1e-6)  # logged as float32
    assert r[f"test/edit/{ATTR}/sr_minus"] == r[f"test/edit/{ATTR}/C_neg_paper"]
    assert 0 < expected[f"test/edit/{ATTR}/sr_plus"] and expected[f"test/bca/E_y/{ATTR}"] < 1  # not trivial
    assert not any("/sr" in k or "/cfd" in k or "/bca/" in k for k in _editing(tmp_path / "off"))


def test_swap_scores_two_processes_equal_one(tmp_path):
    single = _editing(tmp_path / "single", scores=["sr", "cfd", "bca"])
    distributed = _editing(tmp_path / "ddp", devices=2, scores=["sr", "cfd", "bca"])
    assert set(distributed) == set(single) and f"test/edit/{ATTR}/cfd" in single
    assert distributed == pytest.approx(single, rel=1e-12)


def test_unknown_scores_and_cfd_without_a_last_layer_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"`scores` lists \['fid'\]"):
        AttributeEditingMetrics(ATTR, oracle=LogitOracle(), scores=["fid"])
    callback = AttributeEditingMetrics(ATTR, oracle=FakeOracle(), scores=["cfd"])
    with pytest.raises(ValueError, match="has no forward"):
        _trainer(tmp_path, callbacks=[callback]).test(FakeEditor(), datamodule=TinyEditingData(), verbose=False)


# -- AttributeEditingMetrics over a list of attributes ---------------------------------------------------------
class _TwoSplit(_Split):
    def __init__(self, images, labels, bright, rows):
        super().__init__(images, labels, rows)
        self.bright = bright

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["pa"] = {ATTR: self.labels[item["index"]], OTHER: self.bright[item["index"]]}
        return item


class TwoAttributeData(TinyEditingData):
    attributes = (Attribute(ATTR), Attribute(OTHER))

    def _loader(self, rows):
        split = _TwoSplit(self.images, self.labels, self.bright, rows)
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = StridedSampler(len(split), torch.distributed.get_rank(), torch.distributed.get_world_size())
        return torch.utils.data.DataLoader(split, batch_size=self.batch_size, sampler=sampler)

    def _build_split(self, split):
        return _TwoSplit(self.images, self.labels, self.bright, self._rows(split))


class NoisyTwoAttributeEditor(FakeEditor):
    """Shifts the left half by Smiling and the right half by Bright, plus fresh noise in every prediction: the
    values depend on exactly which random numbers each edit draws (a shared stream would move them)."""

    def predict(self, noise, pa):
        y, b = (2 * pa[ATTR].view(-1, 1, 1, 1) - 1), (2 * pa[OTHER].view(-1, 1, 1, 1) - 1)
        half = noise.shape[-1] // 2
        out = noise.clone()
        out[..., :half] += EDIT_SHIFT * y
        out[..., half:] += EDIT_SHIFT * b
        # one shift per image, up to ±0.2 of the mean: enough to move the oracle's verdicts
        return (out + 0.4 * torch.rand(len(noise), 1, 1, 1) - 0.2).clamp(0, 1)

    def predict_attributes(self, x):
        return {ATTR: torch.where(x[:, 0, 0, 0] > 0.5, 0.9, 0.1), OTHER: torch.where(x[:, 0, 0, -1] > 0.5, 0.8, 0.2)}


def _listed(root, callbacks) -> dict[str, float]:
    trainer = _trainer(root, callbacks=callbacks)
    trainer.test(NoisyTwoAttributeEditor(), datamodule=TwoAttributeData(n_val=6, n_test=N_TEST), verbose=False)
    return {key: value.item() for key, value in trainer.callback_metrics.items()}


def test_one_callback_over_a_list_gives_each_attribute_the_values_of_its_own_callback(tmp_path):
    separate = _listed(tmp_path / "separate", [AttributeEditingMetrics(a, oracle=FakeOracle(), true_counterfactuals=False,
                                                                       scores=["sr", "bca"]) for a in (ATTR, OTHER)])
    listed = _listed(tmp_path / "listed", [AttributeEditingMetrics(attributes=[ATTR, OTHER], oracle=FakeOracle(),
                                                                   true_counterfactuals=False, scores=["sr", "bca"])])
    assert listed == separate  # bit for bit: each attribute's edits drew the random numbers its own callback drew
    assert {f"test/edit/{a}/C_pos_paper" for a in (ATTR, OTHER)} <= set(listed)


def test_a_list_of_attributes_is_checked():
    with pytest.raises(ValueError, match="set exactly one of `attribute`"):
        AttributeEditingMetrics(ATTR, attributes=[ATTR])
    with pytest.raises(ValueError, match="distinct attribute names"):
        AttributeEditingMetrics(attributes=[ATTR, ATTR])
    with pytest.raises(ValueError, match="true_counterfactuals=true logs"):
        AttributeEditingMetrics(attributes=[ATTR, OTHER])


# -- from an experiment's config -----------------------------------------------------------------------------
@pytest.mark.parametrize("experiment, overrides, check", [
    ("cvae_morphomnist_synth", ["callbacks.counterfactual_metrics.kid=true"], lambda c: c.kid),
    ("cvae_morphomnist_synth", ["callbacks.counterfactual_metrics.distances=[l1,vgg16]"],
     lambda c: c.distance_names == ("l1", "vgg16")),
    ("cvae_morphomnist_synth", ["callbacks.counterfactual_metrics.multi_parent=[[thickness,intensity]]"],
     lambda c: c.multi_parent == [["thickness", "intensity"]]),
    ("cvae_morphomnist_synth", ["callbacks.counterfactual_metrics.random_parents=0.5"],
     lambda c: c.random_parents == 0.5),
    ("ifcvae_smiling_synth", ["callbacks.editing_metrics.scores=[sr,cfd,bca]"],
     lambda c: c.scores == ("sr", "cfd", "bca")),
])
def test_each_option_is_switched_on_from_an_experiments_config(experiment, overrides, check, tmp_path):
    from configs.loader import compose, instantiate

    cfg = compose(experiment, overrides)
    key = overrides[0].split(".")[1]
    node = cfg.callbacks[key]
    # checkpoints the callback would load are not needed to read its options: point them at nothing
    fields = {k: None for k in ("vae", "oracle", "preservation_oracle") if k in node}
    if "predictors" in node:
        fields["predictors"] = ReadingPredictors()
    callback = instantiate(node, f"callbacks.{key}", **fields)
    assert check(callback)
