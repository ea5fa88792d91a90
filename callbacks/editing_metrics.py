"""The attribute-editing evaluation of IFcVAE-GAN (§4.1–4.2) as a Lightning callback, for any counterfactual model.

:class:`AttributeEditingMetrics` runs in validation (every ``every_n_epochs`` epochs, optionally on the first
``limit_val_batches`` batches only) and in test (always, on the whole set). For each batch it reconstructs the
images, edits them with ``do(attr=0)`` and ``do(attr=1)`` through the :class:`CounterfactualModule` contract,
scores the edits with an independent, frozen oracle classifier, and compares the model's flip
``do(attr=1-y)`` with the DataModule's ground-truth counterfactual when the data is synthetic.

One callback edits one attribute (``attribute: Smiling``) or a list (``attributes: [Bangs, ...]``, CDVAE-GAN's
Table 3). A list gives every attribute exactly the keys and values of one callback per attribute: each
attribute's edits are made from the model's evaluation RNG in the state a callback of its own would have had
(the same batch seed, the same calls before the edits), and the oracle is loaded once per attribute from the
global RNG, as that many callbacks did (``load_oracle``). What does not depend on the attribute (the
reconstruction, the model's and the oracle's predictions on x, the references' reconstructions) is computed
once per batch.

Logged keys (``stage`` is ``val`` or ``test``, ``attr`` the attribute's name) and their names in the paper:

==================================  =====================================================================
key                                 meaning
==================================  =====================================================================
``{stage}/mse``                     MSE between ``x`` and ``x̂ = reconstruct(x, pa)`` (paper: MSE)
``{stage}/edit/{attr}/C_pos_paper`` do(attr=1) edits the oracle calls positive, inputs with true ``attr=1``
                                    only (paper: Ĉ_Smiling; "all input test images ... were 'Smiling'")
``{stage}/edit/{attr}/C_neg_paper`` do(attr=0) edits the oracle calls negative, inputs with true ``attr=1``
                                    only (paper: Ĉ_Not-Smiling)
``{stage}/edit/{attr}/C_pos_all``   as ``C_pos_paper`` over all inputs
``{stage}/edit/{attr}/C_neg_all``   as ``C_neg_paper`` over all inputs
``{stage}/edit/{attr}/n_paper``     number of inputs with true ``attr=1`` (the paper protocol's sample size)
``{stage}/edit/{attr}/flip_acc``    flips do(attr=1-y) of all inputs the oracle assigns to 1 - y (CDVAE-GAN
                                    Table 3)
``{stage}/acc/E_y/{attr}``          accuracy of the model's own classifier on real images (paper: Acc.
                                    (E_y,φ)); only for models that implement ``predict_attributes``
``{stage}/acc/oracle/{attr}``       accuracy of the oracle on real images (shows it can be trusted)
``{stage}/acc/oracle_on_recon/{attr}`` accuracy of the oracle on the reconstructions x̂: the ceiling of Ĉ. Near
                                    0.5 the reconstructions lose the attribute, and no edit can be judged
``{stage}/acc/oracle_on_true_cf/{attr}`` accuracy of the oracle on the true counterfactuals (label 1 - y):
                                    whether it can judge the edits it is asked to judge (synthetic data)
``{stage}/true_cf/mse``             pixel MSE between the model's ``do(attr=1-y)`` and the true one
``{stage}/true_cf/l1``              pixel L1 (mean absolute error) of the same pair
``{stage}/leakage/{attr}/probe_bacc`` balanced accuracy of a fresh linear probe reading the attribute from
                                    the abducted code (``callbacks.metrics.leakage``; 0.5 = none left);
                                    only with ``leakage_probe=True``
``{stage}/preservation/{attr}/{b}`` share of flips do(attr=1-y) on which the preservation oracle reads the
                                    true value of attribute ``b``; ``.../mean`` over the judged ``b``
``{stage}/edit/{attr}/sr_plus``     with ``scores: [sr]``: SR(+), the share of swaps 0 -> 1 (do(attr=1) of
                                    the inputs without it) the oracle accepts (CVQVAE §3;
                                    ``callbacks.metrics.scores.SwapSuccessRate``)
``{stage}/edit/{attr}/sr_minus``    SR(−), the same of the swaps 1 -> 0 (equal to ``C_neg_paper``)
``{stage}/edit/{attr}/sr``          SR = (SR(+) + SR(−)) / 2 (CVQVAE Table 3)
``{stage}/edit/{attr}/cfd``         with ``scores: [cfd]``: CFD, the mean L2 distance between the oracle's
                                    last-layer outputs (``oracle(x)``, its logits) on a real image and on the
                                    swap that took its class, over seeded random pairs of one image of each
                                    class (``PairedClassifierFeatureDistance``; lower is better)
``{stage}/bca/E_y/{attr}``          with ``scores: [bca]``: balanced accuracy (mean of the two class recalls)
                                    of the model's own classifier on real images (CVQVAE's BCA); only for
                                    models that implement ``predict_attributes``
``{stage}/n_images``                number of images evaluated
``{stage}/reference/{name}/...``    the keys above (but the accuracies on real images, E_y's and the
                                    leakage probe) for each reference counterfactual (``callbacks.references``)
==================================  =====================================================================

A probability ``p`` is positive iff ``p > threshold`` (as torchmetrics' ``BinaryAccuracy``). Metrics whose
inputs are unavailable (no oracle, a model that cannot abduct, no ground truth, an empty paper subset) are
not logged; the reason is printed once and kept in :attr:`AttributeEditingMetrics.skipped`.

Values are torchmetrics sums/counts synchronised across processes at compute time, so they are logged with
``sync_dist=False`` and are the same on one process or many, provided every sample is seen exactly once:
Lightning's default ``DistributedSampler`` pads the evaluation set by repeating samples, so exact
evaluation under DDP needs ``use_distributed_sampler=False`` and a non-padding sampler (or one device).
After ``trainer.test`` the final values are in ``callback.results["test"]`` (a dict key -> float); with
``ddp_spawn`` that dict stays in the worker processes, so read ``trainer.callback_metrics`` instead.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import BinaryAccuracy

from callbacks.metrics.editing import (
    EditSuccessRate,
    FlipSuccessRate,
    ReconstructionMSE,
    TrueCounterfactualSplitError,
)
from callbacks.metrics.leakage import LinearProbeLeakage
from callbacks.metrics.scores import BalancedAccuracy, PairedClassifierFeatureDistance, SwapSuccessRate
from callbacks.references import references_of
from lightning_modules.base import CounterfactualModule
from lightning_modules.networks.frozen import evaluating

__all__ = ["AttributeEditingMetrics", "StagedEvaluation", "evaluation_mode", "load_frozen", "load_oracle"]

STAGES = ("val", "test")
#: the classifier scores of ``callbacks.metrics.scores`` that ``AttributeEditingMetrics(scores=...)`` adds.
SCORES = ("sr", "cfd", "bca")


def load_oracle(path: str | os.PathLike) -> nn.Module:
    """Load the independent attribute classifier (``AttributeClassifier``) from a checkpoint, on the CPU.

    Every call builds a new module, whose weight initialisation draws from the global RNG before the checkpoint
    overwrites it. Runs are seeded before their callbacks load oracles, so that draw is part of every published
    run's random stream; sharing one module between callbacks (or loading under a forked RNG) would change the
    training of every run that judges with an oracle. New loaders use ``load_frozen`` instead.
    """
    # Imported here so that this module (and its tests, which use a fake oracle) do not depend on it.
    from lightning_modules.attribute_classifier import AttributeClassifier
    from lightning_modules.checkpoints import load_module

    return load_module(AttributeClassifier, path, "oracle checkpoint", "train the attribute classifier "
                       "(`make train EXP=<classifier experiment>`) or point the oracle at its checkpoint")


def load_frozen(path: str | os.PathLike) -> nn.Module:
    """``load_oracle`` without touching the global RNG: for evaluation networks that no published run loaded."""
    with torch.random.fork_rng(devices=[]):
        return load_oracle(path)


@contextmanager
def evaluation_mode(module: nn.Module, seed: int | None = None) -> Iterator[None]:
    """Run a block with ``module`` in eval mode, without gradients, and without touching the global RNG.

    Models may draw noise while abducting; a callback that consumed the global RNG would change the training
    run it observes (and break resume determinism). Inside the block the CPU and the module's CUDA generator
    are forked, and seeded with ``seed`` when given so that evaluation noise is reproducible; on exit both
    generators and every submodule's train/eval flag are restored.
    """
    cuda = _cuda_indices(module)
    modes = [(m, m.training) for m in module.modules()]
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            for index in cuda:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
        module.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training


def _cuda_indices(module: nn.Module) -> list[int]:
    """The CUDA device of ``module``'s parameters as a list of one index, or [] on the CPU."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _implements_own_classifier(pl_module: pl.LightningModule) -> bool:
    method = getattr(type(pl_module), "predict_attributes", None)
    return method is not None and method is not CounterfactualModule.predict_attributes


