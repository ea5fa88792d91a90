"""Anti-causal predictors: losses by kind, conditioning, the metric-facing API, checkpoints and experiments."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from configs.loader import compose
from experiments.runner import run
from lightning_modules.predictors import AntiCausalPredictor, head_loss
from tests.helpers.morphomnist_layout import write_morphomnist
from tests.helpers.runs import tiny_overrides

MORPHO = {
    "thickness": {"kind": "continuous", "low": 1.0, "high": 6.0},
    "intensity": {"kind": "continuous", "low": 66.0, "high": 255.0},
    "digit": {"kind": "categorical", "num_classes": 10},
}
NET = {
    "_target_": "lightning_modules.networks.classifiers.ConvClassifier",
    "image_size": 8,
    "in_channels": 1,
    "base_width": 4,
    "n_outputs": 6,
    "norm": "batch",
}


def make(parents=None, conditions=None, **kw) -> AntiCausalPredictor:
    torch.manual_seed(0)
    return AntiCausalPredictor(parents or MORPHO, NET, feature_dim=6, conditions=conditions, **kw)


def batch(n: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.rand(n, 1, 8, 8, generator=g),
        "pa": {
            "thickness": torch.rand(n, generator=g) * 2 - 1,
            "intensity": torch.rand(n, generator=g) * 2 - 1,
            "digit": torch.randint(0, 10, (n,), generator=g).float(),
            "flag": torch.randint(0, 2, (n,), generator=g).float(),
        },
    }


# -- losses by kind --------------------------------------------------------------------------------------
def test_losses_by_kind_match_hand_computations():
    out = torch.tensor([[0.5], [-1.0]])
    assert head_loss(out, torch.tensor([0.0, 1.0]), "continuous").item() == pytest.approx((0.25 + 4.0) / 2)
    p = torch.sigmoid(torch.tensor([0.5, -1.0]))
    bce = -(torch.log(1 - p[0]) + torch.log(p[1])) / 2
    assert head_loss(out, torch.tensor([0.0, 1.0]), "binary").item() == pytest.approx(bce.item())
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    ce = -(torch.log_softmax(logits[0], 0)[1] + torch.log_softmax(logits[1], 0)[0]) / 2
    assert head_loss(logits, torch.tensor([1.0, 0.0]), "categorical").item() == pytest.approx(ce.item())
    with pytest.raises(ValueError, match="kind"):
        head_loss(out, torch.zeros(2), "ordinal")


def test_training_loss_is_the_sum_of_the_heads_losses():
    model = make({**MORPHO, "flag": {"kind": "binary"}})
    b = batch()
    outs = model(b["x"], b["pa"])
    assert (
        outs["digit"].shape == (6, 10) and outs["thickness"].shape == (6, 1) and outs["flag"].shape == (6, 1)
    )
    expected = (
        F.mse_loss(outs["thickness"][:, 0], b["pa"]["thickness"])
        + F.mse_loss(outs["intensity"][:, 0], b["pa"]["intensity"])
        + F.cross_entropy(outs["digit"], b["pa"]["digit"].long())
        + F.binary_cross_entropy_with_logits(outs["flag"][:, 0], b["pa"]["flag"])
    )
    model.log = lambda *a, **k: None
    torch.manual_seed(0)
    assert model.training_step(b, 0).item() == pytest.approx(expected.item(), rel=1e-5)


# -- conditioning ----------------------------------------------------------------------------------------
def test_conditioning_widens_the_head_and_the_prediction_depends_on_the_condition():
    plain = make()
    cond = make(conditions={"thickness": ["intensity", "digit"]})
    assert plain.predictors["thickness"].head.in_features == 6
    assert cond.predictors["thickness"].head.in_features == 6 + 1 + 10  # intensity scalar + digit one-hot
    assert cond.predictors["intensity"].head.in_features == 6
    b = batch()
    lo = cond.predict_parents(b["x"], {"intensity": torch.full((6,), -1.0), "digit": torch.zeros(6)})
    hi = cond.predict_parents(b["x"], {"intensity": torch.full((6,), 1.0), "digit": torch.zeros(6)})
    assert not torch.allclose(lo["thickness"], hi["thickness"])
    assert torch.equal(lo["intensity"], hi["intensity"]) and torch.equal(lo["digit"], hi["digit"])


def test_a_missing_condition_is_predicted_from_the_image():
    model = make(conditions={"thickness": ["intensity"]})
    x = batch()["x"]
    own = model.predict_parents(x)  # intensity predicted first, then fed to the thickness head
    given = model.predict_parents(x, {"intensity": own["intensity"]})
    assert torch.allclose(own["thickness"], given["thickness"])
    only = make(conditions={"thickness": ["intensity"]}, targets=["thickness"])
    with pytest.raises(KeyError, match="intensity"):
        only.predict_parents(x)


def test_invalid_configs_fail_early():
    with pytest.raises(ValueError, match="not described"):
        make(conditions={"thickness": ["colour"]})
    with pytest.raises(ValueError, match="itself"):
        make(conditions={"thickness": ["thickness"]})
    with pytest.raises(ValueError, match="parents"):
        AntiCausalPredictor({}, NET)


# -- metric-facing API -----------------------------------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_predict_parents_and_features_leave_weights_bn_stats_and_mode_alone():
    model = make({**MORPHO, "flag": {"kind": "binary"}}, conditions={"thickness": ["intensity"]})
    model.train()
    before = _state(model)
    b = batch()
    preds = model.predict_parents(b["x"], b["pa"])
    feats = model.features(b["x"])
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert feats.shape == (6, 4 * 6) and not feats.requires_grad
    assert set(preds) == {"thickness", "intensity", "digit", "flag"}
    assert all(p.shape == (6,) and not p.requires_grad for p in preds.values())
    assert torch.all((preds["flag"] >= 0) & (preds["flag"] <= 1))  # a probability
    assert torch.equal(preds["digit"], preds["digit"].round()) and preds["digit"].max() < 10
    # Eval mode: a prediction does not depend on the rest of the batch.
    alone = model.predict_parents(b["x"][:1], {k: v[:1] for k, v in b["pa"].items()})
    assert torch.allclose(alone["thickness"], preds["thickness"][:1], atol=1e-6)


def test_effectiveness_predictors_agree_with_predict_parents():
    pytest.importorskip("callbacks.metrics.effectiveness")
    from callbacks.metrics.effectiveness import anti_causal_predictors, predict_parents

    model = make({**MORPHO, "flag": {"kind": "binary"}}, conditions={"thickness": ["intensity"]})
    b = batch()
    ours = model.predict_parents(b["x"], b["pa"])
    theirs = predict_parents(anti_causal_predictors(model), b["x"], b["pa"])
    for name in ("thickness", "intensity", "digit"):
        assert torch.allclose(ours[name], theirs[name], atol=1e-6), name
    assert torch.equal((ours["flag"] > 0.5).float(), theirs["flag"])


# -- checkpoints and training ----------------------------------------------------------------------------
class _Data(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.b = batch(16, seed=3)

    def _loader(self):
        rows = [{"x": self.b["x"][i], "pa": {k: v[i] for k, v in self.b["pa"].items()}} for i in range(16)]
        return torch.utils.data.DataLoader(rows, batch_size=8)

    train_dataloader = val_dataloader = _loader


def test_checkpoint_alone_rebuilds_the_module_with_identical_predictions(tmp_path):
    model = make(conditions={"thickness": ["intensity"]}, lr=1e-2)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=_Data())
    assert {"val/loss", "val/mae/thickness", "val/mae_raw/thickness", "val/acc/digit"} <= set(
        trainer.logged_metrics
    )
    assert trainer.logged_metrics["val/mae_raw/intensity"] == pytest.approx(
        trainer.logged_metrics["val/mae/intensity"] * (255.0 - 66.0) / 2
    )
    path = tmp_path / "p.ckpt"
    trainer.save_checkpoint(path)
    loaded = AntiCausalPredictor.load_from_checkpoint(path, map_location="cpu")
    assert loaded.conditions == {"thickness": ["intensity"]} and loaded.targets == [
        "thickness",
        "intensity",
        "digit",
    ]
    b = batch()
    a, c = model.predict_parents(b["x"], b["pa"]), loaded.predict_parents(b["x"], b["pa"])
    for name in a:
        assert torch.equal(a[name], c[name]), name
    assert torch.equal(model.features(b["x"]), loaded.features(b["x"]))


# -- experiments -----------------------------------------------------------------------------------------
def experiment_overrides(name: str, tmp: Path) -> list[str]:
    """tiny_overrides plus what the predictor/VAE experiments' data and models need to be tiny."""
    cfg = compose(name)
    args = tiny_overrides(name, tmp)
    if cfg.choices.data in ("morphomnist", "morphomnist_synth"):
        root = tmp / "tiny_morphomnist"
        if not root.exists():
            write_morphomnist(root, n_train=24, n_test=8)
        args += [f"data.root={root}", "data.n_val=8", "data.builder=null"]
    elif cfg.choices.data == "colored_mnist":
        args += ["data.limit_per_split=16"]
    elif cfg.choices.data == "chest_phantom":
        args += [
            "data.builder.n_train_patients=6",
            "data.builder.n_valid_patients=3",
            "data.builder.image_size=64",
            "data.split_fractions=[0.5,0.5,0.0]",
        ]
    if cfg.choices.model == "predictor":
        args += ["model._width=4", "model.feature_dim=8"]
    elif cfg.choices.model == "vae":
        args += ["model._width=4", "model._latent=4"]
    return args


