"""The benchmark's counterfactual metrics (counterfactual_benchmark §3.3) as one Lightning callback.

For every evaluation batch, through the :class:`CounterfactualModule` contract only:

* composition^m: the null intervention applied m times (``callbacks.metrics.composition``);
* for each intervened parent (single-parent interventions drawn by ``datamodules.interventions`` from a
  seeded generator): the counterfactual x*, then
  - reversibility: back from do(pa*) to pa, starting from that same x* (it is not made a second time);
  - effectiveness: the anti-causal predictors on x* against the counterfactual parents (``predictors``), and/or
    Morpho-MNIST's measurements of x* (``morphometric=True``);
  - minimality: CLD with an unconditional VAE's posteriors of x and x* (``vae``);
  - the true-counterfactual error when the DataModule can render ground truth;
* realism: FID (and KID with ``kid=True``) between one counterfactual per evaluated image (the intervened
  parent cycles with the dataset row) and real images (``fid_real="train"``: the training split as published,
  or ``"eval"``: the evaluated images).

Besides the single-parent interventions of ``intervene``, ``multi_parent`` lists joint interventions (each a
list of parents, all given new values at once: keys ``do_<a>+<b>``, e.g. ``reversibility/thickness+intensity``)
and ``random_parents: p`` adds the benchmark's random interventions (each parent with probability p, at least one
per image: keys ``random``). A multi or random intervention is judged like a single one (reversibility,
effectiveness of every parent against the counterfactual parents, morphometric effectiveness, the
true-counterfactual error); CLD (eq. 9 compares the code of the one intervened parent) and FID's set take the
single-parent ones only. Images of one batch that drew different sets of parents are counterfactually edited in
one call per set.

Interventions are drawn per dataset row (``datamodules.interventions.per_sample_uniforms``), so an image
gets the same intervention whatever its batch and however many processes evaluate: with a deterministic model
the synchronised metrics equal the single-process ones.

Counterfactual parents are the model's ``counterfactual_parents(pa, do)`` when it has one (an SCM that
propagates do(thickness) to intensity), else the parents with ``do`` applied.

Reversibility goes back from the x* that every other metric judges. Until this was so, it made its own x*
(``callbacks.metrics.composition.reversibility`` without ``x_star``), one more counterfactual call per
intervened parent. For a deterministic model (IFcVAE-GAN, CDVAE-GAN and its VAE and VAE-GAN baselines, the
BiGANs, the reference counterfactuals, x* = x) the two x* are the same image and every number is unchanged
(tested). For a model that draws noise while it evaluates (the conditional VAEs and HVAEs, whose abduction
samples z at ``latent_temperature`` > 0, and any model whose SCM abducts binary or categorical parents by
Gumbel-max noise) the numbers move, because the forked evaluation RNG is consumed one call earlier from the
first way back on: reversibility of every parent, and effectiveness, morphometric effectiveness, CLD and the
true-counterfactual error of every parent after the first of ``intervene``, and FID (its set holds every
parent's x*). Composition, computed first in each batch, and the first parent's x* are unchanged.

Logged keys (``stage`` is ``val`` or ``test``)::

    {stage}/composition/{distance}/{m}            mean over images (and .../std)
    {stage}/reversibility/{parent}/{distance}
    {stage}/effectiveness/do_{parent}/{measured}  MAE in original units / accuracy / F1
    {stage}/morpho_effectiveness/do_{parent}/{measured}
    {stage}/reference/{name}/...                  every key above for the reference counterfactuals
                                                  (``callbacks.references``; x* = x is ``reference/identity``)
    {stage}/cld[/{parent}], {stage}/cld_p_sx_star_le_div, {stage}/cld_p_sx_ge_div
    {stage}/fid_{domain|inception}, {stage}/kid_{domain|inception} (and ..._std, ..._subset_size)
    {stage}/true_cf/do_{parent}/{mse|l1|effect_mse|effect_l1|preservation_mse|preservation_l1|changed_fraction}

Values are torchmetrics states synchronised at compute, logged with ``sync_dist=False``; what cannot be computed
(no predictors, no VAE, a model that cannot abduct, no ground truth) is skipped with one printed reason, kept
in :attr:`skipped`. Networks used here (predictors, VAE, feature extractors) live on the callback, so they stay
out of the model's checkpoint; they and the model are run in eval mode under no_grad with the global RNG
untouched (:func:`callbacks.editing_metrics.evaluation_mode`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from callbacks.editing_metrics import StagedEvaluation, evaluation_mode, load_frozen
from callbacks.image_grids import counterfactual_grid
from callbacks.logging_utils import log_image, save_png
from callbacks.metrics.composition import Composition, Reversibility
from callbacks.metrics.distances import EmbeddingL1, LPIPSDistance, PixelL1, vgg16_fc7
from callbacks.metrics.editing import TrueCounterfactualSplitError
from callbacks.metrics.effectiveness import Effectiveness, MorphometricEffectiveness
from callbacks.metrics.minimality import CounterfactualLatentDivergence
from callbacks.metrics.realism import FID, KID, InceptionFeatures
from callbacks.references import references_of
from datamodules.interventions import (
    Intervention,
    multi_parent,
    per_sample_uniforms,
    random_parents,
    single_parent,
)

__all__ = ["CounterfactualMetrics"]

STAGES = ("val", "test")
DISTANCES = ("l1", "lpips_vgg", "lpips_alex", "embedding", "vgg16")
#: the label (in every key) of the random interventions of ``random_parents``.
RANDOM = "random"
#: where the per-row uniform streams of the multi-parent and random interventions start: the single-parent ones
#: use streams 0 .. len(intervene) - 1, as they always did.
_STREAM_BLOCK = 1000


def _load(path: str | os.PathLike, cls_path: str, experiment: str) -> nn.Module:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; train it with `make train "
                                f"EXP={experiment}` or point the callback at the right file.")
    from lightning_modules.checkpoints import load_module  # weights only: never run code from a checkpoint

    module_name, cls_name = cls_path.rsplit(".", 1)
    cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
    return load_module(cls, path, "checkpoint", f"train it with `make train EXP={experiment}` or point the callback "
                       "at the right file")


class CounterfactualMetrics(StagedEvaluation):
    """Composition, reversibility, effectiveness, minimality, realism and ground truth, per intervened parent.

    :param intervene: parents to intervene on one at a time (default: every parent of the DataModule).
    :param composition_m: numbers of null interventions for composition.
    :param distances: among ``l1`` (pixels, 0-255), ``lpips_vgg``, ``lpips_alex`` (hub-cache weights),
        ``embedding`` (L1 of the predictors' penultimate features; needs ``predictors``) and ``vgg16`` (L1 of
        ImageNet VGG-16's fc7 features, the benchmark's CelebA embedding; ``vgg16-397923af.pth`` in the hub cache).
    :param multi_parent: joint interventions, each a list of two or more parents (module docstring).
    :param random_parents: the probability p of the random interventions, or ``None`` for none.
    :param predictors: an ``AntiCausalPredictor`` checkpoint or module (``predict_parents``, ``features``);
        ``None`` skips effectiveness.
    :param vae: an unconditional ``VAE`` checkpoint or module (``posterior``); ``None`` skips CLD.
    :param fid: ``None``, ``"fid_domain"`` (the features of ``fid_features``, by default the predictors') or
        ``"fid_inception"``.
    :param fid_features: the feature network of ``fid_domain`` when it is not the predictors: a module with
        ``features(x)`` or an ``AttributeClassifier`` checkpoint (an editing oracle, e.g. where there are no
        anti-causal predictors or no Inception weights).
    :param fid_real: ``"train"`` (published: the training split; ``fid_real_batches`` caps it) or ``"eval"``.
    :param kid: also KID on FID's features and sets (needs ``fid``): the mean and standard deviation of the
        unbiased polynomial-kernel MMD² over ``kid_subsets`` seeded subsets of ``kid_subset_size`` images
        (fewer when a set is smaller; the size used is logged).
    :param morphometric: also measure thickness and intensity of x* (MorphoMNIST only).
    :param per_sample_csv: in test, also write ``per_sample.csv`` (dataset index, composition and reversibility
        per image) into the run directory (``trainer.default_root_dir``); memory grows with the test set.
    :param cld_weights: (w1, w2) of eq. 9.
    :param every_n_epochs, limit_val_batches: the cheap validation subset; test always uses the whole split.
    :param seed: seeds the interventions and the model's evaluation noise.
    """

    def __init__(
        self,
        intervene: Sequence[str] | None = None,
        composition_m: Sequence[int] = (1, 10),
        distances: Sequence[str] = ("l1",),
        predictors: str | os.PathLike | nn.Module | None = None,
        predictors_experiment: str | None = None,
        vae: str | os.PathLike | nn.Module | None = None,
        vae_experiment: str | None = None,
        fid: str | None = None,
        fid_real: str = "train",
        fid_real_batches: int | None = None,
        fid_features: str | os.PathLike | nn.Module | None = None,
        kid: bool = False,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        multi_parent: Sequence[Sequence[str]] = (),
        random_parents: float | None = None,
        morphometric: bool = False,
        true_counterfactuals: bool = True,
        per_sample_csv: bool = True,
        cld_weights: Sequence[float] = (0.8, 0.2),
        every_n_epochs: int = 1,
        limit_val_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = [d for d in distances if d not in DISTANCES]
        if unknown:
            raise ValueError(f"unknown distance(s) {unknown}; choose from {list(DISTANCES)}")
        if fid not in (None, "fid_domain", "fid_inception"):
            raise ValueError(f"fid must be null, fid_domain or fid_inception, got {fid!r}")
        if fid_real not in ("train", "eval"):
            raise ValueError(f"fid_real must be 'train' or 'eval', got {fid_real!r}")
        if every_n_epochs < 1 or (limit_val_batches is not None and limit_val_batches < 1):
            raise ValueError("every_n_epochs and limit_val_batches must be >= 1")
        if "embedding" in distances and predictors is None:
            raise ValueError("the 'embedding' distance uses the predictors' features: set `predictors`")
        if fid == "fid_domain" and predictors is None and fid_features is None:
            raise ValueError("fid_domain needs a feature network: set `predictors` or `fid_features`")
        if fid_features is not None and fid != "fid_domain":
            raise ValueError(f"fid_features is the feature network of fid_domain, but fid is {fid!r}")
        if kid and fid is None:
            raise ValueError("kid reads FID's features and sets: set `fid` to fid_domain or fid_inception")
        if kid_subsets < 1 or kid_subset_size < 2:
            raise ValueError(f"need kid_subsets >= 1 and kid_subset_size >= 2, got {kid_subsets} and {kid_subset_size}")
        joint = [[str(p) for p in parents] for parents in multi_parent]
        short = [parents for parents in joint if len(set(parents)) < 2 or len(set(parents)) != len(parents)]
        if short:
            raise ValueError(f"multi_parent lists {short}: each joint intervention names two or more distinct "
                             "parents (one parent is a single-parent intervention: list it in `intervene`)")
        if random_parents is not None and not 0.0 < float(random_parents) <= 1.0:
            raise ValueError(f"random_parents is the probability of intervening on each parent, in (0, 1]; got "
                             f"{random_parents!r} (null: no random interventions)")
        self.kid, self.kid_subsets, self.kid_subset_size = bool(kid), int(kid_subsets), int(kid_subset_size)
        self.multi_parent = joint
        self.random_parents = None if random_parents is None else float(random_parents)
        self.intervene = None if intervene is None else [str(p) for p in intervene]
        self.composition_m = tuple(int(m) for m in composition_m)
        self.distance_names = tuple(distances)
        self.fid, self.fid_real, self.fid_real_batches = fid, fid_real, fid_real_batches
        self.morphometric, self.true_counterfactuals = morphometric, true_counterfactuals
        self.per_sample_csv = per_sample_csv
        self.cld_weights = tuple(float(w) for w in cld_weights)
        self.every_n_epochs, self.limit_val_batches, self.seed = every_n_epochs, limit_val_batches, seed
        self._predictors = predictors if isinstance(predictors, nn.Module) or predictors is None else _load(
            predictors, "lightning_modules.predictors.AntiCausalPredictor", predictors_experiment or "<predictors>")
        self._vae = vae if isinstance(vae, nn.Module) or vae is None else _load(
            vae, "lightning_modules.vae.VAE", vae_experiment or "<vae>")
        if fid_features is None or isinstance(fid_features, nn.Module):
            self._fid_features = fid_features
        else:
            path = Path(fid_features).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"fid_features checkpoint {str(path)!r} does not exist; train the attribute "
                                        "classifier it names or point `fid_features` at its checkpoint.")
            self._fid_features = load_frozen(path)
        self._metrics: dict[str, dict[str, nn.ModuleDict]] = {}
        self._shared: dict[str, Any] | None = None
        self._attributes: tuple = ()
        self._targets: list[str] = []
        self._specs: list[tuple[str, str, tuple[str, ...]]] = []
        self._pools: dict[str, Tensor] = {}
        self._truth = False
        self.skipped: dict[str, str] = {}
        self.results: dict[str, dict[str, float]] = {}

    # -- set-up ------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        self._attributes = tuple(datamodule.attributes)
        self._image_shape = tuple(datamodule.image_shape)
        names = [a.name for a in self._attributes]
        targets = names if self.intervene is None else self.intervene
        missing = [t for t in targets if t not in names]
        if missing:
            raise ValueError(f"intervene lists {missing}, which are not parents of the data ({names})")
        self._targets = list(targets)
        unknown = sorted({p for parents in self.multi_parent for p in parents if p not in names})
        if unknown:
            raise ValueError(f"multi_parent lists {unknown}, which are not parents of the data ({names})")
        if RANDOM in names and self.random_parents is not None:
            raise ValueError(f"a parent is named {RANDOM!r}, the label of the random interventions: rename it")
        # (label, kind, parents) of every intervention; the single-parent ones first, in their old order.
        self._specs = [(t, "single", (t,)) for t in self._targets]
        self._specs += [("+".join(parents), "multi", tuple(parents)) for parents in self.multi_parent]
        if self.random_parents is not None:
            self._specs.append((RANDOM, "random", tuple(names)))
        if len(self._specs) > len(self._targets) and self._vae is not None:
            self._skip("cld/joint", "CLD (eq. 9) compares the code of the one intervened parent: it is computed for "
                                    "the single-parent interventions only")
        for module in (self._predictors, self._vae, self._fid_features):
            if module is not None:
                module.eval()
                module.requires_grad_(False)
        if not getattr(pl_module, "can_abduct", True):
            self._skip("abduction", f"{type(pl_module).__name__} cannot abduct: no counterfactual metrics")
        if self._predictors is None:
            self._skip("effectiveness", "no predictors given: no effectiveness")
        if self._vae is None:
            self._skip("cld", "no unconditional VAE given: no CLD")
        self._truth = self.true_counterfactuals and getattr(datamodule, "has_true_counterfactuals", False)
        if not self._truth:
            self._skip("true_cf", f"{type(datamodule).__name__} renders no ground truth (or it is disabled): "
                                  "no true-counterfactual error")
        self._references = references_of(trainer) if "abduction" not in self.skipped else {}
        if not self._metrics:
            self._metrics = {s: {name: self._build_metrics(keep=self.per_sample_csv and s == "test" and name == "model",
                                                           model=name == "model")
                                 for name in ["model", *self._references]} for s in STAGES}

    def _distances(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.distance_names:
            if name == "l1":
                out[name] = PixelL1()
            elif name.startswith("lpips_"):
                out["lpips"] = LPIPSDistance(name.split("_", 1)[1])
            elif name == "vgg16":
                out[name] = EmbeddingL1(vgg16_fc7())
            else:
                out[name] = EmbeddingL1(_Features(self._predictors))
        return out

    def _build_metrics(self, keep: bool, model: bool = True) -> nn.ModuleDict:
        """One subject's metrics of one stage. The distances' and FID's networks are built once and shared by
        every stage and subject (an LPIPS or Inception network is loaded once)."""
        if self._shared is None:
            self._shared = {"distances": self._distances(), "fid": self._fid_network()}
        distances, fid_net = self._shared["distances"], self._shared["fid"]
        m: dict[str, nn.Module] = {"composition": Composition(distances, self.composition_m, keep_per_sample=keep)}
        labels = [label for label, _, _ in self._specs]
        for t in labels:
            m[f"reversibility/{t}"] = Reversibility(distances, keep_per_sample=keep)
            if self._truth:
                m[f"true_cf/{t}"] = TrueCounterfactualSplitError()
        if self._predictors is not None:
            m["effectiveness"] = Effectiveness(self._attributes, labels)
        if self.morphometric:
            measured = [a for a in self._attributes if a.name in ("thickness", "intensity")]
            m["morpho_effectiveness"] = MorphometricEffectiveness(measured, labels)
        if self._vae is not None:
            m["cld"] = CounterfactualLatentDivergence(self._attributes, *self.cld_weights)
        if fid_net is not None:
            # A reference's FID reads the model's real moments (``_finish``): the real set is one set.
            m["fid"] = FID(self.fid, model=fid_net[0], num_features=fid_net[1],
                           reset_real=self._real_changes or not model)
            if self.kid:
                m["kid"] = KID(self.fid, model=fid_net[0], subsets=self.kid_subsets, subset_size=self.kid_subset_size,
                               seed=self.seed, reset_real=self._real_changes or not model, clip_subset_size=True)
        return nn.ModuleDict(m)

    def _fid_network(self) -> tuple[nn.Module, int] | None:
        """FID's feature network and its width, or None without FID."""
        if self.fid == "fid_domain":
            features = _Features(self._fid_features if self._fid_features is not None else self._predictors)
            with torch.no_grad():  # the feature size, from one blank image (the predictors are in eval mode)
                width = features(torch.zeros(1, *self._image_shape)).shape[1]
            return features, width
        if self.fid == "fid_inception":
            return InceptionFeatures(), 2048
        return None

    @property
    def _real_changes(self) -> bool:
        """Whether FID's real set differs between evaluations: the evaluated images themselves, or a capped
        number of training batches (whose order changes by epoch). The whole training split through a frozen
        extractor gives the same moments every time, so they are computed once per stage."""
        return self.fid_real == "eval" or self.fid_real_batches is not None

    def _split_pools(self, trainer: pl.Trainer, stage: str) -> dict[str, Tensor]:
        """Values of the continuous parents over the evaluated split, the pool interventions draw from."""
        continuous = [a.name for a in self._attributes if a.kind == "continuous"]
        if not continuous:
            return {}
        dataset = trainer.datamodule.dataset(stage)
        pa = getattr(dataset, "pa", None)
        if pa is None:
            raise ValueError(f"{type(dataset).__name__} exposes no `pa` values to draw continuous interventions from")
        return {n: pa[n] for n in continuous}

    def _start(self, trainer: pl.Trainer, stage: str, pl_module: pl.LightningModule) -> None:
        for metrics in self._metrics[stage].values():
            metrics.to(pl_module.device)
            for metric in metrics.values():
                metric.reset()
        for module in (self._predictors, self._vae, self._fid_features):
            if module is not None:
                module.to(pl_module.device)
        self._pools = self._split_pools(trainer, stage)
        if self.fid is not None and self.fid_real == "train" and not self._metrics[stage]["model"]["fid"].has_real:
            # A training pipeline may draw from the global RNG (random augmentations, a loader without its own
            # generator): under fork_rng, validating with FID leaves the training run's stream untouched.
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                for i, batch in enumerate(trainer.datamodule.train_dataloader()):
                    if self.fid_real_batches is not None and i >= self.fid_real_batches:
                        break
                    self._realism_update(self._metrics[stage]["model"], batch["x"].to(pl_module.device), real=True)

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer, "val"):
            self._start(trainer, "val", pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, "test", pl_module)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active(trainer, "val"):
            return
        if self.limit_val_batches is not None and batch_idx >= self.limit_val_batches:
            return
        self._update("val", trainer, pl_module, batch, batch_idx)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                          batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update("test", trainer, pl_module, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer, "val"):
            self._finish("val", pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish("test", pl_module)

    # -- per batch -----------------------------------------------------------------------------------------
    def _cf_parents(self, pl_module: pl.LightningModule, pa: Mapping[str, Tensor],
                    do: Mapping[str, Tensor]) -> dict[str, Tensor]:
        propagate = getattr(pl_module, "counterfactual_parents", None)
        return dict(propagate(pa, do)) if propagate is not None else {**pa, **do}

    @staticmethod
    def _realism_update(m: nn.ModuleDict, images: Tensor, real: bool) -> None:
        """FID's (and KID's) set: the features are extracted once for both (they share the network), and each
        metric is updated through torchmetrics' ``update`` (which counts updates and clears its cached value)."""
        features = m["fid"].features(images)
        m["fid"].update(None, real, features=features)
        if "kid" in m:
            m["kid"].update(None, real, features=features)

    def _draw(self, spec: tuple[str, str, tuple[str, ...]], position: int, pa: Mapping[str, Tensor],
              generator: torch.Generator, index: Tensor | None) -> Intervention:
        """Spec ``position``'s intervention: single-parent ones from stream ``position`` (as always), the others
        from their own block of streams; drawn per dataset row when rows are known, else from ``generator``."""
        _, kind, parents = spec
        if kind == "single":
            uniforms = per_sample_uniforms(index, self.seed, position) if index is not None else None
            return single_parent(self._attributes, pa, parents[0], generator, self._pools, uniforms)
        streams = None
        if index is not None:
            def streams(stream: int) -> Tensor:
                return per_sample_uniforms(index, self.seed, _STREAM_BLOCK * (position + 1) + stream)
        if kind == "multi":
            return multi_parent(self._attributes, pa, parents, generator, self._pools, streams)
        return random_parents(self._attributes, pa, generator, self._pools, self.random_parents, streams)

    def _update(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Mapping[str, Any],
                batch_idx: int) -> None:
        if "abduction" in self.skipped:
            return
        x, pa = batch["x"], dict(batch["pa"])
        seed = self.seed + 1_000_003 * trainer.global_rank + batch_idx
        generator = torch.Generator().manual_seed(seed)
        index = batch.get("index")
        plan: list[Intervened] = []
        truths: dict[str, Tensor | None] = {}

        def intervention(position: int, spec: tuple[str, str, tuple[str, ...]]) -> Intervened:
            """The model's intervention ``spec`` (drawn, then propagated by its SCM), recorded so that the
            references are given exactly the same one."""
            # Drawn per dataset row when rows are known: the same intervention whatever the batch or the
            # number of processes.
            draw = self._draw(spec, position, {k: v.cpu() for k, v in pa.items()}, generator, index)
            groups, cf_pa = [], {k: v.clone() for k, v in pa.items()}
            for rows, names in _mask_groups(draw):
                sub_pa = pa if rows is None else {k: v[rows.to(v.device)] for k, v in pa.items()}
                do = {n: (draw.values[n] if rows is None else draw.values[n][rows]).to(x.device) for n in names}
                sub_cf = self._cf_parents(pl_module, sub_pa, do)
                # The propagated descendants join the intervention, so x* is predicted from exactly the parents
                # it is judged against: the attribute mechanisms run once, and a stochastic one (Gumbel-max
                # abduction) is not sampled a second time inside counterfactual().
                moved = {k: v for k, v in sub_cf.items() if k not in do and not torch.equal(v, sub_pa[k])}
                groups.append(Group(rows, do, {**moved, **do}))
                if rows is None:
                    cf_pa = sub_cf
                else:
                    for k, v in sub_cf.items():
                        cf_pa[k][rows.to(v.device)] = v.to(cf_pa[k].dtype)
            plan.append(Intervened(groups, cf_pa))
            return plan[-1]

        def truth(label: str, drawn: Intervened) -> Tensor | None:
            if label not in truths:
                truths[label] = self._truth_of(trainer, batch, drawn, label)
            return truths[label]

        with evaluation_mode(pl_module, seed):
            self._observe(self._metrics[stage]["model"], pl_module, x, pa, index, batch_idx, intervention, truth,
                          model=True)
        if self._evaluates_references(stage):
            for name, reference in self._references.items():
                with evaluation_mode(reference):
                    self._observe(self._metrics[stage][name], reference, x, pa, index, batch_idx,
                                  lambda position, spec: plan[position], truth, model=False)

    def _observe(self, m: nn.ModuleDict, subject: nn.Module, x: Tensor, pa: Mapping[str, Tensor],
                 index: Tensor | None, batch_idx: int,
                 intervention: Callable[[int, tuple], Intervened],
                 truth: Callable[[str, Intervened], Tensor | None], model: bool) -> None:
        """Every metric of one subject (the model or a reference) on one batch. The model's calls happen in the
        order they always had, so its evaluation noise, drawn from the forked RNG, is what it always was."""
        # The FID set takes one counterfactual per image, its intervened parent cycling with the image's row
        # (with the batch position when rows are unknown).
        rows = index.cpu() if index is not None else torch.arange(len(x)) + batch_idx * len(x)
        fid_choice = (rows % len(self._targets)).to(x.device)
        m["composition"].update(subject, x, pa, index)
        fact, x_fid = None, torch.empty_like(x) if "fid" in m else None
        for position, spec in enumerate(self._specs):
            target, single = spec[0], spec[1] == "single"
            drawn = intervention(position, spec)
            cf_pa = drawn.cf_pa
            x_cf = drawn.counterfactual(subject, x, pa)
            m[f"reversibility/{target}"].update(subject, x, pa, cf_pa, index, x_star=x_cf)
            if "effectiveness" in m:
                m["effectiveness"].update(self._predictors.predict_parents(x_cf, cf_pa), cf_pa, target)
            if "morpho_effectiveness" in m:
                # imported here: scikit-image, needed by MorphoMNIST only
                from datamodules.synthetic.morphomnist import oracle_measure

                measured = dict(zip(("thickness", "intensity"), oracle_measure(x_cf), strict=True))
                m["morpho_effectiveness"].update(measured, cf_pa, target)
            if "cld" in m and single:
                fact = fact if fact is not None else self._vae.posterior(x)  # once per batch, not per parent
                m["cld"].update(*fact, *self._vae.posterior(x_cf), pa, cf_pa, target)
            if x_fid is not None and single:
                x_fid[fid_choice == position] = x_cf[fid_choice == position]
            if f"true_cf/{target}" in m:
                true_cf = truth(target, drawn)
                if true_cf is not None:
                    m[f"true_cf/{target}"].update(x_cf, true_cf.to(device=x_cf.device, dtype=x_cf.dtype), x)
        if x_fid is not None:
            self._realism_update(m, x_fid, real=False)
            if self.fid_real == "eval" and model:
                self._realism_update(m, x, real=True)

    def _truth_of(self, trainer: pl.Trainer, batch: Mapping[str, Any], drawn: Intervened,
                  target: str) -> Tensor | None:
        """The ground truth of the drawn values (not the descendants the model's SCM moved: the data's own
        mechanisms move them), one call per group of images that drew the same parents."""
        index = batch["index"].cpu()
        try:
            parts = []
            for group in drawn.groups:
                rows = index if group.rows is None else index[group.rows]
                drawn_values = {k: v.cpu() for k, v in group.drawn.items()}
                parts.append((group.rows, trainer.datamodule.true_counterfactual(rows, drawn_values)))
        except (ValueError, NotImplementedError) as err:
            self._skip(f"true_cf/{target}", f"no true counterfactual for do({target}): {err}")
            return None
        if parts[0][0] is None:
            return parts[0][1]
        out = torch.empty((len(index), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
        for rows, images in parts:
            out[rows] = images
        return out

    # -- per epoch -----------------------------------------------------------------------------------------
    def _compute(self, m: nn.ModuleDict, stage: str) -> dict[str, Tensor]:
        computed: dict[str, Tensor] = {}
        for key, value in m["composition"].compute().items():
            computed[f"{stage}/composition/{key}"] = value
        for target, _, _ in self._specs:
            for key, value in m[f"reversibility/{target}"].compute().items():
                computed[f"{stage}/reversibility/{target}/{key}"] = value
            # A parent the data cannot re-render (MorphoMNIST's digit) was skipped on every process alike.
            if f"true_cf/{target}" in m and f"true_cf/{target}" not in self.skipped:
                for key, value in m[f"true_cf/{target}"].compute().items():
                    computed[f"{stage}/true_cf/do_{target}/{key}"] = value
        if "effectiveness" in m:
            computed.update(Effectiveness.flatten(m["effectiveness"].compute(), f"{stage}/effectiveness/"))
        if "morpho_effectiveness" in m:
            computed.update(MorphometricEffectiveness.flatten(m["morpho_effectiveness"].compute(),
                                                              f"{stage}/morpho_effectiveness/"))
        if "cld" in m:
            for key, value in m["cld"].compute().items():
                computed[f"{stage}/{key if key.startswith('cld') else 'cld_' + key}"] = value
        if "fid" in m:
            computed[f"{stage}/{self.fid}"] = m["fid"].compute()
        if "kid" in m:
            name = m["kid"].name
            computed[f"{stage}/{name}"], computed[f"{stage}/{name}_std"] = m["kid"].compute()
            computed[f"{stage}/{name}_subset_size"] = torch.tensor(float(m["kid"].last_subset_size))
        return computed

    def _finish(self, stage: str, pl_module: pl.LightningModule) -> dict[str, float]:
        if "abduction" in self.skipped:
            return {}
        metrics = self._metrics[stage]
        values = self._log_values(self._compute(metrics["model"], stage), stage, pl_module)

        def compute_reference(name: str) -> dict[str, Tensor]:
            for realism in ("fid", "kid"):
                if realism in metrics[name]:
                    metrics[name][realism].copy_real(metrics["model"][realism])
            return self._compute(metrics[name], stage)

        values.update(self._finish_references(stage, pl_module, compute_reference))
        self.results[stage] = values
        if stage == "test" and self.per_sample_csv:
            self._write_per_sample(pl_module.trainer, metrics["model"])
        return values

    def _write_per_sample(self, trainer: pl.Trainer, m: nn.ModuleDict) -> None:
        """``per_sample.csv``: one row per test image (by dataset index), one column per per-image value."""
        columns: dict[str, dict[int, float]] = {}
        sources = [("composition", m["composition"])] + [(f"reversibility/{t}", m[f"reversibility/{t}"])
                                                         for t, _, _ in self._specs]
        for prefix, metric in sources:
            values = metric.per_sample()  # collective under DDP: every process takes part
            index = values.pop("index").tolist()
            for key, column in values.items():
                columns[f"{prefix}/{key}"] = dict(zip(index, column.tolist(), strict=True))
        if trainer.global_rank != 0:
            return
        self._composition_grid(trainer, columns)
        path = Path(trainer.default_root_dir) / "per_sample.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = sorted(set().union(*(c.keys() for c in columns.values())))
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["index", *columns])
            for i in rows:
                writer.writerow([i, *(f"{c[i]:.6g}" if i in c else "" for c in columns.values())])


    def _composition_grid(self, trainer: pl.Trainer, columns: Mapping[str, Mapping[int, float]]) -> None:
        """``images/test_composition_best_median_worst.png``: the test images with the lowest, median and highest
        composition^m (first distance, largest m); columns x | f^1(x) | f^m(x) | 4 * |x - f^m(x)|."""
        m_max = max(self.composition_m)
        first = self.distance_names[0]
        key = f"composition/{'lpips' if first.startswith('lpips_') else first}/{m_max}"
        if key not in columns or not columns[key]:
            return
        ranked = sorted(columns[key], key=lambda i: (columns[key][i], i))
        chosen = [ranked[0], ranked[len(ranked) // 2], ranked[-1]]
        dataset = trainer.datamodule.dataset("test")
        position = {int(r): p for p, r in enumerate(torch.as_tensor(dataset.rows).tolist())}
        items = [dataset[position[i]] for i in chosen]
        pl_module = trainer.lightning_module
        x = torch.stack([it["x"] for it in items]).to(pl_module.device)
        pa = {n: torch.stack([it["pa"][n] for it in items]).to(pl_module.device) for n in items[0]["pa"]}
        with evaluation_mode(pl_module, self.seed):
            chain = [x]
            for _ in range(m_max):
                chain.append(pl_module.counterfactual(chain[-1], pa, {}))
        grid = counterfactual_grid([x, chain[1], chain[-1], (4 * (x - chain[-1]).abs()).clamp(0, 1)])
        name = "test_composition_best_median_worst"
        save_png(grid, Path(trainer.default_root_dir) / "images" / f"{name}.png")
        log_image(trainer, f"test/{name}", grid)


class Group(NamedTuple):
    """The images of one batch that drew the same parents: ``rows`` their positions in the batch (``None``: all
    of them), ``drawn`` the drawn values (what the ground truth renders), ``do`` those plus the descendants the
    model's SCM moved (what x* is predicted from)."""

    rows: Tensor | None
    drawn: dict[str, Tensor]
    do: dict[str, Tensor]


class Intervened(NamedTuple):
    """One intervention of one batch: its groups and ``cf_pa``, all counterfactual parents of the batch."""

    groups: list[Group]
    cf_pa: dict[str, Tensor]

    def counterfactual(self, subject: nn.Module, x: Tensor, pa: Mapping[str, Tensor]) -> Tensor:
        """x* of every image: one ``counterfactual`` call per group (one call for the whole batch when every
        image drew the same parents, as single-parent and joint interventions do)."""
        if self.groups[0].rows is None:
            return subject.counterfactual(x, pa, self.groups[0].do)
        out = torch.empty_like(x)
        for group in self.groups:
            rows = group.rows.to(x.device)
            out[rows] = subject.counterfactual(x[rows], {k: v[rows] for k, v in pa.items()}, group.do)
        return out


def _mask_groups(draw: Intervention) -> list[tuple[Tensor | None, list[str]]]:
    """(rows, parents) for each set of parents some image drew; ``(None, all parents)`` when every image drew
    every parent (single-parent and joint interventions)."""
    names = draw.names
    chosen = torch.stack([draw.mask[n] for n in names], dim=1)
    if bool(chosen.all()):
        return [(None, names)]
    patterns = torch.unique(chosen, dim=0)
    groups = []
    for pattern in patterns:
        rows = torch.nonzero((chosen == pattern).all(1)).reshape(-1)
        groups.append((rows, [n for n, on in zip(names, pattern.tolist(), strict=True) if on]))
    return groups


class _Features(nn.Module):
    """A network's penultimate features as a feature extractor (for embedding L1 and FID)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return self.network.features(x)