class StagedEvaluation(pl.Callback):
    """What every metric callback shares: when to run (test always; validation every ``every_n_epochs``
    epochs of ``fit``, never in the sanity check), skipped metric groups reported once each, and the logging
    of the reference counterfactuals' values (``callbacks.references``) under ``{stage}/reference/<name>/...``.

    References are deterministic and frozen, so their validation values are computed on the first validated
    epoch and logged again, unchanged, at the later ones."""

    every_n_epochs: int = 1
    skipped: dict[str, str]

    def __init__(self) -> None:
        super().__init__()
        self._references: dict[str, nn.Module] = {}
        self._reference_values: dict[str, dict[str, float]] = {}

    def _skip(self, group: str, reason: str) -> None:
        if self.skipped.get(group) != reason:
            self.skipped[group] = reason
            rank_zero_info(f"[{type(self).__name__}] {reason}")

    def _active(self, trainer: pl.Trainer, stage: str) -> bool:
        if stage == "test":
            return True
        if trainer.sanity_checking:
            return False
        return trainer.state.fn != TrainerFn.FITTING or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _evaluates_references(self, stage: str) -> bool:
        """Whether this epoch evaluates the references (not when their values of this stage are cached)."""
        return bool(self._references) and stage not in self._reference_values

    def _log_values(self, computed: Mapping[str, Tensor], stage: str, pl_module: pl.LightningModule,
                    subject: str | None = None) -> dict[str, float]:
        """Log finite values as they are (``subject=None``: the model) or under ``{stage}/reference/{subject}/``;
        NaN values (an empty set) are reported once and not logged."""
        values = {}
        for key, value in computed.items():
            value = float(value)
            if subject is not None:
                key = f"{stage}/reference/{subject}/{key.removeprefix(stage + '/')}"
            if value != value:
                self._skip(key, f"{key}: no samples in {stage}, not logged")
                continue
            values[key] = value
            pl_module.log(key, value, sync_dist=False)
        return values

    def _finish_references(self, stage: str, pl_module: pl.LightningModule,
                           compute: Callable[[str], Mapping[str, Tensor]]) -> dict[str, float]:
        """Compute (or, in later validation epochs, recall) and log every reference's values."""
        if not self._references:
            return {}
        if stage in self._reference_values:
            values = self._reference_values[stage]
            for key, value in values.items():
                pl_module.log(key, value, sync_dist=False)
            return dict(values)
        values = {}
        for name in self._references:
            values.update(self._log_values(compute(name), stage, pl_module, subject=name))
        if stage == "val":
            self._reference_values[stage] = values
        return values


