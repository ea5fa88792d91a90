"""Anti-causal predictors g_θ^i: the judges of Effectiveness and the embedding of composition / FID-domain.

The benchmark (Melistas et al., §3.3 eq. 8 and App. A.5) trains one predictor per parent on real images:
regressors for continuous parents, a classifier for categorical ones, binary classifiers for binary ones. A
predictor may be conditioned on other parents: on MorphoMNIST thickness causes intensity, so the thickness
predictor is q(t | x, i) (``conditions={"thickness": ["intensity"]}``).

One ``AntiCausalPredictor`` holds one predictor per target parent, each with its OWN network (as the
benchmark's separately trained predictors): the image network (a copy of the ``network`` template, e.g.
``ConvClassifier`` with ``n_outputs = feature_dim``) is followed by BatchNorm1d + LeakyReLU(0.01), which gives
the penultimate features (the "Linear 512, BN, LReLU" row of Table 17, width ``feature_dim``); the condition
parents are concatenated to these features and a head (``MLPClassifier``; a single linear layer by default)
gives the output. The networks are disjoint and each loss touches only its own network, so the summed loss
trains every predictor exactly as if it were trained alone (Adam is per-parameter).

Losses, one per target by its kind (averaged over the batch):

* continuous: MSE on the normalised value in [-1, 1] (the benchmark regresses in normalised space). We
  chose MSE over a Gaussian NLL: the metric is an MAE of a point prediction, and a learned variance would
  only re-weight samples;
* categorical: cross-entropy on the class logits;
* binary: BCE with logits.

Conditions are fed in batch units: continuous as the normalised value, binary as 0./1., categorical as a
one-hot vector (its class index in the batch is a float).

Metric-facing API (both run in eval mode under no_grad and restore the train flags, so BatchNorm running
statistics and dropout are untouched — the reference code's defect, notes §1.2):

* ``predict_parents(x, pa=None) -> {name: [B]}`` in batch units: continuous normalised value, categorical
  class index as float, binary probability. The conditions come from ``pa`` (the counterfactual's requested
  values, as the benchmark does); a condition missing from ``pa`` is predicted from ``x`` by its own head.
* ``features(x) -> [B, n_targets * feature_dim]``: the penultimate image features of every predictor,
  concatenated in target order (the benchmark's "clfs" embedding). They do not include the conditions.
* ``parent_net(name)``: an ``nn.Module`` ``(x, c=None) -> raw output`` in the convention of
  ``callbacks.metrics.effectiveness.Predictor`` (``c``: [B, len(conditions)] values in batch units);
  ``callbacks.metrics.effectiveness.anti_causal_predictors`` wraps them all as such ``Predictor`` objects.

Parents are described in the config (``parents: {name: {kind, num_classes, low, high}}``) because a model is
built before the DataModule is set up; ``low``/``high`` (raw units of the normalised range) are optional and
only add MAE in original units to the logs. At ``setup`` the description is checked against the
DataModule's ``attributes`` when it has them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.base import Attribute, condition_vector, parent_attribute
from lightning_modules.base import SameStepEveryStage
from lightning_modules.networks.blocks import _plain, build_network, network_config
from lightning_modules.networks.classifiers import MLPClassifier
from lightning_modules.networks.frozen import evaluating

KINDS = ("continuous", "categorical", "binary")


def _condition_width(attribute: Attribute) -> int:
    return attribute.dim  # one-hot for categorical, 1 otherwise


def encode_conditions(values: Sequence[torch.Tensor], attributes: Sequence[Attribute]) -> torch.Tensor:
    """Condition values [B] in batch units -> the head's extra input [B, Σ widths] (categorical one-hot)."""
    return condition_vector({a.name: v for v, a in zip(values, attributes, strict=True)}, attributes)


def to_batch_units(out: torch.Tensor, attribute: Attribute) -> torch.Tensor:
    """A head's raw output -> its prediction [B] in batch units (binary: a probability)."""
    if attribute.kind == "categorical":
        return out.argmax(dim=1).to(torch.float32)
    if attribute.kind == "binary":
        return torch.sigmoid(out[:, 0])
    return out[:, 0]


def head_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The training loss of one head by its parent's kind, averaged over the batch (see the module docstring)."""
    target = target.reshape(-1)
    if kind == "continuous":
        return F.mse_loss(out[:, 0], target.to(out.dtype))
    if kind == "categorical":
        return F.cross_entropy(out, target.long())
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(out[:, 0], target.to(out.dtype))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


