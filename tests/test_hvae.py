"""Conditional HVAE and its counterfactual fine-tuning: shapes, the KL by hand, the counterfactual temperatures,
update skipping, EMA in evaluation and checkpoints, the Lagrangian, ε₀, and optimizer isolation."""

import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules.hvae import ConditionalHVAE
from lightning_modules.hvae_finetune import CounterfactualFinetunedHVAE, lagrangian
from lightning_modules.likelihoods import to_signed, to_unit
from lightning_modules.networks.hvae import ConditionalHVAENetwork, gaussian_kl
from lightning_modules.predictors import AntiCausalPredictor

SIZE = 16
PARENTS = {"thickness": {"kind": "continuous"}, "intensity": {"kind": "continuous"},
           "digit": {"kind": "categorical", "num_classes": 3}}
CONTEXT = 1 + 1 + 3


def tiny_network(**kwargs) -> dict:
    return {"_target_": "lightning_modules.networks.hvae.ConditionalHVAENetwork", "image_size": SIZE,
            "image_channels": 1, "context_dim": CONTEXT, "encoder_arch": "16b1d4,4b1d4,1b1",
            "decoder_arch": "1b1,4b1,16b1", "widths": [4, 8, 8], "latent_channels": 2, **kwargs}


def make_model(**kwargs) -> ConditionalHVAE:
    return ConditionalHVAE(tiny_network(), PARENTS, warmup_steps=0, **kwargs)


