"""The attribute mechanisms of the Deep SCM (lightning_modules/networks/scm.py): flows invert and their log-determinants
match autograd's Jacobians, interventions propagate to descendants only, Gumbel-max abduction reproduces the
factual values, training by NLL learns the Deep-SCM MorphoMNIST mechanisms, and checkpoints round-trip."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules.base import CounterfactualModule
from lightning_modules.networks.blocks import build_network, network_config
from lightning_modules.networks.scm import AttributeSCM, FlowMechanism, resolve_scm
from lightning_modules.scm import AttributeMechanisms

THICKNESS = (0.87598526, 6.255515)  # published training extremes (notes §2) -> [-1, 1]
INTENSITY = (66.601204, 254.90317)
MORPHO = {
    "thickness": {"kind": "continuous", "low": THICKNESS[0], "high": THICKNESS[1]},
    "intensity": {"kind": "continuous", "low": INTENSITY[0], "high": INTENSITY[1]},
    "digit": {"kind": "categorical", "num_classes": 10},
}
MORPHO_GRAPH = {"intensity": ["thickness"]}
CELEBA = ["Young", "Male", "No_Beard", "Bald"]
CELEBA_GRAPH = {"No_Beard": ["Young", "Male"], "Bald": ["Young", "Male"]}


def make_scm(parents, graph, seed: int = 0, scale: float = 0.2, **kwargs) -> AttributeSCM:
    """An SCM with seeded random parameters (fresh flows are near the identity, fresh Gumbel-max logits
    uniform). Much larger perturbations of the flows make the splines' bins so uneven that float32 cannot
    invert three of them in a row."""
    torch.manual_seed(seed)
    scm = AttributeSCM(parents, graph, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in scm.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return scm


def morpho_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"thickness": torch.rand(n, generator=gen) * 1.8 - 0.9,
            "intensity": torch.rand(n, generator=gen) * 1.8 - 0.9,
            "digit": torch.randint(0, 10, (n,), generator=gen).float()}


def celeba_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randint(0, 2, (n,), generator=gen).float() for name in CELEBA}


def deepscm_morphomnist(n: int, seed: int) -> dict[str, torch.Tensor]:
    """The Deep-SCM generating process (notes §2), normalised with the published ranges:
    t = 0.5 + Gamma(10, rate 5), i = 64 + 191 sigmoid(2t - 5 + 0.5 eps)."""
    gen = torch.Generator().manual_seed(seed)
    u_t = torch._standard_gamma(torch.full((n,), 10.0), generator=gen) / 5.0
    eps = torch.randn(n, generator=gen)
    t = 0.5 + u_t
    i = 64.0 + 191.0 * torch.sigmoid(2.0 * t - 5.0 + 0.5 * eps)
    norm = lambda v, lo_hi: 2.0 * (v - lo_hi[0]) / (lo_hi[1] - lo_hi[0]) - 1.0  # noqa: E731
    return {"thickness": norm(t, THICKNESS), "intensity": norm(i, INTENSITY),
            "digit": torch.randint(0, 10, (n,), generator=gen).float(), "eps": eps}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These networks are tiny: a second thread only adds synchronisation (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- flows ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def morpho_scm() -> AttributeSCM:
    return make_scm(MORPHO, MORPHO_GRAPH)


def flows_with_context(scm: AttributeSCM, n: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    for name in ("thickness", "intensity"):
        context = (torch.rand(n, 1, generator=gen) * 2 - 1).to(dtype) if name == "intensity" else None
        yield name, scm.mechanisms[name].flow, context


def test_the_flows_are_the_table_6_layers(morpho_scm):
    layers = {n: [type(layer).__name__ for layer in morpho_scm.mechanisms[n].flow.layers]
              for n in ("thickness", "intensity")}
    splines = ["AutoregressiveRationalQuadraticSpline"] * 3
    tail = ["AffineConstFlow", "Logit", "AffineConstFlow"]
    assert layers["thickness"] == [*splines, *tail]
    assert layers["intensity"] == ["MaskedAffineAutoregressive", *splines, *tail]
    assert len(AttributeSCM(MORPHO, MORPHO_GRAPH, n_layers=5).mechanisms["intensity"].flow.layers) == 9


def test_flows_invert_to_1e_5(morpho_scm):
    x = torch.linspace(-1.0, 1.0, 201)[:, None]
    for name, flow, context in flows_with_context(morpho_scm, len(x)):
        with torch.no_grad():
            z, _ = flow.inverse(x, context)
            x_again, _ = flow(z, context)
            z_again, _ = flow.inverse(flow(z, context)[0], context)
        assert torch.isfinite(z).all(), name
        assert (x_again - x).abs().max() < 1e-5, name
        assert (z_again - z).abs().max() < 1e-4, name


def _log_abs_jacobian(fn, inputs: torch.Tensor) -> torch.Tensor:
    """log|d fn(x)_b / d x_b| per sample from autograd's full Jacobian (asserting it is diagonal)."""
    jac = torch.autograd.functional.jacobian(fn, inputs)[:, 0, :, 0]  # [B, B]
    off = jac - torch.diag(torch.diagonal(jac))
    assert off.abs().max() == 0, "samples must not interact"
    return torch.diagonal(jac).abs().log()