class ParentPredictor(nn.Module):
    """g(x[, c]) for one parent: image network -> BN + LeakyReLU features -> [features, c] -> head."""

    def __init__(
        self, network: nn.Module, feature_dim: int, head: nn.Module, conditions: Sequence[Attribute] = ()
    ):
        super().__init__()
        self.network = network
        self.post = nn.Sequential(nn.BatchNorm1d(feature_dim), nn.LeakyReLU(0.01))
        self.head = head
        self.conditions = tuple(conditions)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.network(x))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Raw output [B, out]; ``c``: [B, len(conditions)] condition values in batch units."""
        h = self.features(x)
        if self.conditions:
            if c is None:
                raise ValueError(
                    f"this predictor is conditioned on {[a.name for a in self.conditions]}; pass c"
                )
            c = c.reshape(c.shape[0], -1).to(h.device)
            h = torch.cat([h, encode_conditions(list(c.unbind(1)), self.conditions).to(h.dtype)], dim=1)
        return self.head(h)


class AntiCausalPredictor(SameStepEveryStage):
    """One anti-causal predictor per target parent (see the module docstring).

    :param parents: ``{name: {kind, num_classes, low, high}}`` for every target and condition parent.
    :param network: template of every predictor's image network, a ``{"_target_": ...}`` dict or a module that
        records its config (only the config is used: every target gets a freshly built network); it maps
        x [B, C, H, W] in [0, 1] to [B, feature_dim].
    :param feature_dim: width of the network's output = of the penultimate features.
    :param targets: parents to predict, in order (default: every parent in ``parents``).
    :param conditions: ``{target: [condition parents]}``; the published thickness predictor is
        ``{thickness: [intensity]}``.
    :param head_hidden: hidden widths of the heads (``[]``: one linear layer, as Table 17).
    :param lr: Adam learning rate.
    :param weight_decay: Adam (L2) weight decay.
    """

    def __init__(
        self,
        parents: Mapping[str, Mapping[str, Any]],
        network: nn.Module | Mapping[str, Any],
        feature_dim: int = 64,
        targets: Sequence[str] | None = None,
        conditions: Mapping[str, Sequence[str]] | None = None,
        head_hidden: Sequence[int] = (),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        if not parents:
            raise ValueError("AntiCausalPredictor needs `parents`: {name: {kind, num_classes, low, high}}")
        parents = _plain(parents)
        self.attributes = {str(n): parent_attribute(str(n), s) for n, s in parents.items()}
        self.targets = [str(t) for t in (targets if targets is not None else list(parents))]
        self.conditions = {str(k): [str(c) for c in v] for k, v in (_plain(conditions) or {}).items()}
        unknown = [
            n
            for n in [*self.targets, *self.conditions, *sum(self.conditions.values(), [])]
            if n not in self.attributes
        ]
        if unknown:
            raise ValueError(
                f"parents {sorted(set(unknown))} are not described in `parents` ({list(parents)})"
            )
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be distinct and non-empty, got {self.targets}")
        for t, cs in self.conditions.items():
            if t not in self.targets:
                raise ValueError(f"conditions name {t!r}, which is not a target ({self.targets})")
            if t in cs:
                raise ValueError(f"the predictor of {t!r} cannot be conditioned on itself")

        config = network_config(network)
        if config is None:
            raise ValueError(
                "AntiCausalPredictor needs a network that records its config (networks package) "
                "or a {'_target_': ...} dict, so that the checkpoint alone rebuilds it"
            )
        self.predictors = nn.ModuleDict()
        for t in self.targets:
            net = build_network(config)  # a fresh network per target, from the template's config
            cond = [self.attributes[c] for c in self.conditions.get(t, [])]
            head = MLPClassifier(
                in_features=feature_dim + sum(_condition_width(a) for a in cond),
                hidden=list(head_hidden),
                out_features=self.attributes[t].dim,
            )
            self.predictors[t] = ParentPredictor(net, feature_dim, head, cond)
        self.save_hyperparameters(ignore=["network", "parents", "conditions", "targets"])
        self.save_hyperparameters(
            {"parents": parents, "network": config, "targets": self.targets, "conditions": self.conditions}
        )

    # -- metric-facing API -------------------------------------------------------------------------------
    def condition_tensor(self, target: str, pa: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        names = self.conditions.get(target, [])
        if not names:
            return None
        missing = [n for n in names if n not in pa]
        if missing:
            raise KeyError(f"the predictor of {target!r} needs the condition parent(s) {missing} in pa")
        return torch.stack([torch.as_tensor(pa[n]).reshape(-1).to(torch.float32) for n in names], dim=1)

    def _predict(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        known = dict(pa or {})
        out: dict[str, torch.Tensor] = {}
        pending = list(self.targets)
        while pending:
            # A condition missing from pa is predicted first by its own head (if there is one).
            ready = [t for t in pending if all(c in known or c in out for c in self.conditions.get(t, []))]
            if not ready:
                raise KeyError(
                    f"conditions {[self.conditions.get(t) for t in pending]} of {pending} are neither "
                    f"in pa nor predictable"
                )
            for t in ready:
                pending.remove(t)
                c = self.condition_tensor(t, {**out, **known})
                out[t] = to_batch_units(self.predictors[t](x, c), self.attributes[t])
        return {t: out[t] for t in self.targets}

    def predict_parents(
        self, x: torch.Tensor, pa: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """{target: prediction [B]} in batch units (continuous normalised, categorical index, binary
        probability); eval mode, no_grad. ``pa`` supplies the conditions."""
        with evaluating(self):
            return self._predict(x, pa)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate image features of every predictor, concatenated in target order: [B, n_targets * D]."""
        with evaluating(self):
            return torch.cat([self.predictors[t].features(x) for t in self.targets], dim=1)

    def parent_net(self, name: str) -> nn.Module:
        """The predictor of ``name`` as ``(x, c=None) -> raw output`` (continuous [B, 1] normalised value,
        binary [B, 1] logit, categorical [B, K] logits); ``c`` [B, len(conditions[name])] in batch units."""
        return self.predictors[name]

    # -- training ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw outputs {target: [B, out]}, conditions taken from ``pa`` (teacher forcing, as in training)."""
        return {t: self.predictors[t](x, self.condition_tensor(t, pa)) for t in self.targets}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        declared = getattr(datamodule, "attributes", None)
        if not declared:
            return
        by_name = {a.name: a for a in declared}
        for name, mine in self.attributes.items():
            theirs = by_name.get(name)
            if theirs is None:
                raise ValueError(
                    f"AntiCausalPredictor: parent {name!r} is not among the data's attributes {list(by_name)}"
                )
            if (theirs.kind, theirs.num_classes) != (mine.kind, mine.num_classes):
                raise ValueError(
                    f"AntiCausalPredictor: parent {name!r} is {mine.kind} (num_classes="
                    f"{mine.num_classes}) in the model config but {theirs.kind} (num_classes="
                    f"{theirs.num_classes}) in the data"
                )

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        x, pa = batch["x"], batch["pa"]
        n = x.shape[0]
        outs = self(x, pa)
        losses = {t: head_loss(outs[t], pa[t], self.attributes[t].kind) for t in self.targets}
        loss = torch.stack(list(losses.values())).sum()
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, batch_size=n, on_step=on_step, on_epoch=True, sync_dist=not on_step)
        for t, value in losses.items():
            self.log(
                f"{stage}/loss/{t}",
                value,
                batch_size=n,
                on_step=on_step,
                on_epoch=True,
                sync_dist=not on_step,
            )
        if stage != "train":
            self._log_scores(outs, pa, stage, n)
        return loss

    def _log_scores(
        self, outs: Mapping[str, torch.Tensor], pa: Mapping[str, torch.Tensor], stage: str, n: int
    ):
        """Batch means weighted by the batch size: Lightning's epoch value is then the set mean."""
        for t in self.targets:
            a = self.attributes[t]
            pred, y = to_batch_units(outs[t].detach(), a), pa[t].reshape(-1).to(torch.float32)
            if a.kind == "continuous":
                mae = (pred - y).abs().mean()
                self.log(f"{stage}/mae/{t}", mae, batch_size=n, sync_dist=True)
                # Min-max normalisation is linear: |Δraw| = |Δnorm| · (high − low) / 2.
                self.log(f"{stage}/mae_raw/{t}", mae * (a.high - a.low) / 2.0, batch_size=n, sync_dist=True)
            else:
                hit = (pred > 0.5) == (y > 0.5) if a.kind == "binary" else pred == y
                self.log(f"{stage}/acc/{t}", hit.float().mean(), batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