class AttributeEditingMetrics(StagedEvaluation):
    """Reconstruction MSE, edit success rates Ĉ, classifier accuracies and true-counterfactual errors, for the model
    and, beside it, for the run's reference counterfactuals (``callbacks.references``), for one attribute or a list.

    :param attribute: the binary attribute to edit (a parent name of the model and DataModule); or
    :param attributes: several of them (CDVAE-GAN's seven). Every attribute's keys, evaluation noise and oracle
        load are those of one callback per attribute (see the module docstring); ``{stage}/n_images`` and
        ``{stage}/mse`` do not depend on the attribute and are logged once.
    :param oracle: checkpoint of the independent classifier (must exist), or an already-built module with
        ``predict_attributes(x) -> {name: probability [B]}``; ``None`` skips the edit success rates.
    :param oracle_experiment: name of the experiment that trains the oracle, quoted in the error message.
    :param threshold: probability above which (strictly) a classifier output is positive.
    :param every_n_epochs: during ``fit``, run validation metrics after every n-th epoch (``validate`` and
        ``test`` always run).
    :param limit_val_batches: in validation, use only the first n batches of each process (a cheap subset).
    :param true_counterfactuals: compare with the DataModule's ground-truth counterfactuals when it has them (one
        attribute only: the keys ``{stage}/true_cf/...`` do not name it; ``CounterfactualMetrics`` logs
        ``true_cf/do_<attribute>/...`` for each of several).
    :param seed: seed of the (forked) RNG used by the model while it is evaluated here.
    :param leakage_probe: also fit a linear probe that reads the attribute from ``abduct(x, pa)`` (which must
        be one tensor per image): meaningful for models whose code should be free of the attribute, such as
        IFcVAE-GAN's ẑ. The codes of the whole set are kept in memory until the epoch ends.
    :param preservation_oracle: an independent classifier of other attributes (``AttributeClassifier`` checkpoint
        or module; it may be the ``oracle`` itself when that one classifies several attributes): on the flips
        do(attribute = 1 − y) it reads each attribute of ``preserved`` and compares it with the image's true label
        (``datamodule.attribute_labels``), ``{stage}/preservation/{attribute}/{other}`` = the share of flips
        that keep it, and ``.../mean`` over ``preserved``.
    :param preserved: the attributes judged for preservation (default: every attribute of the preservation
        oracle but the edited one); with several edited attributes each is judged on the others of the list.
    :param scores: classifier scores of ``callbacks.metrics.scores`` to add, any of ``sr`` (SR(+), SR(−), SR:
        ``{stage}/edit/{attr}/sr_plus``, ``sr_minus``, ``sr``), ``cfd`` (``{stage}/edit/{attr}/cfd``; the
        oracle's forward, its last layer, must be callable) and ``bca`` (``{stage}/bca/E_y/{attr}``, for models
        with ``predict_attributes``).
    :param scores_seed: seed of CFD's random pairs.
    """

    def __init__(
        self,
        attribute: str | None = None,
        oracle: str | os.PathLike | nn.Module | None = None,
        oracle_experiment: str | None = None,
        threshold: float = 0.5,
        every_n_epochs: int = 1,
        limit_val_batches: int | None = None,
        true_counterfactuals: bool = True,
        seed: int = 0,
        leakage_probe: bool = False,
        preservation_oracle: str | os.PathLike | nn.Module | None = None,
        preserved: Sequence[str] | None = None,
        attributes: Sequence[str] | None = None,
        scores: Sequence[str] = (),
        scores_seed: int = 0,
    ) -> None:
        super().__init__()
        if (attribute is None) == (attributes is None):
            raise ValueError("set exactly one of `attribute` (one attribute to edit) and `attributes` (a list), got "
                             f"attribute={attribute!r} and attributes={attributes!r}")
        names = [str(attribute)] if attribute is not None else [str(a) for a in attributes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"`attributes` must list distinct attribute names, got {names}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if limit_val_batches is not None and limit_val_batches < 1:
            raise ValueError(f"limit_val_batches must be None or >= 1, got {limit_val_batches}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if preserved is not None and preservation_oracle is None:
            raise ValueError("`preserved` names the attributes a preservation oracle judges: set "
                             "`preservation_oracle` too")
        if preserved is not None and attribute is not None and attribute in preserved:
            raise ValueError(f"`preserved` lists the edited attribute {attribute!r}; it changes by design")
        if true_counterfactuals and len(names) > 1:
            raise ValueError(f"true_counterfactuals=true logs {{stage}}/true_cf/... once, for one attribute, but "
                             f"`attributes` lists {len(names)}; set true_counterfactuals: false (CounterfactualMetrics "
                             "logs true_cf/do_<attribute>/ for each)")
        unknown = [s for s in scores if s not in SCORES]
        if unknown:
            raise ValueError(f"`scores` lists {unknown}; choose among {list(SCORES)}")
        self.attributes = names
        self.threshold = float(threshold)
        self.every_n_epochs = every_n_epochs
        self.limit_val_batches = limit_val_batches
        self.true_counterfactuals = true_counterfactuals
        self.seed = seed
        self.leakage_probe = leakage_probe
        self.scores = tuple(dict.fromkeys(str(s) for s in scores))
        self.scores_seed = scores_seed
        self.oracle_path: Path | None = None
        # The oracle lives on the callback, not on the LightningModule: it is no submodule of the model, so it
        # stays out of the model's state_dict and checkpoints (Callback.state_dict is empty).
        self._oracle: nn.Module | None = None
        if isinstance(oracle, nn.Module):
            self._oracle = oracle
        elif oracle is not None:
            self.oracle_path = Path(oracle).expanduser()
            if not self.oracle_path.is_file():
                what = repr(names[0]) if len(names) == 1 else str(names)
                how = (f"`make train EXP={oracle_experiment}`" if oracle_experiment
                       else f"the classifier experiment for {what} (`make train EXP=<experiment>`)")
                raise FileNotFoundError(
                    f"oracle checkpoint {str(self.oracle_path)!r} does not exist; train it with {how}, "
                    f"or set the callback's `oracle` to the checkpoint's path."
                )
        self._preservation_oracle = _frozen_classifier(preservation_oracle, "preservation_oracle")
        self.preserved = None if preserved is None else [str(a) for a in preserved]
        self._preserved: dict[str, list[str]] = {}
        self._metrics: dict[str, dict[str, nn.ModuleDict]] = {}
        self._enabled: dict[str, bool] = {}
        self._references: dict[str, nn.Module] = {}
        #: metric group -> reason it is not computed (each reason is printed once).
        self.skipped: dict[str, str] = {}
        #: stage -> {key: value} of the last completed evaluation; ``results["test"]`` after ``trainer.test``.
        self.results: dict[str, dict[str, float]] = {}

    @property
    def attribute(self) -> str:
        """The edited attribute of a callback that edits one."""
        if len(self.attributes) != 1:
            raise AttributeError(f"this callback edits {len(self.attributes)} attributes: read `attributes`")
        return self.attributes[0]

    # -- set-up --------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loaded = False
        if self._oracle is None and self.oracle_path is not None:
            self._oracle, loaded = load_oracle(self.oracle_path), True
        if self._oracle is not None:
            known = getattr(self._oracle, "attributes", None)
            missing = [a for a in self.attributes if known is not None and a not in known]
            if missing:
                raise ValueError(f"the oracle {self.oracle_path or type(self._oracle).__name__} classifies "
                                 f"{list(known)}, not {missing}")
            self._oracle.eval()
            self._oracle.requires_grad_(False)
        self._setup_preservation()
        self._enabled = self._decide_enabled(trainer, pl_module)
        self._references = references_of(trainer) if self._enabled["reconstruction"] else {}
        if loaded:
            # One callback per attribute loaded the oracle once each, in this order (the first load, then the
            # references' pool, then the others), from the global RNG that the published runs' training noise
            # comes from next (see load_oracle): the same draws keep those runs' random streams. The copies
            # are the same weights, so one module serves every attribute.
            for _ in self.attributes[1:]:
                load_oracle(self.oracle_path)
        if not self._metrics:
            subjects = ["model", *self._references]
            self._metrics = {s: {name: self._build_metrics() for name in subjects} for s in STAGES}
        if trainer.world_size > 1:
            # Lightning suggests sync_dist=True for every value logged at epoch end under DDP; ours are already
            # synchronised by torchmetrics (and averaging them again could change the last bit), so silence
            # that hint for exactly these keys.
            attr = "|".join(re.escape(a) for a in self.attributes)
            ours = (rf"(val|test)/(reference/\w+/)?(n_images|mse|edit/({attr})/\w+|acc/(E_y|oracle\w*)/({attr})|"
                    rf"bca/E_y/({attr})|true_cf/\w+|leakage/({attr})/\w+|preservation/({attr})/\w+)")
            warnings.filterwarnings(
                "ignore", message=rf"It is recommended to use `self\.log\('{ours}'", category=PossibleUserWarning
            )

    def _setup_preservation(self) -> None:
        oracle = self._preservation_oracle
        if oracle is None:
            self._skip("preservation", "no preservation oracle given: no preservation of the other attributes")
            return
        known = list(getattr(oracle, "attributes", []) or [])
        candidates = self.preserved if self.preserved is not None else known
        unknown = [a for a in candidates if known and a not in known]
        if unknown:
            raise ValueError(f"`preserved` lists {unknown}, which the preservation oracle does not classify "
                             f"(it classifies {known})")
        for attr in self.attributes:
            self._preserved[attr] = [a for a in candidates if a != attr]
            if not self._preserved[attr]:
                raise ValueError(f"the preservation oracle classifies only {known}: nothing besides {attr!r} "
                                 "to judge")
        if self.preserved is None and len(self.attributes) == 1:
            self.preserved = self._preserved[self.attributes[0]]
        oracle.eval()
        oracle.requires_grad_(False)

    def _build_metrics(self) -> nn.ModuleDict:
        """One subject's metrics: ``n_images`` and ``mse``, then ``<attr>/<name>`` for each attribute."""
        t = self.threshold
        metrics: dict[str, nn.Module] = {"n_images": SumMetric(), "mse": ReconstructionMSE()}
        for a in self.attributes:
            own = {
                "C_pos_paper": EditSuccessRate(target=1, threshold=t),
                "C_neg_paper": EditSuccessRate(target=0, threshold=t),
                "C_pos_all": EditSuccessRate(target=1, threshold=t),
                "C_neg_all": EditSuccessRate(target=0, threshold=t),
                "flip_acc": FlipSuccessRate(threshold=t),
                "n_paper": SumMetric(),
                "acc_E_y": BinaryAccuracy(threshold=t),
                "acc_oracle": BinaryAccuracy(threshold=t),
                "acc_oracle_recon": BinaryAccuracy(threshold=t),
                "acc_oracle_true_cf": BinaryAccuracy(threshold=t),
                "true_cf": TrueCounterfactualSplitError(),
                "leakage": LinearProbeLeakage(),
                "sr": SwapSuccessRate(threshold=t),
                "cfd": PairedClassifierFeatureDistance(seed=self.scores_seed),
                "bca": BalancedAccuracy(num_classes=2, threshold=t),
            }
            if self._preservation_oracle is not None:
                own.update({f"preservation/{p}": BinaryAccuracy(threshold=t) for p in self._preserved[a]})
            metrics.update({f"{a}/{name}": metric for name, metric in own.items()})
        return nn.ModuleDict(metrics)

    def _decide_enabled(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, bool]:
        """Which metric groups can run; decided from configuration only, so identical on every process."""
        can_abduct = getattr(pl_module, "can_abduct", True)
        if not can_abduct:
            self._skip("abduction", f"{type(pl_module).__name__} cannot abduct: no reconstruction, edits or "
                                    "true-counterfactual error")
        if self._oracle is None:
            self._skip("oracle", "no oracle classifier given (`oracle=None`): no edit success rates Ĉ and no "
                                 "oracle accuracy")
        own_classifier = _implements_own_classifier(pl_module)
        if not own_classifier:
            self._skip("E_y", f"{type(pl_module).__name__} has no attribute classifier of its own "
                              "(predict_attributes): no E_y accuracy")
        cfd = "cfd" in self.scores and can_abduct and self._oracle is not None
        if cfd and getattr(type(self._oracle), "forward", None) is nn.Module.forward:
            raise ValueError(f"scores: cfd compares the oracle's last-layer outputs, oracle(x), but "
                             f"{type(self._oracle).__name__} has no forward; drop cfd from the callback's `scores`")
        true_cf = self._true_counterfactuals_available(trainer) and can_abduct
        preservation = can_abduct and self._preservation_oracle is not None and self._labels_available(trainer)
        return {"reconstruction": can_abduct, "edits": can_abduct and self._oracle is not None,
                "acc_oracle": self._oracle is not None, "acc_E_y": own_classifier, "true_cf": true_cf,
                "leakage": can_abduct and self.leakage_probe, "preservation": preservation,
                "sr": "sr" in self.scores and can_abduct and self._oracle is not None, "cfd": cfd,
                "bca": "bca" in self.scores and own_classifier}

    def _labels_available(self, trainer: pl.Trainer) -> bool:
        datamodule = trainer.datamodule
        if getattr(type(datamodule), "attribute_labels", None) is None:
            self._skip("preservation", f"{type(datamodule).__name__} cannot give the true labels of other "
                                       "attributes (attribute_labels): no preservation")
            return False
        return True

    def _true_counterfactuals_available(self, trainer: pl.Trainer) -> bool:
        if not self.true_counterfactuals:
            self._skip("true_cf", "true-counterfactual error disabled (`true_counterfactuals=False`)")
            return False
        datamodule = trainer.datamodule
        if datamodule is None or not getattr(datamodule, "has_true_counterfactuals", False):
            name = type(datamodule).__name__ if datamodule is not None else "no DataModule"
            self._skip("true_cf", f"{name} has no ground-truth counterfactuals: no true-counterfactual error")
            return False
        return True

    def _start(self, stage: str, pl_module: pl.LightningModule) -> None:
        # Moved here rather than in setup: Lightning moves the model to its device only after the setup hooks.
        for metrics in self._metrics[stage].values():
            metrics.to(pl_module.device)
            for metric in metrics.values():
                metric.reset()
        for oracle in (self._oracle, self._preservation_oracle):
            if oracle is not None:
                oracle.to(pl_module.device)

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer, "val"):
            self._start("val", pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("test", pl_module)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Mapping[str, Any],
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if not self._active(trainer, "val"):
            return
        if self.limit_val_batches is not None and batch_idx >= self.limit_val_batches:
            return
        self._update("val", trainer, pl_module, batch, self._batch_seed(trainer, batch_idx, dataloader_idx))

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Mapping[str, Any],
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        self._update("test", trainer, pl_module, batch, self._batch_seed(trainer, batch_idx, dataloader_idx))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer, "val"):
            self._finish("val", pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish("test", pl_module)

    # -- per batch and per epoch ---------------------------------------------------------------------------
    def _batch_seed(self, trainer: pl.Trainer, batch_idx: int, dataloader_idx: int) -> int:
        return self.seed + 1_000_003 * trainer.global_rank + 10_007 * dataloader_idx + batch_idx

    def _update(
        self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Mapping[str, Any], seed: int
    ) -> None:
        m, enabled = self._metrics[stage]["model"], self._enabled
        x, pa = batch["x"], batch["pa"]
        positive = {a: pa[a] > 0.5 for a in self.attributes}
        m["n_images"].update(torch.tensor(float(x.shape[0]), device=x.device))
        with evaluation_mode(pl_module, seed):
            # The calls one callback per attribute made in this order from the same seed, up to the edits: they
            # do not depend on the attribute, so they are made once and the RNG is where each callback had it.
            if enabled["acc_E_y"]:
                own = pl_module.predict_attributes(x)
                for a in self.attributes:
                    m[f"{a}/acc_E_y"].update(own[a], positive[a].long())
                    if enabled["bca"]:
                        m[f"{a}/bca"].update(own[a], positive[a].long())
            if enabled["acc_oracle"]:
                probs = self._oracle.predict_attributes(x)
                for a in self.attributes:
                    m[f"{a}/acc_oracle"].update(probs[a], positive[a].long())
            if not enabled["reconstruction"]:
                return
            x_hat = pl_module.reconstruct(x, pa)
            if enabled["leakage"]:
                code = self._code(pl_module, x, pa)
                for a in self.attributes:
                    m[f"{a}/leakage"].update(code, pa[a], batch["index"])
            edits = self._edits(pl_module, x, pa)
        truth = labels = None
        if enabled["true_cf"]:
            (attr,) = self.attributes
            truth = trainer.datamodule.true_counterfactual(batch["index"].cpu(), {attr: (1.0 - pa[attr]).cpu()})
            truth = truth.to(device=x.device, dtype=x.dtype)
        if enabled["preservation"]:
            judged = list(dict.fromkeys(p for a in self.attributes for p in self._preserved[a]))
            table = trainer.datamodule.attribute_labels(batch["index"].cpu(), judged).to(x.device)
            labels = {name: table[:, j] for j, name in enumerate(judged)}
        index = batch.get("index")
        self._observe(m, x, positive, x_hat, edits, truth, labels, index)
        if self._evaluates_references(stage):
            for name, reference in self._references.items():
                with evaluation_mode(reference):
                    outputs = reference.reconstruct(x, pa), self._edits(reference, x, pa)
                self._metrics[stage][name]["n_images"].update(torch.tensor(float(x.shape[0]), device=x.device))
                self._observe(self._metrics[stage][name], x, positive, *outputs, truth, labels, index)

    def _edits(self, subject: nn.Module, x: Tensor, pa: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """``{attr: (do(attr = 0), do(attr = 1))}``, each attribute's pair made from the RNG state of the first:
        the state in which a callback of that attribute alone made it."""
        restore = _rng_restorer(subject)
        edits = {}
        for a in self.attributes:
            restore()
            y = pa[a]
            edits[a] = (subject.counterfactual(x, pa, {a: torch.zeros_like(y)}),
                        subject.counterfactual(x, pa, {a: torch.ones_like(y)}))
        return edits

    def _observe(self, m: nn.ModuleDict, x: Tensor, positive: Mapping[str, Tensor], x_hat: Tensor,
                 edits: Mapping[str, tuple[Tensor, Tensor]], truth: Tensor | None,
                 labels: Mapping[str, Tensor] | None, index: Tensor | None) -> None:
        """Update one subject's metrics from its reconstructions and edits (the model's or a reference's)."""
        enabled = self._enabled
        m["mse"].update(x_hat, x)
        with torch.no_grad():
            recon = self._oracle.predict_attributes(x_hat) if enabled["edits"] else None
            if enabled["cfd"]:
                outputs_x = self._oracle(x)
            for a, (edit_0, edit_1) in edits.items():
                pos = positive[a]
                # do(attr = 1 - y) for every input (CDVAE-GAN Table 3): do(0) of the positives, do(1) of the rest
                flipped = torch.where(pos.view(-1, *([1] * (x.ndim - 1))), edit_0, edit_1)
                if enabled["edits"]:
                    probs_0, probs_1 = self._oracle_probs(edit_0, a), self._oracle_probs(edit_1, a)
                    m[f"{a}/C_pos_all"].update(probs_1)
                    m[f"{a}/C_neg_all"].update(probs_0)
                    m[f"{a}/C_pos_paper"].update(probs_1, mask=pos)
                    m[f"{a}/C_neg_paper"].update(probs_0, mask=pos)
                    m[f"{a}/flip_acc"].update(torch.where(pos, probs_0, probs_1), (~pos).float())
                    m[f"{a}/n_paper"].update(pos.sum().to(torch.float32))
                    m[f"{a}/acc_oracle_recon"].update(recon[a], pos.long())
                if enabled["sr"]:
                    # a swap 0 -> 1 is do(1) of an input without the attribute, 1 -> 0 do(0) of one with it
                    m[f"{a}/sr"].update(probs_1[~pos], probs_0[pos])
                if enabled["cfd"]:
                    if index is None:
                        raise KeyError("scores: cfd pairs images by their dataset row, but the batches carry no "
                                       "'index'; drop cfd from the callback's `scores`")
                    m[f"{a}/cfd"].update(index, pos, outputs_x, self._oracle(flipped))
                if truth is not None:
                    m[f"{a}/true_cf"].update(flipped, truth, x)
                    if enabled["edits"]:
                        m[f"{a}/acc_oracle_true_cf"].update(self._oracle_probs(truth, a), (~pos).long())
                if labels is not None:
                    with evaluating(self._preservation_oracle):
                        probs = self._preservation_oracle.predict_attributes(flipped)
                    for name in self._preserved[a]:
                        m[f"{a}/preservation/{name}"].update(probs[name], labels[name].long())

    @staticmethod
    def _code(pl_module: pl.LightningModule, x: Tensor, pa: Mapping[str, Tensor]) -> Tensor:
        code = pl_module.abduct(x, pa)
        if not isinstance(code, Tensor):
            raise TypeError(f"leakage_probe=True needs {type(pl_module).__name__}.abduct to return one tensor per "
                            f"image, got {type(code).__name__}; set the callback's leakage_probe to false")
        return code

    def _oracle_probs(self, x: Tensor, attribute: str) -> Tensor:
        return self._oracle.predict_attributes(x)[attribute]

    def _compute(self, m: nn.ModuleDict, stage: str, model: bool) -> dict[str, Tensor]:
        """One subject's values; every process computes the same metrics in the same order (a collective)."""
        enabled = self._enabled
        computed: dict[str, Tensor] = {f"{stage}/n_images": m["n_images"].compute()}
        if enabled["reconstruction"]:
            computed[f"{stage}/mse"] = m["mse"].compute()
        for attr in self.attributes:
            computed.update(self._compute_attribute(m, stage, model, attr))
        for metric in m.values():
            metric.reset()
        return computed

    def _compute_attribute(self, m: nn.ModuleDict, stage: str, model: bool, attr: str) -> dict[str, Tensor]:
        enabled, computed = self._enabled, {}
        if enabled["edits"]:
            for name in ("C_pos_paper", "C_neg_paper", "C_pos_all", "C_neg_all", "n_paper", "flip_acc"):
                computed[f"{stage}/edit/{attr}/{name}"] = m[f"{attr}/{name}"].compute()
        if enabled["sr"]:
            for name, value in m[f"{attr}/sr"].compute().items():
                computed[f"{stage}/edit/{attr}/{name}"] = value
        if enabled["cfd"]:
            computed[f"{stage}/edit/{attr}/cfd"] = m[f"{attr}/cfd"].compute()
        if enabled["acc_E_y"] and model:
            computed[f"{stage}/acc/E_y/{attr}"] = m[f"{attr}/acc_E_y"].compute()
        if enabled["bca"] and model:
            computed[f"{stage}/bca/E_y/{attr}"] = m[f"{attr}/bca"].compute()
        if enabled["acc_oracle"] and model:
            computed[f"{stage}/acc/oracle/{attr}"] = m[f"{attr}/acc_oracle"].compute()
        if enabled["edits"]:
            computed[f"{stage}/acc/oracle_on_recon/{attr}"] = m[f"{attr}/acc_oracle_recon"].compute()
            if enabled["true_cf"] and model:
                computed[f"{stage}/acc/oracle_on_true_cf/{attr}"] = m[f"{attr}/acc_oracle_true_cf"].compute()
        if enabled["true_cf"]:
            for name, value in m[f"{attr}/true_cf"].compute().items():
                computed[f"{stage}/true_cf/{name}"] = value
        if enabled["leakage"] and model:
            computed[f"{stage}/leakage/{attr}/probe_bacc"] = m[f"{attr}/leakage"].compute()
        if enabled["preservation"]:
            kept = {name: m[f"{attr}/preservation/{name}"].compute() for name in self._preserved[attr]}
            for name, value in kept.items():
                computed[f"{stage}/preservation/{attr}/{name}"] = value
            computed[f"{stage}/preservation/{attr}/mean"] = torch.stack([v.double() for v in kept.values()]).mean()
        return computed

    def _finish(self, stage: str, pl_module: pl.LightningModule) -> dict[str, float]:
        """Compute (synchronising processes), log, reset; returns the logged values."""
        values = self._log_values(self._compute(self._metrics[stage]["model"], stage, model=True), stage, pl_module)
        values.update(self._finish_references(stage, pl_module, lambda name: self._compute(
            self._metrics[stage][name], stage, model=False)))
        self.results[stage] = values
        return values


def _rng_restorer(module: nn.Module) -> Callable[[], None]:
    """A function that puts the CPU generator and ``module``'s CUDA generator back in their present state."""
    cpu, cuda = torch.get_rng_state(), _cuda_indices(module)
    states = {index: torch.cuda.get_rng_state(index) for index in cuda}

    def restore() -> None:
        torch.set_rng_state(cpu)
        for index, state in states.items():
            torch.cuda.set_rng_state(state, index)

    return restore


def _frozen_classifier(spec: str | os.PathLike | nn.Module | None, what: str) -> nn.Module | None:
    """A judge given as a module or as an ``AttributeClassifier`` checkpoint (loaded without touching the global
    RNG, see ``load_frozen``)."""
    if spec is None or isinstance(spec, nn.Module):
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint {str(path)!r} does not exist; train the attribute classifier "
                                f"it names (`make train EXP=<classifier experiment>`) or point `{what}` at its "
                                "checkpoint.")
    return load_frozen(path)
