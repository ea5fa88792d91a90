"""Counterfactual fine-tuning of the conditional HVAE (counterfactual_benchmark §4.2 and App. A.3; Ribeiro et al.,
"High fidelity image counterfactuals with probabilistic causal models", ICML 2023, §3.3).

Trained on the ELBO alone, the HVAE may ignore the parents (the benchmark saw it on CelebA: counterfactuals
reproduce the factual image). Fine-tuning asks frozen anti-causal predictors g (``lightning_modules.predictors``)
to recognise the intervened parents in the counterfactual, while the ELBO may not get worse than the pretrained
model's:

    min_θ L_cf(θ)   subject to   L_elbo(θ) ≤ ε₀,

* L_cf = Σ_k ℓ_k(g_k(x*, pa*), pa*_k): ℓ_k the predictor's own training loss for parent k (MSE of the
  normalised value for continuous, cross-entropy for categorical, BCE for binary parents), x* the
  counterfactual of the batch under one random intervention (below), with gradients flowing through the frozen
  predictors into x* and through x* = clip(μ(z, pa*) + t_r·σ(z, pa*)·ε) into the HVAE (z and ε abducted from
  the factual x with gradient, t_z = ``train_latent_temperature``, t_r = ``train_residual_temperature``);
* L_elbo = the pretraining objective, the negative β-ELBO per pixel of the factual batch;
* ε₀ = L_elbo of the pretrained model on the training data, MEASURED at the start of fitting over
  ``elbo_batches`` batches (logged as ``train/eps0``, kept in the checkpoint so that resuming does not
  re-measure it; the reference hard-codes it: 1.8412 on UKBB, 2.26 on CelebA).

It is solved with the modified differential method of multipliers (Platt & Barr, 1987; the paper's [33]) as
in the reference: with the slack s(θ) = ε₀ − L_elbo(θ) (≥ 0 when the constraint holds),

    L(θ, λ) = L_cf(θ) − (λ − c·sg[s(θ)])·s(θ),      λ ≥ 0,  c = ``damping`` (100),  sg = stop-gradient,

θ descends L (AdamW, lr 1e-4) and λ ascends it with its OWN optimizer (AdamW with ``maximize=True``, lr 0.1,
no weight decay) and is projected onto λ ≥ 0 after each step. ∂L/∂λ = −s = L_elbo − ε₀, so λ grows while the
constraint is violated and decays to 0 while it holds; for θ the constraint acts with the weight
λ − c·s, i.e. the damping pulls L_elbo back to ε₀ from either side. One backward pass gives both directions;
the model's update (clipped and skipped as in pretraining) and the multiplier's are separate steps of separate
optimizers, and both are skipped together. The predictors and the SCM never move: they are frozen, held in
eval mode (BatchNorm uses running statistics), and belong to no optimizer.

**Interventions** (one per batch): a parent chosen uniformly, its new values drawn as the metrics draw them
(``datamodules.interventions.single_parent``: binary flipped, categorical another class, continuous a
training-set value from another bin) or, with ``intervention="permute"``, permuted within the batch as the
reference does; pa* is then PROPAGATED to the intervened parent's descendants by ``counterfactual_parents``
(the attached SCM, if any, otherwise inherited from the pretrained model).

**Checkpoint selection** must not depend on λ, which only prices the constraint: the monitored
``val/loss`` = L_cf + max(0, L_elbo − ε₀) on the validation set (the counterfactual loss plus the constraint
violation at weight 1, both with the EMA weights and no multiplier). ``train/lagrangian`` is the objective above.

The model starts from the pretrained model's EMA weights and keeps its own EMA (used for evaluation, saved
in checkpoints). The checkpoint rebuilds the fine-tuned model alone: the network, parents and predictors'
configs are hyperparameters and their weights are in the state dict, so ``load_from_checkpoint`` does not
need the pretrained or predictors' files.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules.base import Attribute, equal_width_bins
from datamodules.interventions import single_parent
from lightning_modules.checkpoints import load_module
from lightning_modules.hvae import ConditionalHVAE, ELBOTerms, HVAENoise
from lightning_modules.likelihoods import to_signed
from lightning_modules.networks.blocks import _plain, network_config
from lightning_modules.networks.frozen import evaluating
from lightning_modules.predictors import AntiCausalPredictor, head_loss

INTERVENTIONS = ("single_parent", "permute")


def lagrangian(
    cf_loss: torch.Tensor, elbo_loss: torch.Tensor, eps0: torch.Tensor, lmbda: torch.Tensor, damping: float
) -> torch.Tensor:
    """L(θ, λ) = L_cf − (λ − c·sg[ε₀ − L_elbo])·(ε₀ − L_elbo) (module docstring; Platt & Barr's modified
    differential method of multipliers)."""
    slack = eps0 - elbo_loss
    return cf_loss - (lmbda - damping * slack.detach()) * slack


def counterfactual_loss(
    predictors: AntiCausalPredictor, x_cf: torch.Tensor, pa_cf: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_cf = Σ_k ℓ_k(g_k(x*, pa*), pa*_k) with each predictor's training loss; x* in [0, 1]. The predictors'
    conditions (thickness | intensity) are read from pa*."""
    outs = predictors(x_cf, pa_cf)
    terms = {t: head_loss(outs[t], pa_cf[t], predictors.attributes[t].kind) for t in predictors.targets}
    return torch.stack(list(terms.values())).sum(), terms