PREDICTOR_EXPERIMENTS = [
    "predictors_morphomnist",
    "predictors_morphomnist_synth",
    "predictor_colored_mnist_digit",
    "predictors_chest_phantom",
]


@pytest.mark.parametrize("name", PREDICTOR_EXPERIMENTS)
def test_predictor_experiments_survive_fast_dev_run(name, tmp_path):
    result = run(
        compose(name, [*experiment_overrides(name, tmp_path), "trainer.fast_dev_run=true", "run_id=fdr"])
    )
    assert "test/loss" in result.metrics
    cfg = compose(name)
    for target in cfg.model.parents:
        kind = cfg.model.parents[target].kind
        key = f"test/mae_raw/{target}" if kind == "continuous" else f"test/acc/{target}"
        assert key in result.metrics, key


def test_a_morphomnist_predictor_run_writes_a_checkpoint_that_rebuilds_it(tmp_path):
    name = "predictors_morphomnist_synth"
    result = run(compose(name, [*experiment_overrides(name, tmp_path), "trainer.max_epochs=1", "run_id=one"]))
    model = AntiCausalPredictor.load_from_checkpoint(result.best_checkpoint, map_location="cpu")
    assert model.conditions == {"thickness": ["intensity"]}
    assert model.attributes["thickness"].high == pytest.approx(6.255515)
    x = torch.rand(3, 1, 32, 32)
    assert model.predict_parents(x, {"intensity": torch.zeros(3)})["thickness"].shape == (3,)
    assert model.features(x).shape == (3, 3 * 8)


def test_the_model_config_must_agree_with_the_data(tmp_path):
    name = "predictor_colored_mnist_digit"
    bad = [
        *experiment_overrides(name, tmp_path),
        "trainer.fast_dev_run=true",
        "model.parents.digit.kind=binary",
    ]
    with pytest.raises(ValueError, match="binary"):
        run(compose(name, bad))