class Digits(Dataset):
    """Blobs whose size and brightness follow thickness and intensity (the batch contract)."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.t, self.i = torch.rand(n, generator=g) * 2 - 1, torch.rand(n, generator=g) * 2 - 1
        self.d = torch.randint(3, (n,), generator=g).float()
        yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
        r = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2).sqrt()
        self.x = ((r[None] < 3 + 2 * (self.t[:, None, None] + 1)) * (0.5 + 0.25 * (self.i[:, None, None] + 1)))
        self.x = (self.x[:, None] * 255).round() / 255

    def __len__(self) -> int:
        return len(self.t)

    def __getitem__(self, k: int) -> dict:
        return {"x": self.x[k], "pa": {"thickness": self.t[k], "intensity": self.i[k], "digit": self.d[k]},
                "index": k}


def batch(n: int = 8) -> tuple[torch.Tensor, dict]:
    data = Digits(n)
    return data.x, {"thickness": data.t, "intensity": data.i, "digit": data.d}


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, max_epochs=1)
    return pl.Trainer(**{**defaults, **kwargs})


def loader(n: int = 16, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(Digits(n), batch_size=batch_size, shuffle=shuffle)


# -- the network -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "channels", "enc", "dec", "widths"), [
    (32, 1, "32b1d2,16b1d2,8b1d2,4b1d4,1b1", "1b1,4b1,8b1,16b1,32b1", [4, 4, 8, 8, 8]),
    (64, 3, "64b1d2,32b1d2,16b1d2,8b1d2,4b1d4,1b1", "1b1,4b2,8b1,16b1,32b1,64b1", [4, 4, 4, 8, 8, 8]),
])
def test_shapes(size, channels, enc, dec, widths):
    net = ConditionalHVAENetwork(size, channels, 2, enc, dec, widths, latent_channels=3, cond_prior=channels == 3)
    x, context = torch.rand(2, channels, size, size) * 2 - 1, torch.rand(2, 2)
    out = net(x, context)
    assert out.loc.shape == out.logscale.shape == x.shape
    assert [tuple(layer.z.shape[1:]) for layer in out.layers] == net.latent_shapes
    assert net.latent_dim == sum(3 * r * r for r in (1, *([4] * (2 if channels == 3 else 1)), 8, 16, 32)) + (
        3 * 64 * 64 if size == 64 else 0)
    assert net.decode([layer.z for layer in out.layers], context).loc.shape == x.shape
    assert net.sample(context).loc.shape == x.shape


def test_published_morphomnist_hierarchy_has_87104_latent_dimensions():
    net = ConditionalHVAENetwork()
    assert len(net.latent_shapes) == 20 and net.latent_dim == 87_104


def test_priors_start_at_the_standard_normal():
    net = ConditionalHVAENetwork(**{k: v for k, v in tiny_network().items() if k != "_target_"})
    out = net(torch.rand(2, 1, SIZE, SIZE), torch.rand(2, CONTEXT))
    for layer in out.layers:
        assert torch.equal(layer.p_loc, torch.zeros_like(layer.p_loc))
        assert torch.equal(layer.p_logscale, torch.zeros_like(layer.p_logscale))


@pytest.mark.parametrize(("arch", "match"), [
    ({"encoder_arch": "16b1d2,4b1d4,1b1"}, "downsample"),
    ({"decoder_arch": "1b1,2b1,16b1"}, "resolutions"),
    ({"widths": [4, 8]}, "one width per encoder stage"),
    ({"image_size": 32}, "image_size"),
])
def test_inconsistent_architectures_fail_with_a_clear_message(arch, match):
    with pytest.raises(ValueError, match=match):
        ConditionalHVAENetwork(**{k: v for k, v in tiny_network(**arch).items() if k != "_target_"})


def test_kl_against_the_closed_form_by_hand():
    # q = N(1, 2²), p = N(0, 1): log 1 − log 2 + (4 + 1)/2 − 1/2 = 2 − log 2
    kl = gaussian_kl(torch.tensor(1.0), torch.tensor(math.log(2.0)), torch.tensor(0.0), torch.tensor(0.0))
    assert kl.item() == pytest.approx(2 - math.log(2), abs=1e-6)
    # q = N(0, 1), p = N(1, e²): 1 − 0 + (1 + 1)/(2e²) − 1/2
    kl = gaussian_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0))
    assert kl.item() == pytest.approx(0.5 + math.exp(-2), abs=1e-6)


def test_per_layer_kl_is_the_closed_form_summed_over_each_layer():
    torch.manual_seed(0)
    model = make_model()
    x, pa = batch(4)
    terms = model.elbo_terms(model.net, x, pa)
    for layer, kl in zip(terms.output.layers, terms.kl_layers, strict=True):
        q = torch.distributions.Normal(layer.q_loc, layer.q_logscale.exp())
        p = torch.distributions.Normal(layer.p_loc, layer.p_logscale.exp())
        assert torch.allclose(kl, torch.distributions.kl_divergence(q, p).flatten(1).sum(1), rtol=1e-5)
    expected = ((terms.nll + model.hparams.beta * torch.stack(terms.kl_layers).sum(0)) / SIZE**2).mean()
    assert terms.loss.item() == pytest.approx(expected.item())


# -- counterfactuals ---------------------------------------------------------------------------------------
def test_null_intervention_with_residual_temperature_one_returns_x():
    torch.manual_seed(0)
    model = make_model(residual_temperature=1.0, latent_temperature=1.0).eval()
    x, pa = batch()
    assert torch.allclose(model.counterfactual(x, pa, {}), x, atol=1e-5)


def test_residual_temperature_zero_returns_the_mean_at_the_counterfactual_parents():
    torch.manual_seed(0)
    model = make_model(residual_temperature=0.0, latent_temperature=0.0).eval()
    x, pa = batch()
    do = {"digit": (pa["digit"] + 1) % 3}
    x_cf = model.counterfactual(x, pa, do)
    out = model.ema_network()(to_signed(x), model.context(pa), latent_temperature=0.0)
    mean_cf = model.ema_network().decode([layer.q_loc for layer in out.layers], model.context({**pa, **do})).loc
    assert torch.allclose(x_cf, to_unit(mean_cf), atol=1e-6)


def test_latent_temperature_zero_is_deterministic():
    model = make_model(latent_temperature=0.0, residual_temperature=0.5).eval()
    x, pa = batch()
    torch.manual_seed(1)
    a = model.abduct(x, pa)
    torch.manual_seed(2)
    b = model.abduct(x, pa)
    assert all(torch.equal(u, v) for u, v in zip(a.z, b.z, strict=True)) and torch.equal(a.eps, b.eps)
    do = {"thickness": -pa["thickness"]}
    assert torch.equal(model.counterfactual(x, pa, do), model.counterfactual(x, pa, do))


# -- training: skipping, EMA, checkpoints -------------------------------------------------------------------
def test_an_oversized_gradient_is_skipped_and_counted(tmp_path):
    torch.manual_seed(0)
    model = make_model(grad_skip=1e-9)  # every gradient is "huge"
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer(tmp_path, max_steps=2).fit(model, loader(16))
    assert int(model.skipped_updates) == 2
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())


def test_a_non_finite_loss_is_skipped_and_counted(tmp_path):
    torch.manual_seed(0)
    model = make_model()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    data = Digits(8)
    data.x[0, 0, 0, 0] = float("nan")
    trainer(tmp_path, max_epochs=1).fit(model, DataLoader(data, batch_size=8))
    assert int(model.skipped_updates) == 1
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())


def test_ema_is_used_for_evaluation_and_restored_from_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = make_model(ema_decay=0.5, latent_temperature=0.0, residual_temperature=0.0)
    t = trainer(tmp_path, max_epochs=2)
    t.fit(model, loader(16))
    assert int(model.skipped_updates) == 0 and model.ema.n_updates == 4
    raw, avg = model.net.state_dict(), model.ema.module.state_dict()
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)

    x, pa = batch()
    model.eval()
    out = model.ema.module(to_signed(x), model.context(pa), latent_temperature=0.0)
    assert torch.allclose(model.reconstruct(x, pa), to_unit(out.loc))
    assert not torch.allclose(model.reconstruct(x, pa), to_unit(model.net(to_signed(x), model.context(pa), 0.0).loc))

    t.save_checkpoint(tmp_path / "hvae.ckpt")
    restored = ConditionalHVAE.load_from_checkpoint(tmp_path / "hvae.ckpt").eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, restored.state_dict()[k]), k
    assert torch.equal(restored.reconstruct(x, pa), model.reconstruct(x, pa))


def test_validation_logs_the_elbo_per_pixel_and_per_layer(tmp_path):
    torch.manual_seed(0)
    (metrics,) = trainer(tmp_path).validate(make_model(), loader(8), verbose=False)
    assert {"val/loss", "val/nelbo", "val/nelbo_per_pixel", "val/nll", "val/kl", "val/kl/layer_00",
            "val/kl/layer_02"} <= set(metrics)
    assert metrics["val/nelbo_per_pixel"] == pytest.approx(metrics["val/nelbo"] / SIZE**2, rel=1e-5)


def test_parents_must_match_the_network_context():
    with pytest.raises(ValueError, match="context_dim"):
        ConditionalHVAE(tiny_network(context_dim=4), PARENTS)


# -- counterfactual fine-tuning ---------------------------------------------------------------------------
def test_lagrangian_gradients_have_the_documented_signs():
    cf, elbo, eps0 = torch.tensor(0.7), torch.tensor(2.5, requires_grad=True), torch.tensor(2.0)
    lmbda = torch.tensor(0.3, requires_grad=True)
    value = lagrangian(cf, elbo, eps0, lmbda, damping=10.0)
    value.backward()
    slack = -0.5  # the constraint L_elbo <= eps0 is violated by 0.5
    assert value.item() == pytest.approx(0.7 - (0.3 - 10 * slack) * slack)
    assert lmbda.grad.item() == pytest.approx(0.5)  # = L_elbo - eps0 > 0: ascent raises λ
    assert elbo.grad.item() == pytest.approx(0.3 - 10 * slack)  # λ − c·s pushes L_elbo down


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A pretrained tiny HVAE and tiny predictors, as checkpoints."""
    tmp = tmp_path_factory.mktemp("hvae_cf")
    torch.manual_seed(0)
    hvae = make_model()
    t = trainer(tmp, max_steps=2)
    t.fit(hvae, loader(16))
    t.save_checkpoint(tmp / "hvae.ckpt")
    network = {"_target_": "lightning_modules.networks.classifiers.ConvClassifier", "image_size": SIZE,
               "in_channels": 1, "base_width": 4, "n_outputs": 8}
    predictors = AntiCausalPredictor(PARENTS, network, feature_dim=8, conditions={"thickness": ["intensity"]})
    t = trainer(tmp, max_steps=2)
    t.fit(predictors, loader(16))
    t.save_checkpoint(tmp / "predictors.ckpt")
    return tmp


