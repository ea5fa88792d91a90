"""The benchmark's MorphoMNIST tables from runs: ``python -m experiments.tables LABEL=RUN_DIR ... [--seeds]``.

Reads each run's ``metrics.json`` (a training run's test metrics or a ``make eval`` directory, whose
``std`` over evaluation seeds is shown when present) and prints markdown equivalents of
counterfactual_benchmark Tables 1 (composition), 3 (effectiveness) and 5 (realism and minimality), each with
the paper's values for the model of the same label beside ours, and the error against the true counterfactuals
when the data were built by this project. Labels are the paper's row names
(``"VAE (fixed σ)"``, ``"VAE (learned σ)"``, ``"HVAE"``, ``"GAN"``, ``"GAN fine-tuned"``); another label is shown
without paper values.

``python -m experiments.tables --cdvae LABEL=RUN_DIR ...`` prints CDVAE-GAN's Tables 2 (FID of the
counterfactuals) and 3 (the oracle's accuracy on the flipped attribute, beside its accuracy on real test
images) for runs evaluated with ``configs/callbacks/cdvae.yaml``, and their true-counterfactual errors; labels
``"VAE"``, ``"VAE-GAN"`` and ``"CDVAE-GAN"`` get the paper's values.

Every table ends with the reference counterfactuals evaluated under the same protocol (``x* = x``, the mean
training image, the nearest training image with the target parents; ``lightning_modules.references``), read from
the runs' ``test/reference/<name>/...`` values, so that a reader sees what a counterfactual that ignores its
task scores. They come from the first run that has them; a run whose references differ (another protocol, e.g.
other judges or another SCM) is named in a warning. Models that fail a verdict (``experiments.report``) are
listed after the tables.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from experiments.report import REFERENCE_LABELS, split_subjects, verdicts

# counterfactual_benchmark Tables 1, 3 and 5 (MorphoMNIST), means only.
PAPER_COMPOSITION = {  # l1 image 1 / 10 cycles, l1 embeddings 1 / 10 cycles
    "VAE (fixed σ)": (4.244, 9.855, 0.095, 0.158),
    "VAE (learned σ)": (2.600, 7.698, 0.064, 0.135),
    "HVAE": (0.438, 1.550, 0.009, 0.038),
    "GAN": (16.779, 16.780, 0.193, 0.193),
    "GAN fine-tuned": (3.807, 11.697, 0.089, 0.272),
}
PAPER_EFFECTIVENESS = {  # thickness MAE do(t), do(i), do(y); intensity MAE ...; digit accuracy ...
    "VAE (fixed σ)": (0.125, 0.346, 0.138, 9.382, 20.642, 11.279, 0.988, 0.989, 0.933),
    "VAE (learned σ)": (0.109, 0.333, 0.139, 3.149, 5.326, 4.64, 0.989, 0.988, 0.775),
    "HVAE": (0.086, 0.224, 0.117, 1.991, 3.517, 2.098, 0.985, 0.935, 0.972),
    "GAN": (0.227, 0.631, 0.214, 6.680, 9.795, 6.632, 0.810, 0.811, 0.813),
    "GAN fine-tuned": (0.228, 0.680, 0.393, 9.436, 15.137, 12.388, 0.961, 0.966, 0.451),
}
PAPER_REALISM = {  # FID, CLD, P(S_x* <= div), P(S_x >= div)
    "VAE (fixed σ)": (17.096, 0.276, 0.065, 0.843),
    "VAE (learned σ)": (10.124, 0.268, 0.055, 0.839),
    "HVAE": (5.362, 0.272, 0.112, 0.736),
    "GAN": (72.766, 0.390, 0.339, 0.570),
    "GAN fine-tuned": (35.568, 0.286, 0.119, 0.764),
}
PARENTS = ("thickness", "intensity", "digit")

# cdvae_gan Tables 2 and 3 (CelebA 64x64, Inception FID; accuracy of the flipped attribute, %).
CDVAE_ATTRIBUTES = ("Bangs", "Black_Hair", "Blond_Hair", "Male", "Mustache", "Mouth_Slightly_Open", "Smiling")
PAPER_CDVAE_FID = {"VAE": 122.86, "VAE-GAN": 48.46, "CDVAE-GAN": 34.24}
PAPER_CDVAE_ORACLE = {  # the classifier on real images: train, test
    "Bangs": (92.9, 87.2), "Black_Hair": (79.5, 78.9), "Blond_Hair": (85.9, 85.1), "Male": (88.3, 87.5),
    "Mustache": (90.4, 86.0), "Mouth_Slightly_Open": (77.9, 76.0), "Smiling": (89.9, 88.4),
}
PAPER_CDVAE_ACCURACY = {
    "VAE": (52.4, 52.4, 60.1, 52.2, 81.9, 55.8, 72.9),
    "VAE-GAN": (66.6, 68.2, 62.4, 51.3, 81.3, 70.3, 75.0),
    "CDVAE-GAN": (73.79, 70.03, 71.37, 72.37, 83.08, 75.47, 81.62),
}


def _fmt(value: float | None, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return text if std is None else f"{text} ± {std:.3f}"


def load(run_dir: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, std over evaluation seeds or {}) of a run directory."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: train the run or `make eval` it first")
    payload = json.loads(path.read_text())
    return payload["metrics"], payload.get("std") or {}


def _cell(metrics, std, key: str) -> str:
    return _fmt(metrics.get(key), std.get(key))


def _paper(table: dict, label: str, i: int) -> str:
    return _fmt(table[label][i]) if label in table else "–"


def composition_table(runs: dict[str, tuple[dict, dict]]) -> str:
    rows = ["| model | L1 image, 1 cycle | 10 cycles | L1 embeddings, 1 cycle | 10 cycles |", "|---|---|---|---|---|"]
    for label, (m, s) in runs.items():
        ours = [_cell(m, s, f"test/composition/{d}/{k}") for d in ("l1", "embedding") for k in (1, 10)]
        paper = [_paper(PAPER_COMPOSITION, label, i) for i in range(4)]
        rows.append(f"| {label} | " + " | ".join(f"{o} ({p})" for o, p in zip(ours, paper, strict=True)) + " |")
    return "\n".join(rows)


def effectiveness_table(runs: dict[str, tuple[dict, dict]], source: str = "effectiveness") -> str:
    """``source``: ``effectiveness`` (the anti-causal predictors) or ``morpho_effectiveness`` (measured)."""
    measured = PARENTS if source == "effectiveness" else PARENTS[:2]
    head = " | ".join(f"{q} do({p[0]})" for q in measured for p in PARENTS)
    rows = [f"| model | {head} |", "|---|" + "---|" * (len(measured) * 3)]
    for label, (m, s) in runs.items():
        cells = []
        for qi, q in enumerate(measured):
            for pi, p in enumerate(PARENTS):
                ours = _cell(m, s, f"test/{source}/do_{p}/{q}")
                if source == "effectiveness":
                    cells.append(f"{ours} ({_paper(PAPER_EFFECTIVENESS, label, 3 * qi + pi)})")
                else:  # beside it, the factual image (x* = x) measured against the same targets
                    unchanged = m.get(f"test/reference/identity/{source}/do_{p}/{q}",
                                      m.get(f"test/{source}_unchanged/do_{p}/{q}"))
                    cells.append(f"{ours} ({_fmt(unchanged)})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def realism_table(runs: dict[str, tuple[dict, dict]]) -> str:
    rows = ["| model | FID (domain features) | CLD | P(S_x* ≤ div) | P(S_x ≥ div) |", "|---|---|---|---|---|"]
    keys = ("test/fid_domain", "test/cld", "test/cld_p_sx_star_le_div", "test/cld_p_sx_ge_div")
    for label, (m, s) in runs.items():
        cells = [f"{_cell(m, s, k)} ({_paper(PAPER_REALISM, label, i)})" for i, k in enumerate(keys)]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def truth_table(runs: dict[str, tuple[dict, dict]]) -> str:
    """The error against the TRUE counterfactuals (data built by this project): pixel MSE in [0, 1] over the
    whole image, over the pixels the intervention changes (effect, against the truth) and over the others
    (preservation, against x), and the whole-image L1."""
    kinds = ("mse", "effect_mse", "preservation_mse")
    head = " | ".join(f"{k.replace('_mse', '').replace('mse', 'MSE')} do({p[0]})" for k in kinds for p in PARENTS[:2])
    rows = [f"| model | {head} | L1 do(t) | L1 do(i) |", "|---|" + "---|" * (2 * len(kinds) + 2)]
    for label, (m, s) in runs.items():
        cells = [_cell(m, s, f"test/true_cf/do_{p}/{k}") for k in (*kinds, "l1") for p in PARENTS[:2]]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def cdvae_fid_table(runs: dict[str, tuple[dict, dict]]) -> str:
    """Table 2: FID between the flipped images (one of the seven attributes per test image) and real images,
    in whichever feature space the run measured (``fid_inception`` as published, or ``fid_domain``)."""
    rows = ["| model | FID of counterfactuals | features |", "|---|---|---|"]
    for label, (m, s) in runs.items():
        key = next((k for k in ("test/fid_inception", "test/fid_domain") if k in m), None)
        paper = PAPER_CDVAE_FID.get(label)
        cell = _cell(m, s, key) if key else "–"
        where = key.split("_", 1)[1] if key else "–"
        rows.append(f"| {label} | {cell} ({'–' if paper is None else f'{paper:.2f}'}) | {where} |")
    return "\n".join(rows)


def cdvae_accuracy_table(runs: dict[str, tuple[dict, dict]]) -> str:
    """Table 3: the oracle's accuracy on do(a = 1 - a) over all test images (``edit/<a>/flip_acc``) per model,
    after the oracle's own accuracy on the real test images (from the first run; every run should share it)."""
    labels = list(runs)
    head = " | ".join(labels)
    rows = [f"| attribute | oracle on real test images | {head} |", "|---|---|" + "---|" * len(labels)]
    first = next(iter(runs.values()), ({}, {}))[0]
    for i, a in enumerate(CDVAE_ATTRIBUTES):
        paper_test = PAPER_CDVAE_ORACLE[a][1]
        cells = []
        for label, (m, _) in runs.items():
            paper = PAPER_CDVAE_ACCURACY.get(label)
            cells.append(f"{_percent(m.get(f'test/edit/{a}/flip_acc'))} ({'–' if paper is None else f'{paper[i]}%'})")
        rows.append(f"| {a} | {_percent(first.get(f'test/acc/oracle/{a}'))} ({paper_test}%) | " + " | ".join(cells)
                    + " |")
    return "\n".join(rows)


