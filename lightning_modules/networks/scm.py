"""Attribute mechanisms of a deep structural causal model (counterfactual_benchmark §3, App. A.1).

A Deep SCM puts an image mechanism under mechanisms for the attributes: every parent variable v is
v = f_v(u_v; pa(v)) with its own exogenous noise u_v, and the graph is declared in config
(``graph: {child: [its parents]}``; a variable absent from the graph's keys is a root). ``AttributeSCM`` holds
one mechanism per variable and does abduction-action-prediction on the attributes:
``counterfactual_parents(pa, do)`` abducts u_v for every descendant of the intervened variables from the
factual values, sets the intervened variables to their ``do`` values and re-runs the descendants' mechanisms
in topological order from their noise and their NEW parents (do(thickness) changes intensity). Every other
variable is returned as the very tensor it came in as. Several variables may be intervened on at once; an
intervened descendant of another intervened variable keeps its ``do`` value.

Mechanisms, by the variable's kind (values in batch units, ``datamodules.base``):

* continuous: a conditional normalising flow built from normflows 1.7.3 layers, x = f(z; c), z ~ N(loc,
  scale²) (trainable ``DiagGaussian``), c = the parents' conditioning vector. The layers follow Table 6 (the
  intensity flow) and the reference code (notes §2)::

      [MaskedAffineAutoregressive(context=c)]   only when the variable has parents: an affine map of z whose
                                                shift and scale are a small MADE of the parents
      n_layers x AutoregressiveRationalQuadraticSpline   (Table 6: three; read from config, unlike the
                                                reference, which ignores its "layers" key)
      AffineConstFlow                           learned scale and shift
      Logit(alpha=0) + fixed AffineConstFlow    "Sigmoid Transformation" + "Constant AddScale": y = σ(·), then
                                                x = 2B·y − B, so x ∈ (−B, B) with B = ``bound``

  Abduction is u = f⁻¹(x; pa), prediction x* = f(u; pa*): exact and deterministic.
* binary and categorical: a Gumbel-max mechanism, v = argmax_k(l_k(pa) + g_k) with g_k i.i.d. Gumbel(0, 1),
  l = log_softmax of an MLP of the parents whose last layer is zero-initialised (uniform at the start), or a
  learned logit vector for a root. Abduction samples g from its posterior given the observed class
  (the truncated Gumbel construction of Maddison et al. 2014 and Oberst & Sontag 2019), so it is stochastic:
  pass a ``torch.Generator`` or seed the global RNG. Prediction is argmax(l(pa*) + g), which returns the
  factual class when pa* = pa. A categorical root (MorphoMNIST's digit) gets the same mechanism: its learned
  categorical gives its likelihood and ``sample``, and as a root it is never recomputed.

Deliberate deviations from the reference code (notes §2):

* The sigmoid's log-determinant is normflows' ``Logit(alpha=0)``: −log y − log(1 − y) on the inverse (the
  reference's custom sigmoid had the wrong sign there, so its likelihood was mis-specified).
* Outputs are bounded to (−B, B), B = 1.05 by default, for EVERY continuous variable (the reference bounds
  neither: its thickness flow ends in an affine map, its intensity flow puts a learned affine map AFTER the
  sigmoid). Why: the data are min-max normalised with the training extremes, so every training value lies in
  [−1, 1], and the image mechanism and the predictors were never trained outside it; an unbounded flow can
  propagate do(thickness) to intensities beyond that range (the true intensity is bounded: 64 + 191·σ(·) is
  at most 1.001 in batch units). Exactly (−1, 1) would put the training extremes on the boundary, where the
  inverse is infinite; the 5% margin keeps them interior and their abduction exact in float32. The learned
  affine layer therefore sits before the sigmoid. ``bound: null`` gives the reference's unbounded flows.
  Values outside (−B, B) (possible only for data not normalised by its own training range) are clamped to
  just inside it before abduction and likelihood.
* The widths of the MADEs (``hidden_features``) are ours: the paper gives none and the reference's single
  hidden unit makes the conditional shift and scale nearly linear in the parents.

The likelihood of a continuous variable is a density in batch units (normalised [−1, 1]), so NLLs of
continuous variables can be negative. ``lightning_modules.scm.AttributeMechanisms`` trains every mechanism by
this NLL (Adam, lr 1e-3 as App. A.1); ``resolve_scm`` (hence ``CounterfactualModule.attach_scm``) reads its
checkpoint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import normflows as nf
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.base import Attribute, check_name, condition_vector, parents_from_spec
from lightning_modules.checkpoints import load_checkpoint
from lightning_modules.networks.blocks import _plain, build_network, remember_config

# Clamp margin for continuous values at the edge of a bounded flow's support (relative to the bound).
_EDGE = 1e-6
# Smallest gap kept between the abducted top Gumbel and the others, so argmax reproduces the factual class
# despite rounding (float64 sums are exact to ~1e-15 here).
_GUMBEL_GAP = 1e-9


def gumbel(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel(0, 1) draws (float64) from ``generator`` (or the global RNG)."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64, device=gen_device).to(device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))


class ConditionalFlow(nn.Module):
    """x = f(z; c) with z ~ ``base``; ``layers`` are normflows flows applied z -> x in order, the context
    passed to the layers listed in ``conditioned`` (the others were built without a context input)."""

    def __init__(self, base: nn.Module, layers: Sequence[nn.Module], conditioned: Sequence[int] = ()):
        super().__init__()
        self.base = base
        self.layers = nn.ModuleList(layers)
        self.takes_context = [i in set(conditioned) for i in range(len(layers))]

    def _run(self, layer_idx: int, value: torch.Tensor, context: torch.Tensor | None, inverse: bool):
        layer = self.layers[layer_idx]
        step = layer.inverse if inverse else layer.forward
        if self.takes_context[layer_idx]:
            return step(value, context=context)
        return step(value)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, log|dx/dz|) for z [B, 1]."""
        log_det = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for i in range(len(self.layers)):
            z, ld = self._run(i, z, context, inverse=False)
            log_det = log_det + ld
        return z, log_det

    def inverse(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, log|dz/dx|) for x [B, 1]."""
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in reversed(range(len(self.layers))):
            x, ld = self._run(i, x, context, inverse=True)
            log_det = log_det + ld
        return x, log_det

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | c) = log q0(f⁻¹(x; c)) + log|df⁻¹/dx| [B]."""
        z, log_det = self.inverse(x, context)
        return self.base.log_prob(z) + log_det

    def sample_base(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z [n, 1] ~ the (trainable) diagonal Gaussian base."""
        loc, log_scale = self.base.loc, self.base.log_scale
        gen_device = generator.device if generator is not None else loc.device
        eps = torch.randn((n, *loc.shape[1:]), generator=generator, dtype=loc.dtype, device=gen_device)
        return loc + log_scale.exp() * eps.to(loc.device)


def fixed_affine(scale: float, shift: float) -> nf.flows.AffineConstFlow:
    """x = scale · y + shift as a normflows layer with constant (buffer) parameters."""
    layer = nf.flows.AffineConstFlow((1,), scale=False, shift=False)
    layer.s.fill_(math.log(scale))
    layer.t.fill_(shift)
    return layer


class FlowMechanism(nn.Module):
    """A continuous variable: the conditional flow of the module docstring. Noise: the base value z [B]."""

    def __init__(self, context_dim: int, n_layers: int, hidden_features: int, num_blocks: int, num_bins: int,
                 tail_bound: float, bound: float | None):
        super().__init__()
        layers: list[nn.Module] = []
        if context_dim:
            layers.append(nf.flows.MaskedAffineAutoregressive(
                1, hidden_features, context_features=context_dim, num_blocks=num_blocks))
        layers += [nf.flows.AutoregressiveRationalQuadraticSpline(1, num_blocks, hidden_features, num_bins=num_bins,
                                                                  tail_bound=tail_bound)
                   for _ in range(n_layers)]
        layers.append(nf.flows.AffineConstFlow((1,)))
        if bound is not None:
            layers += [nf.transforms.Logit(alpha=0.0), fixed_affine(2.0 * bound, -bound)]
        self.bound = bound
        self.flow = ConditionalFlow(nf.distributions.DiagGaussian(1), layers, conditioned=[0] if context_dim else [])

    def _inside(self, value: torch.Tensor) -> torch.Tensor:
        value = value.reshape(-1, 1).to(self.flow.base.loc.dtype)
        if self.bound is None:
            return value
        edge = self.bound * (1.0 - _EDGE)
        return value.clamp(-edge, edge)

    def log_prob(self, value: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return self.flow.log_prob(self._inside(value), context)

    def abduct(self, value: torch.Tensor, context: torch.Tensor | None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return self.flow.inverse(self._inside(value), context)[0][:, 0]

    def predict(self, noise: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return self.flow(noise.reshape(-1, 1), context)[0][:, 0]

    def sample(self, n: int, context: torch.Tensor | None, generator: torch.Generator | None = None):
        return self.predict(self.flow.sample_base(n, generator), context)


class GumbelMaxMechanism(nn.Module):
    """A binary or categorical variable: v = argmax(log_softmax(logits(pa)) + g), g ~ Gumbel(0, 1)^K.
    Noise: g [B, K] (float64)."""

    def __init__(self, num_classes: int, context_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.num_classes = int(num_classes)
        if context_dim:
            widths = [context_dim, *hidden]
            layers: list[nn.Module] = []
            for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
                layers += [nn.Linear(w_in, w_out), nn.ReLU()]
            last = nn.Linear(widths[-1], self.num_classes)
            nn.init.zeros_(last.weight)  # uniform class probabilities at the start, as the reference
            nn.init.zeros_(last.bias)
            self.net = nn.Sequential(*layers, last)
        else:
            self.logits = nn.Parameter(torch.zeros(self.num_classes))

    def log_softmax(self, context: torch.Tensor | None, n: int) -> torch.Tensor:
        """Normalised logits [n, K]."""
        raw = self.net(context) if hasattr(self, "net") else self.logits.expand(n, -1)
        return F.log_softmax(raw, dim=-1)

    def log_prob(self, value: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        index = value.reshape(-1).long()
        return self.log_softmax(context, len(index)).gather(1, index[:, None])[:, 0]

    def abduct(self, value: torch.Tensor, context: torch.Tensor | None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """g from its posterior given argmax(l + g) = value: the top perturbed logit M = l_k + g_k is
        Gumbel(logsumexp l) = Gumbel(0) (l is normalised); every other l_j + g_j is a Gumbel(l_j) draw
        truncated to lie below M, i.e. −log(exp(−M) + exp(−G_j)) with G_j ~ Gumbel(l_j)."""
        index = value.reshape(-1).long()
        logits = self.log_softmax(context, len(index)).detach().double()
        draws = gumbel((len(index), self.num_classes + 1), generator, logits.device)
        top = draws[:, :1]
        others = top - F.softplus(top - (logits + draws[:, 1:]))
        perturbed = torch.minimum(others, top - _GUMBEL_GAP * (1.0 + top.abs()))
        perturbed = perturbed.scatter(1, index[:, None], top)
        return perturbed - logits

    def predict(self, noise: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        logits = self.log_softmax(context, noise.shape[0]).detach().double()
        return (logits + noise).argmax(dim=1).to(torch.float32)

    def sample(self, n: int, context: torch.Tensor | None, generator: torch.Generator | None = None):
        device = self.net[-1].weight.device if hasattr(self, "net") else self.logits.device
        return self.predict(gumbel((n, self.num_classes), generator, device), context)


def topological_order(names: Sequence[str], graph: Mapping[str, Sequence[str]]) -> list[str]:
    """``names`` with every variable after its parents (ties in ``names`` order); raises on a cycle."""
    order: list[str] = []
    pending = list(names)
    while pending:
        ready = [v for v in pending if all(p in order for p in graph.get(v, ()))]
        if not ready:
            raise ValueError(f"the causal graph has a cycle among {pending} (graph: {dict(graph)})")
        order.append(ready[0])
        pending.remove(ready[0])
    return order


class AttributeSCM(nn.Module):
    """The attribute mechanisms of a Deep SCM and their abduction-action-prediction (module docstring).

    :param parents: the parents spec of ``datamodules.base.parents_from_spec`` (``{name: {kind, num_classes,
        low, high}}`` or a list of binary names): the variables, in batch units.
    :param graph: ``{child: [its parents]}``; variables absent from its keys are roots.
    :param n_layers: rational-quadratic spline layers per flow (Table 6: 3).
    :param hidden_features, num_blocks: width and residual blocks of the flows' MADEs.
    :param num_bins, tail_bound: the splines' bins and the interval they cover (identity outside).
    :param bound: continuous outputs lie in (−bound, bound); ``None``: unbounded (see the module docstring).
    :param mlp_hidden: hidden widths of the Gumbel-max mechanisms' logit MLPs (the reference's 64, 64).
    """

    def __init__(
        self,
        parents: Mapping[str, Mapping[str, Any]] | Sequence[str],
        graph: Mapping[str, Sequence[str]] | None = None,
        n_layers: int = 3,
        hidden_features: int = 16,
        num_blocks: int = 1,
        num_bins: int = 8,
        tail_bound: float = 3.0,
        bound: float | None = 1.05,
        mlp_hidden: Sequence[int] = (64, 64),
    ):
        super().__init__()
        remember_config(self, locals())
        self.attributes = {a.name: a for a in parents_from_spec(_plain(parents))}
        if not self.attributes:
            raise ValueError("AttributeSCM needs at least one variable in `parents`")
        if n_layers < 0 or hidden_features < 1 or num_blocks < 1 or num_bins < 2:
            raise ValueError(f"need n_layers >= 0, hidden_features >= 1, num_blocks >= 1 and num_bins >= 2, got "
                             f"{n_layers}, {hidden_features}, {num_blocks}, {num_bins}")
        if bound is not None and not bound > 1.0:
            raise ValueError(f"bound must exceed 1 (batch values reach ±1) or be null, got {bound}")
        names = list(self.attributes)
        self.graph = {str(child): [str(p) for p in pas] for child, pas in (_plain(graph) or {}).items()}
        for child, pas in self.graph.items():
            check_name(child, names, "variable in the graph")
            for p in pas:
                check_name(p, names, f"parent of {child!r} in the graph")
            if child in pas or len(set(pas)) != len(pas):
                raise ValueError(f"the parents of {child!r} must be distinct and exclude itself, got {pas}")
        self.order = topological_order(names, self.graph)
        self.mechanisms = nn.ModuleDict()
        for name, a in self.attributes.items():
            context_dim = sum(self.attributes[p].dim for p in self.graph.get(name, ()))
            if a.kind == "continuous":
                self.mechanisms[name] = FlowMechanism(context_dim, n_layers, hidden_features, num_blocks, num_bins,
                                                      tail_bound, bound)
            else:
                self.mechanisms[name] = GumbelMaxMechanism(a.dim if a.kind == "categorical" else 2, context_dim,
                                                           mlp_hidden)

    # -- graph ---------------------------------------------------------------------------------------------
    def parents_of(self, name: str) -> list[Attribute]:
        return [self.attributes[p] for p in self.graph.get(name, ())]

    def descendants(self, names: Sequence[str]) -> set[str]:
        """Every variable downstream of ``names`` (``names`` excluded unless one descends from another)."""
        found: set[str] = set()
        frontier = set(names)
        while frontier:
            children = {c for c, pas in self.graph.items() if frontier & set(pas)} - found
            found |= children
            frontier = children
        return found

    def _context(self, name: str, values: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        parents = self.parents_of(name)
        if not parents:
            return None
        device = next(self.mechanisms[name].parameters()).device
        return condition_vector(values, parents).to(device)

    def _check(self, pa: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self.attributes if n not in pa]
        if missing:
            raise KeyError(f"the SCM needs values of {missing}; pa has {sorted(pa)}")

    # -- the model -----------------------------------------------------------------------------------------
    def log_probs(self, pa: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{variable: log p(v | pa(v)) [B]} (continuous: density in batch units)."""
        self._check(pa)
        return {n: self.mechanisms[n].log_prob(pa[n], self._context(n, pa)) for n in self.order}

    def log_prob(self, pa: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log p(pa) [B]: the sum over the variables of the SCM's factorisation."""
        return torch.stack(list(self.log_probs(pa).values())).sum(dim=0)

    def abduct(self, pa: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
               names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """{variable: its exogenous noise} given the factual values ``pa`` (only ``names`` when given)."""
        self._check(pa)
        wanted = self.order if names is None else [n for n in self.order if n in set(names)]
        return {n: self.mechanisms[n].abduct(pa[n], self._context(n, pa), generator) for n in wanted}

    def predict(self, noise: Mapping[str, torch.Tensor],
                fixed: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every variable in topological order: those in ``fixed`` (intervened or held values) as given, the
        others from their ``noise`` and their (predicted or fixed) parents."""
        values = dict(fixed or {})
        for name in self.order:
            if name in values:
                continue
            if name not in noise:
                raise KeyError(f"predict needs the noise of {name!r} or a fixed value for it")
            values[name] = self.mechanisms[name].predict(noise[name], self._context(name, values))
        return values

    @torch.no_grad()
    def counterfactual_parents(self, pa: Mapping[str, torch.Tensor], do: Mapping[str, Any],
                               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Abduction, action, prediction: the intervened variables at their ``do`` values (scalars or [B]),
        their descendants recomputed from their abducted noise and new parents, every other entry of ``pa``
        returned as is (the same tensor). No gradients: the mechanisms are fixed when they are used."""
        self._check(pa)
        unknown = [n for n in do if n not in pa]
        if unknown:
            raise KeyError(f"intervention on unknown variable(s) {unknown}; the parents are {sorted(pa)}")
        first = pa[self.order[0]]
        batch = torch.as_tensor(first).reshape(-1).shape[0]
        values = dict(pa)
        for name, v in do.items():
            v = torch.as_tensor(v, dtype=torch.float32, device=torch.as_tensor(first).device)
            values[name] = torch.broadcast_to(v.reshape(-1) if v.ndim else v, (batch,))
        recompute = self.descendants(list(do)) - set(do)
        noise = self.abduct(pa, generator, names=list(recompute))
        for name in self.order:
            if name in recompute:
                predicted = self.mechanisms[name].predict(noise[name], self._context(name, values))
                # Where no parent changed, the prediction is the factual value up to the flow's round-trip
                # rounding (~1e-7): return the factual value itself.
                same = torch.stack([values[p] == pa[p] for p in self.graph[name]]).all(dim=0)
                values[name] = torch.where(same, torch.as_tensor(pa[name], dtype=predicted.dtype), predicted)
        return values

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``n`` ancestral samples {variable: [n]} in batch units."""
        values: dict[str, torch.Tensor] = {}
        for name in self.order:
            values[name] = self.mechanisms[name].sample(n, self._context(name, values), generator)
        return values


# -- loading -----------------------------------------------------------------------------------------------
def _experiment_of(path: Path) -> str:
    """The experiment whose run wrote ``path`` (``<runs>/<experiment>/<run>/checkpoints/<file>``)."""
    parts = path.parts
    if len(parts) >= 4 and parts[-2] == "checkpoints" and re.fullmatch(r"[A-Za-z0-9_]+", parts[-4]):
        return parts[-4]
    return "scm_morphomnist"


def resolve_scm(scm: nn.Module | Mapping[str, Any] | None = None,
                scm_checkpoint: str | Path | None = None) -> AttributeSCM:
    """An ``AttributeSCM`` from a module, a ``_target_`` config and/or the checkpoint of a trained one.

    With a checkpoint (an ``AttributeMechanisms`` checkpoint, or that of any model with the SCM attached) its
    ``scm.*`` weights are loaded into ``scm`` (built from it when a config) or, when ``scm`` is None, into an
    SCM built from the config stored in the checkpoint's hyperparameters.
    """
    if scm is None and scm_checkpoint is None:
        raise ValueError("resolve_scm needs an SCM (module or config) or the checkpoint of a trained one")
    if scm_checkpoint is None:
        return build_network(scm)
    path = Path(scm_checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"SCM checkpoint {path} not found. Train the attribute mechanisms first: "
            f"make train EXP={_experiment_of(path)}")
    ckpt = load_checkpoint(path, "SCM checkpoint")
    config = scm if scm is not None else (ckpt.get("hyper_parameters") or {}).get("scm")
    if config is None:
        raise ValueError(f"{path} holds no SCM: its hyperparameters have no 'scm' entry (expected the checkpoint "
                         f"of an AttributeMechanisms run such as scm_morphomnist)")
    module = build_network(config)
    state = {k[len("scm."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("scm.")}
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"the SCM weights in {path} do not fit the SCM config given: {err}") from err
    return module