def _experiment_of(path: str, default: str) -> str:
    """``runs/<experiment>/<run>/checkpoints/x.ckpt`` -> ``<experiment>``, for error messages."""
    m = re.search(r"([A-Za-z0-9_]+)/[^/]+/checkpoints/[^/]+$", str(path))
    return m[1] if m else default


def _require(path: str, what: str, default_experiment: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"the {what} checkpoint {str(file)!r} does not exist; train it first with "
            f"`make train EXP={_experiment_of(path, default_experiment)}` or point the config at the right file."
        )
    return file


#: the ConditionalHVAE options the fine-tuning passes through unchanged, with ConditionalHVAE's defaults (written
#: once, there).
_TRAINING_OPTIONS = {name: p.default for name, p in inspect.signature(ConditionalHVAE.__init__).parameters.items()
                     if name in ("betas", "weight_decay", "warmup_steps", "grad_clip", "grad_skip", "ema_decay",
                                 "latent_temperature", "residual_temperature", "sample_temperature")}


class CounterfactualFinetunedHVAE(ConditionalHVAE):
    """Counterfactual fine-tuning of a pretrained ``ConditionalHVAE`` (see the module docstring).

    :param pretrained: checkpoint of the pretrained ``ConditionalHVAE`` (its network, parents, β and SCM are
        taken from it; its EMA weights are the starting point).
    :param predictors: checkpoint of the frozen ``AntiCausalPredictor``; its targets must be parents of the model.
    :param network, parents, predictor_config: filled in from the two checkpoints (and stored, so that
        ``load_from_checkpoint`` rebuilds the model without them); pass them only instead of the checkpoints.
    :param beta: β of L_elbo (None: the pretrained model's).
    :param lr: AdamW learning rate of the model (1e-4).
    :param lagrange_lr: AdamW learning rate of the multiplier's ascent (0.1).
    :param lambda_init: λ at the start (≥ 0).
    :param damping: c of the damped Lagrangian.
    :param elbo_batches: training batches over which ε₀ is measured.
    :param intervention: ``"single_parent"`` or ``"permute"``.
    :param n_bins: bins of continuous parents for ``single_parent`` when the data declares none.
    :param train_latent_temperature, train_residual_temperature: t_z and t_r of the counterfactuals in L_cf.
    Other parameters (``betas``, ``weight_decay``, ``warmup_steps``, ``grad_clip``, ``grad_skip``, ``ema_decay``,
    the three temperatures): as ``ConditionalHVAE``, with its defaults; the signature lists them (``inspect`` and
    the config checks see one parameter list).
    """

    frozen_parts = ("predictors", "scm")  # the frozen judges stay in eval mode

    def __init__(
        self,
        pretrained: str | None = None,
        predictors: str | None = None,
        network: Mapping[str, Any] | None = None,
        parents: Mapping[str, Mapping[str, Any]] | Sequence[str] | None = None,
        predictor_config: Mapping[str, Any] | None = None,
        beta: float | None = None,
        lr: float = 1e-4,
        lagrange_lr: float = 0.1,
        lambda_init: float = 0.0,
        damping: float = 100.0,
        elbo_batches: int = 10,
        intervention: str = "single_parent",
        n_bins: int = 10,
        train_latent_temperature: float = 1.0,
        train_residual_temperature: float = 1.0,
        scm: Mapping[str, Any] | None = None,
        scm_checkpoint: str | None = None,
        **training: Any,
    ):
        unknown = [k for k in training if k not in _TRAINING_OPTIONS]
        if unknown:
            raise TypeError(f"CounterfactualFinetunedHVAE got unexpected keyword arguments {unknown}; its "
                            f"ConditionalHVAE options are {list(_TRAINING_OPTIONS)}")
        training = {**_TRAINING_OPTIONS, **training}
        ema_decay = training["ema_decay"]
        if intervention not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {intervention!r}")
        if lambda_init < 0:
            raise ValueError(f"lambda_init must be >= 0, got {lambda_init}")
        if elbo_batches < 1:
            raise ValueError(f"elbo_batches must be >= 1, got {elbo_batches}")
        start = None
        if pretrained is not None:
            start = load_module(ConditionalHVAE, _require(pretrained, "pretrained HVAE", "hvae_morphomnist"),
                                "pretrained HVAE", f"train it with `make train EXP="
                                f"{_experiment_of(pretrained, 'hvae_morphomnist')}`")
            network, parents = start.hparams.network, start.hparams.parents
            beta = start.hparams.beta if beta is None else beta
            if scm is None and scm_checkpoint is None and start.scm is not None:
                scm = network_config(start.scm)
        if network is None or parents is None:
            raise ValueError("CounterfactualFinetunedHVAE needs `pretrained` (a ConditionalHVAE checkpoint), or "
                             "`network` and `parents`")
        judge = None
        if predictors is not None:
            judge = load_module(AntiCausalPredictor,
                                _require(predictors, "anti-causal predictors", "predictors_morphomnist"),
                                "anti-causal predictors", f"train them with `make train EXP="
                                f"{_experiment_of(predictors, 'predictors_morphomnist')}`")
            predictor_config = _plain(dict(judge.hparams))
        if predictor_config is None:
            raise ValueError("CounterfactualFinetunedHVAE needs `predictors` (an AntiCausalPredictor checkpoint)")

        beta = 1.0 if beta is None else float(beta)
        super().__init__(network=network, parents=parents, beta=beta, lr=lr, scm=scm, scm_checkpoint=scm_checkpoint,
                         **training)
        self.predictors = judge if judge is not None else AntiCausalPredictor(**predictor_config)
        self.predictors.requires_grad_(False).eval()  # Lightning keeps each submodule's mode; train() below too
        unknown = [t for t in self.predictors.targets if t not in {a.name for a in self.attributes}]
        if unknown:
            raise ValueError(f"the predictors' targets {unknown} are not parents of the HVAE "
                             f"({[a.name for a in self.attributes]})")
        if start is not None:
            self.net.load_state_dict((start.ema.module if start.ema is not None else start.net).state_dict())
            self.init_ema("net", ema_decay)  # the average starts at the pretrained weights
            if self.scm is not None and start.scm is not None and scm_checkpoint is None:
                self.scm.load_state_dict(start.scm.state_dict())
        self.lmbda = nn.Parameter(torch.tensor(float(lambda_init)))
        self.register_buffer("eps0", torch.tensor(float("nan")))
        self.save_hyperparameters({"pretrained": None, "predictors": None, "predictor_config": predictor_config})
        self._intervention_attributes: dict[str, Attribute] = {}
        self._pools: dict[str, torch.Tensor] = {}

    # -- ε₀ and the interventions' set-up ---------------------------------------------------------------
    def on_train_start(self) -> None:
        self._setup_interventions()
        if torch.isnan(self.eps0):
            self.eps0.fill_(self.measure_elbo(self.trainer.train_dataloader))

    def measure_elbo(self, loader) -> float:
        """Mean L_elbo (negative β-ELBO per pixel) of the current weights over ``elbo_batches`` batches."""
        total, count = 0.0, 0
        with evaluating(self.net):
            for i, batch in enumerate(loader):
                if i >= self.hparams.elbo_batches:
                    break
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                n = batch["x"].shape[0]
                total += float(self.elbo_terms(self.net, batch["x"], batch["pa"]).loss) * n
                count += n
        if count == 0:
            raise ValueError("no training batch to measure the pretrained model's ELBO on")
        return total / count

    def _setup_interventions(self) -> None:
        """Attributes with bins and pools of training values for ``single_parent`` (the data's when declared)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        declared = {a.name: a for a in (getattr(datamodule, "attributes", None) or [])}
        for a in self.attributes:
            d = declared.get(a.name)
            if a.kind == "continuous" and (d is None or d.bins is None):
                d = dataclasses.replace(a, bins=equal_width_bins(a.low, a.high, self.hparams.n_bins))
            self._intervention_attributes[a.name] = d if d is not None else a
        try:
            values = datamodule.dataset("train").pa
            # an empty training split (a test-only evaluation) leaves the batch's own values to draw from
            self._pools = {a.name: torch.as_tensor(values[a.name]) for a in self.attributes
                           if a.kind == "continuous" and len(values[a.name]) > 0}
        except (AttributeError, KeyError, NotImplementedError, TypeError):
            self._pools = {}  # the batch's own values are drawn from instead

    def draw_intervention(
        self, pa: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """do(one random parent) for the whole batch (module docstring). Without ``generator`` the draw is seeded
        from the global RNG (training: reproducible, and resumed with the RNG state)."""
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        names = [a.name for a in self.attributes]
        target = names[int(torch.randint(len(names), (), generator=generator))]
        values = pa[target]
        if self.hparams.intervention == "permute":
            return {target: values[torch.randperm(len(values), generator=generator).to(values.device)]}
        if not self._intervention_attributes:
            self._setup_interventions()
        pools = {target: self._pools.get(target, values.cpu())}
        drawn = single_parent(list(self._intervention_attributes.values()), {target: values.cpu()}, target,
                              generator, pools)
        return {target: drawn.values[target].to(values)}

    # -- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        opt_model, opt_lambda = self.optimizers()
        x, pa = batch["x"], batch["pa"]
        with torch.no_grad():
            pa_cf = self.counterfactual_parents(pa, self.draw_intervention(pa))
        terms = self.elbo_terms(self.net, x, pa)
        x_cf = self.predict_with(self.net, self._training_noise(x, pa, terms), pa_cf, hp.train_residual_temperature)
        cf_loss, cf_terms = counterfactual_loss(self.predictors, x_cf, pa_cf)
        objective = lagrangian(cf_loss, terms.loss, self.eps0, self.lmbda, hp.damping)

        # One backward pass: θ's descent direction and λ's ascent direction; two optimizers, two steps.
        opt_lambda.zero_grad(set_to_none=True)
        if self.guarded_step(opt_model, objective, self.net.parameters()):
            opt_lambda.step()
            with torch.no_grad():
                self.lmbda.clamp_(min=0.0)
            self.lr_schedulers().step()
            self.update_ema()
        self._log_terms("train", terms, objective="loss/elbo")
        self._log_finetuning("train", len(x), cf_loss, cf_terms, terms.loss, objective)

    def _training_noise(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor], terms: ELBOTerms) -> HVAENoise:
        """z and ε abducted with gradient: from the ELBO's own posterior pass when t_z = 1."""
        t = self.hparams.train_latent_temperature
        if t != 1.0:
            return self.abduct_with(self.net, x, pa, t)
        out = terms.output
        return HVAENoise(z=[layer.z for layer in out.layers], eps=(to_signed(x) - out.loc) * torch.exp(-out.logscale))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        net, hp = self.ema_network(), self.hparams
        x, pa = batch["x"], batch["pa"]
        # the same interventions at every evaluation, and the training RNG untouched by them
        do = self.draw_intervention(pa, torch.Generator().manual_seed(batch_idx))
        pa_cf = self.counterfactual_parents(pa, do)
        terms = self.elbo_terms(net, x, pa)
        x_cf = self.predict_with(net, self.abduct_with(net, x, pa, hp.train_latent_temperature), pa_cf,
                                 hp.train_residual_temperature)
        cf_loss, cf_terms = counterfactual_loss(self.predictors, x_cf, pa_cf)
        self._log_terms(stage, terms, objective="loss/elbo")
        self._log_finetuning(stage, len(x), cf_loss, cf_terms, terms.loss, None)

    def _log_finetuning(self, stage: str, batch_size: int, cf_loss, cf_terms, elbo_loss, objective) -> None:
        violation = torch.relu(elbo_loss.detach() - self.eps0)
        metrics = {
            f"{stage}/loss": cf_loss.detach() + violation,  # λ-free: the checkpoint monitor
            f"{stage}/loss/cf": cf_loss.detach(),
            f"{stage}/constraint_violation": violation,
            **{f"{stage}/loss/cf/{k}": v.detach() for k, v in cf_terms.items()},
        }
        on_step = stage == "train"
        if on_step:
            metrics.update({"train/lagrangian": objective.detach(), "train/lambda": self.lmbda.detach(),
                            "train/eps0": self.eps0.clone()})
        self.log_dict(metrics, on_step=on_step, on_epoch=True, sync_dist=not on_step, batch_size=batch_size)

    def configure_optimizers(self):
        """[model AdamW (warm-up), multiplier AdamW ascending (maximize=True, no weight decay)]."""
        hp = self.hparams
        opt_model = self._adamw(self.net.parameters(), hp.lr)
        opt_lambda = torch.optim.AdamW([self.lmbda], lr=hp.lagrange_lr, betas=tuple(hp.betas), weight_decay=0.0,
                                       maximize=True)
        return [opt_model, opt_lambda], [self._warmup(opt_model)]


def _full_signature() -> inspect.Signature:
    """The class's call signature: the fine-tuning's own parameters, then the ConditionalHVAE options it passes
    through, keyword-only. Set on the class, not on ``__init__``: Lightning's ``save_hyperparameters`` reads
    ``__init__``'s real parameters (``**training`` included) from its frame."""
    own = inspect.signature(CounterfactualFinetunedHVAE.__init__)
    hvae = inspect.signature(ConditionalHVAE.__init__).parameters
    params = [p for name, p in own.parameters.items() if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    hints = typing.get_type_hints(ConditionalHVAE.__init__)
    params += [hvae[name].replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[name])
               for name in _TRAINING_OPTIONS]
    return own.replace(parameters=params)


CounterfactualFinetunedHVAE.__signature__ = _full_signature()