def cdvae_truth_table(runs: dict[str, tuple[dict, dict]], kind: str = "mse") -> str:
    """Pixel MSE of each flip against the rendered true counterfactual (synthetic faces only); ``kind``
    ``effect_mse`` / ``preservation_mse`` restricts it to the pixels the flip changes / leaves alone."""
    rows = ["| model | " + " | ".join(CDVAE_ATTRIBUTES) + " |", "|---|" + "---|" * len(CDVAE_ATTRIBUTES)]
    for label, (m, s) in runs.items():
        rows.append(f"| {label} | " + " | ".join(_cell(m, s, f"test/true_cf/do_{a}/{kind}") for a in CDVAE_ATTRIBUTES)
                    + " |")
    return "\n".join(rows)


def with_references(runs: dict[str, tuple[dict, dict]]) -> dict[str, tuple[dict, dict]]:
    """``runs`` followed by one row per reference counterfactual (from the first run that has them)."""
    found: dict[str, dict] = {}
    for label, (m, _) in runs.items():
        _, references = split_subjects(m)
        for name, values in references.items():
            if name not in found:
                found[name] = values
                continue
            differ = [k for k, v in values.items() if k in found[name] and v is not None
                      and found[name][k] is not None and not math.isclose(v, found[name][k], rel_tol=1e-4,
                                                                           abs_tol=1e-6)]
            if differ:
                print(f"warning: {label}'s reference {name!r} differs from the first run's on {len(differ)} metrics "
                      f"(e.g. {differ[0]}): its protocol is not the same", file=sys.stderr)
    out = dict(runs)
    for name in [n for n in REFERENCE_LABELS if n in found] + sorted(set(found) - set(REFERENCE_LABELS)):
        metrics = dict(found[name])
        # the morphometric table shows the identity's value in brackets in every row, these included
        metrics.update({k.replace("morpho_effectiveness", "morpho_effectiveness_unchanged"): v
                        for k, v in found.get("identity", {}).items() if "morpho_effectiveness" in k})
        label = REFERENCE_LABELS.get(name, name).replace("*", "\\*")  # x* = x, escaped for markdown
        out[f"*{label}* (reference)"] = (metrics, {})
    return out


