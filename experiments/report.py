"""What a run's numbers mean: the model beside the reference counterfactuals, and the verdicts that follow.

The metric callbacks log every reference counterfactual (``lightning_modules.references``) under
``{stage}/reference/<name>/<key>`` beside the model's ``{stage}/<key>``. This module puts them side by side
(``metrics.md``: one row per metric, one column per subject) and states, for the metrics where a trivial
counterfactual sets the bar, whether the model clears it (``bar``: lower-is-better metrics must be below
``bar`` × the reference's value, higher-is-better ones above the reference's):

=========================================================  =========  =====  ==================================
metric                                                     reference  bar    because
=========================================================  =========  =====  ==================================
``true_cf/[do_<p>/]effect_mse``: error against the truth   identity   1      x* = x has not made the edit; a
where the intervention changes pixels                                        model no closer to the truth there
                                                                             has not made it either
``true_cf/[do_<p>/]preservation_mse``: error against x     mean       0.5    the mean image ignores x; a model
elsewhere                                                                    must explain at least half of the
                                                                             variance that it leaves unexplained
                                                                             there (a ratio of MSEs is 1 − R²)
``edit/<a>/flip_acc``: the oracle accepts the flip         identity   –
``preservation/<a>/mean``: other attributes kept, read by  mean       –
an independent oracle
``morpho_effectiveness/do_<p>/<p>``: measured MAE to the   identity   1
target
=========================================================  =========  =====  ==================================

A model that fails any of them is marked as failing in ``metrics.md`` and in ``metrics.json`` (``verdicts``),
whatever its other scores: a perfect edit success rate on a blurred average face is a failure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

__all__ = ["REFERENCE_LABELS", "Verdict", "markdown_report", "split_subjects", "summary_lines", "verdicts"]

#: column titles of the references, in the order tables show them
REFERENCE_LABELS = {"identity": "x* = x", "mean": "mean image", "retrieval": "nearest training image"}

# (pattern of the key after the stage, reference to beat, lower is better, what, bar)
_RULES: tuple[tuple[str, str, bool, str, float], ...] = (
    (r"true_cf/(do_[^/]+/)?effect_mse", "identity", True, "effect", 1.0),
    (r"true_cf/(do_[^/]+/)?preservation_mse", "mean", True, "preservation", 0.5),
    (r"edit/[^/]+/flip_acc", "identity", False, "edit success", 1.0),
    (r"preservation/[^/]+/mean", "mean", False, "attributes kept", 1.0),
    (r"morpho_effectiveness/do_(?P<p>[^/]+)/(?P=p)", "identity", True, "measured effect", 1.0),
)


@dataclass(frozen=True)
class Verdict:
    key: str            # the model's key, e.g. test/true_cf/effect_mse
    what: str           # effect | preservation | edit success | attributes kept | measured effect
    model: float
    reference: str      # the reference it must beat
    reference_value: float
    lower_is_better: bool
    bar: float = 1.0

    @property
    def passes(self) -> bool:
        if self.lower_is_better:
            return self.model < self.bar * self.reference_value
        return self.model > self.reference_value

    def line(self) -> str:
        label = REFERENCE_LABELS.get(self.reference, self.reference)
        scaled = f"{self.bar:g} × " if self.bar != 1.0 else ""
        outcome = f"below {scaled}" if self.lower_is_better else "above "
        verdict = "passes" if self.passes else "FAILS"
        return (f"{self.what}: {self.key} = {self.model:.4f}, {verdict}: must be {outcome}{label} "
                f"({self.reference_value:.4f})")

    def as_dict(self) -> dict:
        return {**asdict(self), "passes": self.passes}


def split_subjects(metrics: Mapping[str, float | None]) -> tuple[dict[str, float | None], dict[str, dict]]:
    """(the model's metrics, {reference name: its metrics under the model's key names})."""
    model: dict[str, float | None] = {}
    references: dict[str, dict[str, float | None]] = {}
    for key, value in metrics.items():
        match = re.fullmatch(r"([^/]+)/reference/([^/]+)/(.+)", key)
        if match:
            stage, name, rest = match.groups()
            references.setdefault(name, {})[f"{stage}/{rest}"] = value
        else:
            model[key] = value
    return model, references


def verdicts(metrics: Mapping[str, float | None]) -> list[Verdict]:
    """Every rule of the module docstring that this run's metrics can answer."""
    model, references = split_subjects(metrics)
    out = []
    for key, value in sorted(model.items()):
        rest = key.split("/", 1)[-1]
        for pattern, reference, lower, what, bar in _RULES:
            if not re.fullmatch(pattern, rest):
                continue
            theirs = references.get(reference, {}).get(key)
            if value is not None and theirs is not None:
                out.append(Verdict(key, what, value, reference, theirs, lower, bar))
    # Two callbacks may report the same quantity (the editing metrics' true_cf/effect_mse and the counterfactual
    # metrics' true_cf/do_<attr>/effect_mse of the same flip): one verdict is enough.
    seen, unique = set(), []
    for v in out:
        if (v.what, v.model, v.reference_value) not in seen:
            seen.add((v.what, v.model, v.reference_value))
            unique.append(v)
    return unique


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def markdown_report(metrics: Mapping[str, float | None]) -> str:
    """The verdicts, then one table: a row per metric, the model and each reference in columns."""
    model, references = split_subjects(metrics)
    names = [n for n in REFERENCE_LABELS if n in references] + sorted(set(references) - set(REFERENCE_LABELS))
    lines = []
    judged = verdicts(metrics)
    if judged:
        failed = [v for v in judged if not v.passes]
        lines.append("**Verdict: the model " + ("FAILS " + ", ".join(sorted({v.what for v in failed}))
                                                 if failed else "beats the reference counterfactuals") + ".**")
        lines.append("")
        lines += [f"- {'✗' if not v.passes else '✓'} {v.line()}" for v in judged]
        lines.append("")
    failing = {v.key for v in judged if not v.passes}
    header = ["metric", "model", *(REFERENCE_LABELS.get(n, n) for n in names)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(model):
        mark = " ✗" if key in failing else ""
        cells = [f"{key}{mark}", _fmt(model[key]), *(_fmt(references[n].get(key)) for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(metrics: Mapping[str, float | None]) -> list[str]:
    """A few readable lines: edit success, then effect and preservation beside the two references."""
    model, references = split_subjects(metrics)
    identity, mean = references.get("identity", {}), references.get("mean", {})
    lines = []
    for key in sorted(model):
        rest = key.split("/", 1)[-1]
        if re.fullmatch(r"edit/[^/]+/C_(pos|neg)_paper", rest):
            lines.append(f"  {rest:<34} {_fmt(model[key])}   (x* = x: {_fmt(identity.get(key))})")
    shown = set()
    for key in sorted(model):
        rest = key.split("/", 1)[-1]
        kind = rest.rsplit("/", 1)[-1]
        # the editing and the counterfactual callbacks may report the same flip: one line each
        if re.fullmatch(r"true_cf/(do_[^/]+/)?(effect|preservation)_mse", rest) and (kind, model[key]) not in shown:
            shown.add((kind, model[key]))
            lines.append(f"  {rest:<34} {_fmt(model[key])}   (x* = x: {_fmt(identity.get(key))}, "
                         f"mean image: {_fmt(mean.get(key))})")
    for v in verdicts(metrics):
        lines.append(f"  {'ok  ' if v.passes else 'FAIL'} {v.line()}")
    return lines