def make_finetune(upstream, **kwargs) -> CounterfactualFinetunedHVAE:
    return CounterfactualFinetunedHVAE(pretrained=str(upstream / "hvae.ckpt"),
                                       predictors=str(upstream / "predictors.ckpt"), warmup_steps=0, **kwargs)


class StepRecorder(pl.Callback):
    """Which parameters every optimizer step changed, and the RNG state when fitting started."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.module, self.rng = pl_module, torch.get_rng_state()
        for index, opt in enumerate(trainer.optimizers):
            opt.register_step_pre_hook(partial(self._pre, index))
            opt.register_step_post_hook(partial(self._post, index))

    def _pre(self, index, optimizer, args, kwargs):
        self.steps.append({"opt": index, "before": {n: p.detach().clone() for n, p in self.module.named_parameters()}})

    def _post(self, index, optimizer, args, kwargs):
        step = self.steps[-1]
        step["changed"] = {n for n, p in self.module.named_parameters() if not torch.equal(p, step["before"][n])}


def test_finetuning_starts_from_the_pretrained_average(upstream):
    model = make_finetune(upstream)
    pretrained = ConditionalHVAE.load_from_checkpoint(upstream / "hvae.ckpt")
    for k, v in pretrained.ema.module.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v) and torch.equal(model.ema.module.state_dict()[k], v)
    assert model.hparams.network == pretrained.hparams.network and model.hparams.pretrained is None


def test_each_optimizer_moves_only_its_own_parameters_and_the_predictors_never(upstream, tmp_path):
    torch.manual_seed(0)
    model, recorder = make_finetune(upstream, lambda_init=1.0, elbo_batches=1), StepRecorder()
    predictors = {k: v.clone() for k, v in model.predictors.state_dict().items()}
    trainer(tmp_path, max_epochs=1, callbacks=[recorder]).fit(model, loader(16, shuffle=True))
    assert [s["opt"] for s in recorder.steps] == [0, 1, 0, 1]
    hvae = {f"net.{n}" for n, _ in model.net.named_parameters()}
    for step in recorder.steps:
        assert step["changed"] == (hvae if step["opt"] == 0 else {"lmbda"})
    assert all(torch.equal(v, model.predictors.state_dict()[k]) for k, v in predictors.items())
    assert not any(p.requires_grad for p in model.predictors.parameters())
    assert not model.predictors.training and model.training


def test_eps0_is_the_measured_elbo_of_the_pretrained_model(upstream, tmp_path):
    torch.manual_seed(0)
    model, recorder = make_finetune(upstream, elbo_batches=2), StepRecorder()
    trainer(tmp_path, max_steps=2, callbacks=[recorder]).fit(model, loader(24))
    pretrained = make_finetune(upstream)
    torch.set_rng_state(recorder.rng)
    with torch.no_grad():
        losses = [pretrained.elbo_terms(pretrained.net.eval(), b["x"], b["pa"]).loss for b in loader(24)][:2]
    assert model.eps0.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)


def test_lambda_stays_non_negative_and_rises_while_the_constraint_is_violated(upstream, tmp_path):
    torch.manual_seed(0)
    # damping 0: the damping term acts on θ only, and with it a far-away ε₀ makes every θ-gradient "huge"
    satisfied = make_finetune(upstream, lambda_init=0.05, damping=0.0)
    satisfied.eps0.fill_(1e6)  # never violated: λ decays to its bound 0 and stays there
    trainer(tmp_path, max_epochs=2).fit(satisfied, loader(16))
    assert int(satisfied.skipped_updates) == 0 and satisfied.lmbda.item() == 0.0

    violated = make_finetune(upstream, lambda_init=0.0, damping=0.0)
    violated.eps0.fill_(-1e6)  # always violated: λ climbs by about lr per step
    trainer(tmp_path, max_epochs=2).fit(violated, loader(16))
    assert int(violated.skipped_updates) == 0 and violated.lmbda.item() > 0.3


def test_finetuned_checkpoint_rebuilds_without_the_upstream_files(upstream, tmp_path):
    torch.manual_seed(0)
    model = make_finetune(upstream, elbo_batches=1)
    t = trainer(tmp_path, max_steps=2)
    t.fit(model, loader(16))
    t.save_checkpoint(tmp_path / "cf.ckpt")
    restored = CounterfactualFinetunedHVAE.load_from_checkpoint(tmp_path / "cf.ckpt")
    assert restored.hparams.pretrained is None and restored.hparams.predictors is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, restored.state_dict()[k]), k
    (metrics,) = trainer(tmp_path).validate(restored, loader(8), verbose=False)
    assert metrics["val/loss"] == pytest.approx(metrics["val/loss/cf"] + metrics["val/constraint_violation"])


def test_missing_pretrained_checkpoint_names_the_experiment_to_train(upstream, tmp_path):
    with pytest.raises(FileNotFoundError, match="make train EXP=hvae_morphomnist_synth"):
        CounterfactualFinetunedHVAE(
            pretrained=str(tmp_path / "runs/hvae_morphomnist_synth/latest/checkpoints/last.ckpt"),
            predictors=str(upstream / "predictors.ckpt"))


def test_finetuning_passes_the_hvae_options_through_and_names_a_wrong_one(upstream):
    from configs.loader import ConfigError, instantiate

    model = make_finetune(upstream, grad_clip=123.0, sample_temperature=0.5)
    assert model.hparams.grad_clip == 123.0 and model.hparams.sample_temperature == 0.5
    assert model.hparams.warmup_steps == 0  # make_finetune's
    assert model.hparams.grad_skip == 500.0  # ConditionalHVAE's default, saved with the rest
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['grad_clp'\]"):
        make_finetune(upstream, grad_clp=1.0)
    # the config check reads the one parameter list: a misspelt option is named with its likely fix
    with pytest.raises(ConfigError, match=r"'model.grad_clp' is not a parameter.*grad_clip"):
        instantiate({"_target_": "lightning_modules.hvae_finetune.CounterfactualFinetunedHVAE", "grad_clp": 1.0},
                    "model")