def failures(runs: dict[str, tuple[dict, dict]]) -> list[str]:
    """One line per failed verdict of each run (``experiments.report``)."""
    return [f"- {label}: {v.line()}" for label, (m, _) in runs.items() for v in verdicts(m) if not v.passes]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cdvae = bool(argv) and argv[0] == "--cdvae"
    argv = argv[1:] if cdvae else argv
    if not argv or any("=" not in a for a in argv):
        print(__doc__)
        return 2
    try:
        # a label may hold "=" (e.g. "HVAE (t_r=0)"), a run directory does not
        models = {label: load(path) for label, path in (a.rsplit("=", 1) for a in argv)}
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = with_references(models)
    failed = failures(models)
    if cdvae:
        print("FID of the counterfactuals (Table 2): ours (paper, Inception features on CelebA)\n\n"
              + cdvae_fid_table(runs))
        print("\nAccuracy of the flipped attribute by the independent classifier (Table 3): ours (paper)\n\n"
              + cdvae_accuracy_table(runs))
        print("\nPixel MSE against the true counterfactuals (synthetic faces only; not in the paper)\n\n"
              + cdvae_truth_table(runs))
        print("\nEffect: the same on the pixels each flip changes\n\n" + cdvae_truth_table(runs, "effect_mse"))
        print("\nPreservation: the error against x on the other pixels\n\n"
              + cdvae_truth_table(runs, "preservation_mse"))
        _print_failures(failed)
        return 0
    print("Composition (Table 1): ours (paper)\n\n" + composition_table(runs))
    print("\nEffectiveness by the anti-causal predictors (Table 3): ours (paper)\n\n" + effectiveness_table(runs))
    print("\nEffectiveness measured by morphometrics on x* (what x* = x scores in brackets: a model moves a parent "
          "toward its target where its value is below)\n\n" + effectiveness_table(runs, "morpho_effectiveness"))
    print("\nRealism and minimality (Table 5): ours (paper)\n\n" + realism_table(runs))
    print("\nError against the true counterfactuals (synthetic data only; not in the paper)\n\n" + truth_table(runs))
    _print_failures(failed)
    return 0


def _print_failures(failed: list[str]) -> None:
    print("\nVerdicts against the reference counterfactuals: "
          + ("every model passes." if not failed else "these fail.\n\n" + "\n".join(failed)))


if __name__ == "__main__":
    sys.exit(main())