def test_every_layer_log_det_matches_autograd():
    scm = make_scm(MORPHO, MORPHO_GRAPH).double()
    z = torch.randn(6, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for name, flow, context in flows_with_context(scm, len(z), torch.float64):
        h = z
        for i, layer in enumerate(flow.layers):
            ctx = {"context": context} if flow.takes_context[i] else {}
            out, log_det = layer(h, **ctx)
            expected = _log_abs_jacobian(lambda v, layer=layer, ctx=ctx: layer(v, **ctx)[0], h)
            torch.testing.assert_close(log_det.expand(len(h)), expected, atol=1e-9, rtol=1e-9,
                                       msg=f"{name} layer {i} forward")
            back, inv_log_det = layer.inverse(out, **ctx)
            expected = _log_abs_jacobian(lambda v, layer=layer, ctx=ctx: layer.inverse(v, **ctx)[0], out)
            torch.testing.assert_close(inv_log_det.expand(len(h)), expected, atol=1e-9, rtol=1e-9,
                                       msg=f"{name} layer {i} inverse")
            torch.testing.assert_close(back, h, atol=1e-9, rtol=0)
            h = out


def test_log_prob_is_base_density_plus_autograd_log_det():
    scm = make_scm(MORPHO, MORPHO_GRAPH).double()
    x = torch.linspace(-0.99, 0.99, 7, dtype=torch.float64)[:, None]
    for _, flow, context in flows_with_context(scm, len(x), torch.float64):
        z, _ = flow.inverse(x, context)
        log_dz_dx = _log_abs_jacobian(lambda v, flow=flow, context=context: flow.inverse(v, context)[0], x)
        loc, scale = flow.base.loc[0, 0], flow.base.log_scale[0, 0].exp()
        base = torch.distributions.Normal(loc, scale).log_prob(z[:, 0])
        torch.testing.assert_close(flow.log_prob(x, context), base + log_dz_dx, atol=1e-9, rtol=1e-9)


def test_sigmoid_layer_inverse_log_det_is_minus_log_y_minus_log_one_minus_y(morpho_scm):
    sigmoid = morpho_scm.mechanisms["intensity"].flow.layers[-2]
    y = torch.tensor([[0.1], [0.5], [0.9]])
    _, log_det = sigmoid.inverse(y)
    torch.testing.assert_close(log_det, -(y.log() + (1 - y).log())[:, 0])


def test_continuous_outputs_are_bounded(morpho_scm):
    z = torch.linspace(-30.0, 30.0, 101)[:, None]
    with torch.no_grad():
        for _, flow, context in flows_with_context(morpho_scm, len(z)):
            assert flow(z, context)[0].abs().max() <= 1.05
    unbounded = AttributeSCM(MORPHO, MORPHO_GRAPH, bound=None)
    assert [type(layer).__name__ for layer in unbounded.mechanisms["thickness"].flow.layers][-1] == "AffineConstFlow"


# -- interventions -------------------------------------------------------------------------------------------
def test_do_thickness_changes_intensity_through_its_mechanism(morpho_scm):
    pa = morpho_batch(32)
    new_t = -pa["thickness"]
    cf = morpho_scm.counterfactual_parents(pa, {"thickness": new_t})
    flow = morpho_scm.mechanisms["intensity"].flow
    with torch.no_grad():  # by hand: invert with the factual thickness, re-run with the new one
        u, _ = flow.inverse(pa["intensity"][:, None], pa["thickness"][:, None])
        by_hand, _ = flow(u, new_t[:, None])
    assert torch.equal(cf["thickness"], new_t)
    assert torch.equal(cf["intensity"], by_hand[:, 0])
    assert (cf["intensity"] != pa["intensity"]).all()
    assert cf["digit"] is pa["digit"]


def test_do_intensity_leaves_thickness_and_digit_exactly(morpho_scm):
    pa = morpho_batch(32)
    cf = morpho_scm.counterfactual_parents(pa, {"intensity": torch.full((32,), 0.25)})
    assert cf["thickness"] is pa["thickness"] and cf["digit"] is pa["digit"]
    assert torch.equal(cf["intensity"], torch.full((32,), 0.25))


def test_do_digit_changes_nothing_else_and_scalars_broadcast(morpho_scm):
    pa = morpho_batch(8)
    cf = morpho_scm.counterfactual_parents(pa, {"digit": 3})
    assert torch.equal(cf["digit"], torch.full((8,), 3.0))
    assert cf["thickness"] is pa["thickness"] and cf["intensity"] is pa["intensity"]


def test_multi_variable_interventions():
    scm = make_scm(CELEBA, CELEBA_GRAPH)
    pa = celeba_batch(500)
    flipped_young, bald = 1 - pa["Young"], torch.ones(500)
    cf = scm.counterfactual_parents(pa, {"Young": flipped_young, "Bald": bald}, torch.Generator().manual_seed(0))
    assert cf["Male"] is pa["Male"]
    assert torch.equal(cf["Young"], flipped_young) and torch.equal(cf["Bald"], bald)  # do wins over propagation
    assert (cf["No_Beard"] != pa["No_Beard"]).any(), "No_Beard is recomputed from the new Young"

    morpho = make_scm(MORPHO, MORPHO_GRAPH)
    pa = morpho_batch(8)
    cf = morpho.counterfactual_parents(pa, {"thickness": torch.zeros(8), "intensity": torch.ones(8)})
    assert torch.equal(cf["intensity"], torch.ones(8)) and cf["digit"] is pa["digit"]


def test_descendants_and_roots():
    scm = AttributeSCM(CELEBA, CELEBA_GRAPH)
    assert scm.descendants(["Young"]) == {"No_Beard", "Bald"}
    assert scm.descendants(["No_Beard"]) == set()
    pa = celeba_batch(16)
    cf = scm.counterfactual_parents(pa, {"No_Beard": 1 - pa["No_Beard"]})
    assert all(cf[n] is pa[n] for n in ("Young", "Male", "Bald"))


# -- Gumbel-max ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.3, 3.0])  # 3: near-deterministic mechanisms, logits in the tens
def test_gumbel_abduction_reproduces_the_factual_values_exactly(scale):
    scm = make_scm(CELEBA, CELEBA_GRAPH, scale=scale)
    pa = celeba_batch(4000)
    noise = scm.abduct(pa, torch.Generator().manual_seed(0))
    again = scm.predict(noise)  # every variable re-predicted from its noise and its predicted parents
    assert all(torch.equal(again[n], pa[n]) for n in CELEBA)
    cf = scm.counterfactual_parents(pa, {"Young": pa["Young"], "Male": pa["Male"]})
    assert all(torch.equal(cf[n], pa[n]) for n in CELEBA)


def test_do_factual_returns_pa_for_flows_too(morpho_scm):
    pa = morpho_batch(64)
    cf = morpho_scm.counterfactual_parents(pa, {"thickness": pa["thickness"].clone()})
    assert all(torch.equal(cf[n], pa[n]) for n in MORPHO)
    again = morpho_scm.predict(morpho_scm.abduct(pa), fixed={"thickness": pa["thickness"]})
    assert again["thickness"] is pa["thickness"] and torch.equal(again["digit"], pa["digit"])
    assert (again["intensity"] - pa["intensity"]).abs().max() < 1e-5


def test_gumbel_abduction_is_seedable():
    scm = make_scm(CELEBA, CELEBA_GRAPH, scale=0.3)
    pa = celeba_batch(400)
    do = {"Male": 1 - pa["Male"]}
    first = scm.counterfactual_parents(pa, do, torch.Generator().manual_seed(7))
    second = scm.counterfactual_parents(pa, do, torch.Generator().manual_seed(7))
    other = scm.counterfactual_parents(pa, do, torch.Generator().manual_seed(8))
    assert all(torch.equal(first[n], second[n]) for n in CELEBA)
    assert any(not torch.equal(first[n], other[n]) for n in ("No_Beard", "Bald"))
    torch.manual_seed(3)
    a = scm.counterfactual_parents(pa, do)
    torch.manual_seed(3)
    b = scm.counterfactual_parents(pa, do)
    assert all(torch.equal(a[n], b[n]) for n in CELEBA)


def test_gumbel_posterior_averages_to_the_prior():
    """Values drawn from the mechanism, then g abducted from them: pooled, g is i.i.d. Gumbel(0, 1)."""
    scm = AttributeSCM(["Smiling"])
    with torch.no_grad():
        scm.mechanisms["Smiling"].logits.copy_(torch.tensor([0.3, -1.2]))
    gen = torch.Generator().manual_seed(0)
    values = scm.sample(40000, gen)
    g = scm.abduct(values, gen)["Smiling"]
    assert abs(values["Smiling"].mean().item() - torch.tensor([0.3, -1.2]).softmax(0)[1].item()) < 0.01
    torch.testing.assert_close(g.mean(0), torch.full((2,), 0.5772, dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(g.var(0), torch.full((2,), math.pi**2 / 6, dtype=torch.float64), atol=0.06, rtol=0)


# -- construction --------------------------------------------------------------------------------------------
def test_graph_errors_are_clear():
    with pytest.raises(ValueError, match="cycle"):
        AttributeSCM(CELEBA, {"Young": ["Male"], "Male": ["Young"]})
    with pytest.raises(ValueError, match="did you mean 'No_Beard'"):
        AttributeSCM(CELEBA, {"No_Bread": ["Young"]})
    with pytest.raises(ValueError, match="parent of 'Bald'"):
        AttributeSCM(CELEBA, {"Bald": ["Yung"]})
    with pytest.raises(KeyError, match="unknown variable"):
        AttributeSCM(CELEBA, CELEBA_GRAPH).counterfactual_parents(celeba_batch(2), {"Smiling": 1})


def test_config_rebuilds_the_scm(morpho_scm):
    rebuilt = build_network(network_config(morpho_scm))
    rebuilt.load_state_dict(morpho_scm.state_dict())
    pa = morpho_batch(16)
    with torch.no_grad():
        assert torch.equal(rebuilt.log_prob(pa), morpho_scm.log_prob(pa))
    assert rebuilt.graph == MORPHO_GRAPH and rebuilt.order == ["thickness", "intensity", "digit"]


def test_flow_parameter_counts():
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in AttributeSCM(MORPHO, MORPHO_GRAPH).mechanisms.items()}
    assert isinstance(AttributeSCM(MORPHO, MORPHO_GRAPH).mechanisms["intensity"], FlowMechanism)
    assert counts == {"thickness": 2905, "intensity": 3579, "digit": 10}


# -- training ------------------------------------------------------------------------------------------------
def test_nll_training_learns_the_deepscm_mechanisms():
    torch.manual_seed(0)
    parents = {k: MORPHO[k] for k in ("thickness", "intensity")}
    scm = AttributeSCM(parents, MORPHO_GRAPH, hidden_features=8)
    train, held_out = deepscm_morphomnist(4096, seed=0), deepscm_morphomnist(1024, seed=1)
    pa_test = {k: held_out[k] for k in parents}
    with torch.no_grad():
        before = -scm.log_prob(pa_test).mean().item()
    opt = torch.optim.Adam(scm.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, 4096, (128,), generator=gen)
        loss = -scm.log_prob({k: train[k][idx] for k in parents}).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = -scm.log_prob(pa_test).mean().item()
    assert after < before - 1.0, (before, after)
    x = torch.linspace(-1.0, 1.0, 201)[:, None]
    for _, flow, context in flows_with_context(scm, len(x)):
        with torch.no_grad():
            assert (flow(flow.inverse(x, context)[0], context)[0] - x).abs().max() < 1e-5

    up = scm.counterfactual_parents(pa_test, {"thickness": torch.full((1024,), 0.5)})
    down = scm.counterfactual_parents(pa_test, {"thickness": torch.full((1024,), -0.5)})
    assert (up["intensity"] > down["intensity"]).float().mean() > 0.95
    # against the true counterfactual: the same eps through the true mechanism at the new thickness
    t_raw = (0.5 + 1.0) * 0.5 * (THICKNESS[1] - THICKNESS[0]) + THICKNESS[0]
    true_i = 64.0 + 191.0 * torch.sigmoid(2.0 * t_raw - 5.0 + 0.5 * held_out["eps"])
    true_i = 2.0 * (true_i - INTENSITY[0]) / (INTENSITY[1] - INTENSITY[0]) - 1.0
    assert torch.corrcoef(torch.stack([up["intensity"], true_i]))[0, 1] > 0.95
    assert (up["intensity"] - true_i).abs().mean() < 0.04  # 0.016 here, i.e. 1.5 grey levels


# -- checkpoints ---------------------------------------------------------------------------------------------
class ParentsOnly(Dataset):
    def __init__(self, pa: dict[str, torch.Tensor]):
        self.pa = pa

    def __len__(self) -> int:
        return len(next(iter(self.pa.values())))

    def __getitem__(self, i: int):
        return {"x": torch.zeros(1, 4, 4), "pa": {k: v[i] for k, v in self.pa.items()}, "index": i}


def fit_tiny(model: pl.LightningModule, pa: dict[str, torch.Tensor], root) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, default_root_dir=str(root))
    loader = DataLoader(ParentsOnly(pa), batch_size=16, shuffle=True)
    trainer.fit(model, loader, DataLoader(ParentsOnly(pa), batch_size=16))
    return trainer


class TinyImageModel(CounterfactualModule):
    """A CounterfactualModule with nothing but the attached SCM."""

    def __init__(self, scm=None, scm_checkpoint: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.attach_scm(scm, scm_checkpoint)


@pytest.fixture(scope="module")
def scm_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("scm")
    parents = {**MORPHO, "Male": {"kind": "binary"}, "No_Beard": {"kind": "binary"}}
    graph = {**MORPHO_GRAPH, "No_Beard": ["Male", "thickness"]}
    module = AttributeMechanisms(AttributeSCM(parents, graph))
    pa = {**morpho_batch(64), "Male": celeba_batch(64)["Male"], "No_Beard": celeba_batch(64, 1)["No_Beard"]}
    trainer = fit_tiny(module, pa, root)
    path = root / "runs" / "scm_mixed" / "latest" / "checkpoints" / "best.ckpt"
    trainer.save_checkpoint(path)
    return path, module, pa, trainer


def test_attribute_mechanisms_log_their_nll(scm_checkpoint):
    _, module, _, trainer = scm_checkpoint
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/nll/thickness", "val/nll/intensity", "val/nll/digit",
            "val/nll/Male", "val/nll/No_Beard"} <= set(metrics)
    total = sum(metrics[f"val/nll/{n}"] for n in module.scm.attributes)
    torch.testing.assert_close(metrics["val/loss"], total)


def test_resolve_scm_from_a_checkpoint_alone(scm_checkpoint):
    path, module, pa, _ = scm_checkpoint
    loaded = resolve_scm(None, path)
    do = {"thickness": torch.zeros(64), "Male": 1 - pa["Male"]}
    expected = module.scm.counterfactual_parents(pa, do, torch.Generator().manual_seed(0))
    got = loaded.counterfactual_parents(pa, do, torch.Generator().manual_seed(0))
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    mine, theirs = loaded.state_dict(), module.scm.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    from_config = resolve_scm(network_config(module.scm), path)
    assert torch.equal(from_config.log_prob(pa), module.scm.log_prob(pa))


def test_image_model_checkpoint_carries_the_whole_scm(scm_checkpoint, tmp_path):
    path, module, pa, _ = scm_checkpoint
    scm_file = tmp_path / "scm.ckpt"
    scm_file.write_bytes(path.read_bytes())
    model = TinyImageModel(scm_checkpoint=str(scm_file))
    assert model.hparams.scm_checkpoint is None
    model_file = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__}, model_file)
    scm_file.unlink()
    reloaded = TinyImageModel.load_from_checkpoint(model_file)
    do = {"thickness": torch.full((64,), 0.3), "Male": 1 - pa["Male"]}
    torch.manual_seed(5)
    expected = model.counterfactual_parents(pa, do)
    torch.manual_seed(5)
    got = reloaded.counterfactual_parents(pa, do)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert all(not p.requires_grad for p in reloaded.scm.parameters())


def test_missing_scm_checkpoint_names_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "runs" / "scm_celeba_complex" / "latest" / "checkpoints" / "best.ckpt"
    with pytest.raises(FileNotFoundError, match=r"best\.ckpt not found.*make train EXP=scm_celeba_complex"):
        resolve_scm(None, missing)
    with pytest.raises(FileNotFoundError, match="make train EXP=scm_morphomnist"):
        TinyImageModel(scm_checkpoint=str(tmp_path / "elsewhere.ckpt"))
