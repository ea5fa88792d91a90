"""The chest phantom's generative factors: who its patients are, their studies and views, and their reports.

Population (``PhantomPopulation``): patients with Sex, Age (~N(60, 17) years, 18-90) and body size; 1-6
studies each (valid.csv: one study per patient, as in the release), a frontal view per study and a lateral one
with probability ``lateral``. Cardiomegaly is a property of the patient (chronic, likelier with age: odds x1.5
per decade); consolidation and atelectasis are drawn per study. Reports, like CheXpert's labeller, give one
row of labels per study: a present finding is 1.0, or -1.0 (uncertain) with probability
``uncertain_<finding>``; an absent one is -1.0 with probability ``uncertain_if_absent``, 0.0 when the report
mentions it (``negative_mentioned``), else blank. ``No Finding`` is 1.0 when no modelled finding is positive or
uncertain, else blank; the eleven unmodelled observations stay blank. valid.csv is labelled like the
release's radiologist consensus: every cell 1.0 or 0.0, no uncertain or blank cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from datamodules.chexpert_format import OBSERVATIONS, RELEASE_DIR
from datamodules.synthetic.common import check_probabilities, options_from

MODELLED_FINDINGS: tuple[str, ...] = ("Cardiomegaly", "Consolidation", "Atelectasis")
CTR_NORMAL = (0.40, 0.50)
CTR_ENLARGED = (0.52, 0.65)


@dataclass(frozen=True)
class PhantomPopulation:
    """Who the phantom's patients are and how their reports read (defaults near CheXpert's frontal images).

    Prevalences are per image: ``cardiomegaly`` (at age 60; odds x ``cardiomegaly_odds_per_decade`` per decade),
    ``consolidation``, ``atelectasis``. ``female`` P(Female); ``lateral`` P(a study has a lateral view too);
    ``mean_studies`` mean studies per train patient; ``ap`` P(an AP rather than PA frontal view).
    Report noise: ``uncertain_<finding>`` P(-1.0 | present); ``uncertain_if_absent`` P(-1.0 | absent);
    ``negative_mentioned`` P(0.0 rather than blank | absent, certain).
    """

    cardiomegaly: float = 0.15
    consolidation: float = 0.08
    atelectasis: float = 0.15
    cardiomegaly_odds_per_decade: float = 1.5
    female: float = 0.41
    lateral: float = 0.15
    mean_studies: float = 2.0
    ap: float = 0.7
    uncertain_cardiomegaly: float = 0.15
    uncertain_consolidation: float = 0.3
    uncertain_atelectasis: float = 0.3
    uncertain_if_absent: float = 0.02
    negative_mentioned: float = 0.35

    def __post_init__(self) -> None:
        rates = ("cardiomegaly_odds_per_decade", "mean_studies")
        for name in rates:
            p = getattr(self, name)
            if not p > 0 or (name == "mean_studies" and p < 1):
                raise ValueError(f"{name} must be positive (mean_studies >= 1), got {p}")
        check_probabilities({k: p for k, p in asdict(self).items() if k not in rates}, "population")


def as_population(population: Mapping[str, float] | PhantomPopulation | None) -> PhantomPopulation:
    return options_from(PhantomPopulation, population, "population")


def cardiothoracic_ratio(cardiomegaly: Any, ctr_u: Any) -> np.ndarray:
    """CTR of the phantom's heart: ``ctr_u`` (in [0, 1]) mapped into the normal or the enlarged range."""
    lo = np.where(np.asarray(cardiomegaly) > 0, CTR_ENLARGED[0], CTR_NORMAL[0])
    hi = np.where(np.asarray(cardiomegaly) > 0, CTR_ENLARGED[1], CTR_NORMAL[1])
    return lo + (hi - lo) * np.asarray(ctr_u, np.float64)


def sample_phantom(n_train_patients: int, n_valid_patients: int, seed: int = 0,
                   population: Mapping[str, float] | PhantomPopulation | None = None
                   ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """(factors, CSV rows): one factor row and one CSV row per image, train.csv's rows then valid.csv's.

    ``factors`` holds arrays with a leading N (findings, ``Sex`` (1 = Female) and the view as int8; ``Age`` in
    years; ``source`` 0 for train.csv, 1 for valid.csv; anatomy and acquisition factors float32; seeds int64).
    """
    pop = as_population(population)
    rng = np.random.default_rng(seed)
    n_pat = int(n_train_patients) + int(n_valid_patients)
    u = lambda n=n_pat: rng.random(n)  # noqa: E731

    def between(lo: float, hi: float, n: int = n_pat) -> np.ndarray:
        return lo + (hi - lo) * rng.random(n)

    female = u() < pop.female
    age0 = np.clip(rng.normal(60, 17, n_pat), 18, 90)
    base = np.log(pop.cardiomegaly / (1 - pop.cardiomegaly)) if 0 < pop.cardiomegaly < 1 else None
    if base is None:
        p_cardio = np.full(n_pat, pop.cardiomegaly)
    else:
        logit = base + np.log(pop.cardiomegaly_odds_per_decade) * (age0 - 60) / 10
        p_cardio = 1 / (1 + np.exp(-logit))
    patient = {
        "Sex": female.astype(np.int8), "Cardiomegaly": (u() < p_cardio).astype(np.int8),
        "size_z": np.clip(rng.normal(0, 1, n_pat), -2.5, 2.5), "apex_y": between(0.13, 0.17),
        "dome_y": between(0.62, 0.68), "right_raise": between(0.01, 0.035), "dome_h": between(0.05, 0.08),
        "ctr_u": u(), "heart_right": between(0.28, 0.36), "heart_aspect": between(0.72, 0.86),
        "heart_tilt": between(25.0, 40.0), "heart_lift": between(0.05, 0.075),
        "med_r": between(0.05, 0.065), "med_l": between(0.055, 0.07), "knob_r": between(0.022, 0.034),
        "rib_spacing": between(0.96, 1.04), "rib_phase": between(-0.008, 0.008),
        "clav_dy": between(-0.02, 0.02), "clav_tilt": between(0.02, 0.06), "breast": between(0.75, 1.25),
        "bubble": (u() < 0.7).astype(np.int8),
    }
    studies = np.minimum(rng.geometric(1.0 / pop.mean_studies, n_pat), 6)
    studies[n_train_patients:] = 1
    pat_of_study = np.repeat(np.arange(n_pat), studies)
    n_st = len(pat_of_study)
    first = np.r_[0, np.cumsum(studies)[:-1]]
    study_no = np.arange(n_st) - np.repeat(first, studies)  # 0-based within the patient
    gaps = np.where(study_no > 0, between(0.0, 1.5, n_st), 0.0)
    age = age0[pat_of_study] + np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first], studies)
    study = {
        "Age": np.floor(np.minimum(age, 90.0)), "inspiration": rng.normal(0, 0.012, n_st),
        "Consolidation": (between(0, 1, n_st) < pop.consolidation).astype(np.int8),
        "Atelectasis": (between(0, 1, n_st) < pop.atelectasis).astype(np.int8),
        "cons_side": (between(0, 1, n_st) < 0.5).astype(np.int8),
        "cons_zone": rng.choice(3, n_st, p=(0.2, 0.3, 0.5)).astype(np.int8),
        "cons_u": between(0, 1, n_st), "cons_v": between(0, 1, n_st), "cons_size": between(0.045, 0.075, n_st),
        "cons_density": between(0.7, 1.0, n_st), "cons_seed": rng.integers(0, 2**31 - 1, n_st),
        "atel_side": (between(0, 1, n_st) < 0.5).astype(np.int8), "atel_raise": between(0.035, 0.07, n_st),
        "atel_pos": between(0, 1, n_st), "atel_height": between(0.03, 0.06, n_st),
        "atel_len": between(0.07, 0.13, n_st), "atel_angle": between(-12, 12, n_st),
        "atel_thick": between(0.008, 0.014, n_st),
    }
    lateral = (between(0, 1, n_st) < pop.lateral) & (pat_of_study < n_train_patients)
    views = 1 + lateral.astype(np.int64)
    study_of_row = np.repeat(np.arange(n_st), views)
    n = len(study_of_row)
    view_no = np.arange(n) - np.repeat(np.r_[0, np.cumsum(views)[:-1]], views)  # 0 frontal, 1 lateral
    ap = between(0, 1, n) < pop.ap
    factors: dict[str, np.ndarray] = {k: v[pat_of_study[study_of_row]] for k, v in patient.items()}
    factors.update({k: v[study_of_row] for k, v in study.items()})
    factors.update({
        "frontal": (view_no == 0).astype(np.int8), "ap": (ap & (view_no == 0)).astype(np.int8),
        "shift_x": rng.normal(0, 0.012, n), "shift_y": rng.normal(0, 0.012, n),
        "rot": np.clip(rng.normal(0, 1.5, n), -4, 4), "scale": between(0.97, 1.03, n) * np.where(ap, 1.05, 1.0),
        "exposure": between(1.5, 2.0, n), "gamma": between(1.2, 1.6, n),
        "noise_seed": rng.integers(0, 2**31 - 1, n),
        "source": (pat_of_study[study_of_row] >= n_train_patients).astype(np.int8),
        "patient": pat_of_study[study_of_row] + 1, "study": study_no[study_of_row] + 1,
    })
    factors = {k: np.asarray(v, np.float32) if np.asarray(v).dtype == np.float64 else np.asarray(v)
               for k, v in factors.items()}
    factors["Age"] = factors["Age"].astype(np.float32)

    # Reports: one row of labels per study, sampled from their own stream so that anatomy stays put when the
    # report model changes.
    rep = np.random.default_rng([seed, 1])
    report: dict[str, np.ndarray] = {}
    is_valid = pat_of_study >= n_train_patients
    for name in MODELLED_FINDINGS:
        present = patient[name][pat_of_study] if name == "Cardiomegaly" else study[name]
        unc = np.where(present > 0, getattr(pop, f"uncertain_{name.lower()}"), pop.uncertain_if_absent)
        uncertain = rep.random(n_st) < unc
        mentioned = rep.random(n_st) < pop.negative_mentioned
        cell = np.where(present > 0, 1.0, np.where(mentioned, 0.0, np.nan))
        cell = np.where(uncertain, -1.0, cell)
        report[name] = np.where(is_valid, present.astype(float), cell)
    any_mention = np.zeros(n_st, bool)
    for name in MODELLED_FINDINGS:
        any_mention |= (report[name] == 1.0) | (report[name] == -1.0)
    report["No Finding"] = np.where(any_mention, np.where(is_valid, 0.0, np.nan), 1.0)

    rows: list[dict[str, Any]] = []
    for r in range(n):
        st = study_of_row[r]
        folder = "valid" if factors["source"][r] else "train"
        view = "view1_frontal" if view_no[r] == 0 else "view2_lateral"
        row: dict[str, Any] = {
            "Path": f"{RELEASE_DIR}/{folder}/patient{int(factors['patient'][r]):05d}/study{int(factors['study'][r])}/"
                    f"{view}.jpg",
            "Sex": "Female" if factors["Sex"][r] else "Male", "Age": int(factors["Age"][r]),
            "Frontal/Lateral": "Frontal" if view_no[r] == 0 else "Lateral",
            "AP/PA": ("AP" if ap[r] else "PA") if view_no[r] == 0 else "",
        }
        for name in OBSERVATIONS:
            row[name] = report[name][st] if name in report else (0.0 if is_valid[st] else None)
        rows.append(row)
    return factors, rows


def factor_row(factors: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    """Row ``i`` of a table of factors as Python scalars, what ``render`` draws."""
    return {k: np.asarray(v)[i].item() for k, v in factors.items()}
