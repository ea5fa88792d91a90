"""Embedded chest-radiograph phantom: a deterministic renderer that writes CheXpert-v1.0-small's layout.

CheXpert needs registration, so ``data=chest_phantom`` uses these images instead: the builder writes
``train.csv``, ``valid.csv`` (``Path`` values start with ``CheXpert-v1.0-small/``, as in the release) and
``train/patientNNNNN/studyN/view1_frontal.jpg`` (+ ``view2_lateral.jpg``), read back by the very code that reads
CheXpert (``datamodules.chexpert_format``), plus ``factors.npz``: every generative factor of every image, from which
the TRUE counterfactual of any image can be re-rendered.

Population (``PhantomPopulation``): patients with Sex, Age (~N(60, 17) years, 18-90) and body size; 1-6
studies each (valid.csv: one study per patient, as in the release), a frontal view per study and a lateral one
with probability ``lateral``. Cardiomegaly is a property of the patient (chronic, likelier with age: odds x1.5
per decade); consolidation and atelectasis are drawn per study. Reports, like CheXpert's labeller, give one
row of labels per study: a present finding is 1.0, or -1.0 (uncertain) with probability
``uncertain_<finding>``; an absent one is -1.0 with probability ``uncertain_if_absent``, 0.0 when the report
mentions it (``negative_mentioned``), else blank. ``No Finding`` is 1.0 when no modelled finding is positive or
uncertain, else blank; the eleven unmodelled observations stay blank. valid.csv is labelled like the
release's radiologist consensus: every cell 1.0 or 0.0, no uncertain or blank cells.

Anatomy (PA projection, the patient's right on the image left; analytic shapes in patient coordinates, image
fractions): body outline with neck and shoulders, two lungs (lateral margins follow the rib cage, medial ones
the mediastinum, lower ones the hemidiaphragm domes, the right dome higher), heart, upper mediastinum with
aortic knob and trachea, spine with vertebral bodies, posterior and anterior ribs, clavicles (optional),
breast shadows (female), a gastric bubble. Patient-to-patient variation: thorax size (by sex), apex and
diaphragm levels, heart shape, mediastinal width; per image: position, small rotation, magnification (AP
views x1.05), inspiration depth, exposure, contrast and noise. An image is ``1 - exp(-exposure * A)`` raised
to ``gamma``, where ``A`` adds soft tissue and bone and subtracts lung air.

Findings, each a physical change of that picture:

* Cardiomegaly: the cardiothoracic ratio CTR = (widest heart diameter) / (widest inner thorax diameter) is
  ``0.40 + 0.10 u`` for a normal heart and ``0.52 + 0.13 u`` for an enlarged one, with the patient's quantile
  ``u`` (``ctr_u``) kept under intervention; the heart grows about its base on the diaphragm.
* Consolidation: a patchy dense opacity (eight overlapping blobs) that replaces the air of one lung zone
  (right/left x upper/middle/lower), confined to that lung.
* Atelectasis: volume loss (the hemidiaphragm of one side raised by 3.5-7% of the image, so that lung is
  smaller) with a plate-like linear opacity a few centimetres above it.
* Sex changes thorax size and adds breast shadows; Age lowers bone density and widens the aortic knob.

Every shape has a compact soft edge (a smoothstep 1.5 pixels wide), every later stage is pixel-wise, and the
noise comes from the row's ``noise_seed`` alone; so toggling a finding changes only pixels inside
``finding_box`` and identical factors give identical pixels. Interventions set only what they name (no
propagation from Age to Cardiomegaly: the age effect lives in the sampling).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from datamodules.base import DatasetError
from datamodules.chexpert_format import OBSERVATIONS, RELEASE_DIR, TRAIN_CSV, VALID_CSV, write_chexpert_csv
from datamodules.synthetic.common import (
    check_probabilities,
    intervention_values,
    options_from,
    read_factors_npz,
    read_manifest,
    row_indices,
    save_grid,
)

# Part of the cache key with the builder's parameters: bump it whenever the renderer draws anything differently.
FORMAT_VERSION = 1
FACTORS_FILE = "factors.npz"
MANIFEST_FILE = "builder.json"
MODELLED_FINDINGS: tuple[str, ...] = ("Cardiomegaly", "Consolidation", "Atelectasis")
INTERVENABLE: tuple[str, ...] = (*MODELLED_FINDINGS, "Sex", "Age")
CTR_NORMAL = (0.40, 0.50)
CTR_ENLARGED = (0.52, 0.65)
_TRIANGULAR_STD = float(np.sqrt((256**2 - 1) / 6))  # std of the sum of two independent uniform bytes
_EDGE_PX = 1.5  # half-width of every soft edge, in output pixels


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


def _as_population(population: Mapping[str, float] | PhantomPopulation | None) -> PhantomPopulation:
    return options_from(PhantomPopulation, population, "population")


def cardiothoracic_ratio(cardiomegaly: Any, ctr_u: Any) -> np.ndarray:
    """CTR of the phantom's heart: ``ctr_u`` (in [0, 1]) mapped into the normal or the enlarged range."""
    lo = np.where(np.asarray(cardiomegaly) > 0, CTR_ENLARGED[0], CTR_NORMAL[0])
    hi = np.where(np.asarray(cardiomegaly) > 0, CTR_ENLARGED[1], CTR_NORMAL[1])
    return lo + (hi - lo) * np.asarray(ctr_u, np.float64)


# -------------------------------------------------------------------------------------------- sampling


def sample_phantom(n_train_patients: int, n_valid_patients: int, seed: int = 0,
                   population: Mapping[str, float] | PhantomPopulation | None = None
                   ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """(factors, CSV rows): one factor row and one CSV row per image, train.csv's rows then valid.csv's.

    ``factors`` holds arrays with a leading N (findings, ``Sex`` (1 = Female) and the view as int8; ``Age`` in
    years; ``source`` 0 for train.csv, 1 for valid.csv; anatomy and acquisition factors float32; seeds int64).
    """
    pop = _as_population(population)
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


# -------------------------------------------------------------------------------------------- geometry


def _ramp(d: np.ndarray, w: float) -> np.ndarray:
    """0 for d <= -w, 1 for d >= w, a smoothstep between: a soft edge with compact support."""
    t = d * np.float32(0.5 / w)
    t += np.float32(0.5)
    np.clip(t, 0.0, 1.0, out=t)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _bump(z2: np.ndarray) -> np.ndarray:
    """(1 - z^2)^2 inside the unit disc (``z2`` is the squared radius), 0 outside."""
    return np.square(np.clip(1.0 - z2, 0.0, None))


def _thorax_half_width(f: Mapping[str, Any]) -> float:
    return (0.295 if f["Sex"] else 0.315) * (1 + 0.04 * f["size_z"])


def _domes(f: Mapping[str, Any], with_atelectasis: bool = True) -> dict[int, float]:
    """Top of each hemidiaphragm dome (side -1: the patient's right, image left; +1: the patient's left)."""
    base = f["dome_y"] + f["inspiration"]
    domes = {-1: base - f["right_raise"], 1: base}
    if with_atelectasis and f["Atelectasis"]:
        side = 1 if f["atel_side"] else -1
        domes[side] -= f["atel_raise"]
    return domes


def _diaphragm(dx: Any, tw: float, dome: float, dome_h: float) -> Any:
    """Height of a hemidiaphragm at ``dx`` from the midline (towards its side): highest at 0.45 tw."""
    return dome + dome_h * np.square((dx - 0.45 * tw) / (0.55 * tw))


@dataclass(frozen=True)
class _Heart:
    """An ellipse tilted ``tilt`` degrees down towards the patient's left (the cardiac long axis, base to
    apex); ``half_width`` / ``half_height`` are its horizontal / vertical half-extents."""

    cx: float
    cy: float
    a: float
    b: float
    tilt: float

    @property
    def half_width(self) -> float:
        c, s = np.cos(np.deg2rad(self.tilt)), np.sin(np.deg2rad(self.tilt))
        return float(np.hypot(self.a * c, self.b * s))

    @property
    def half_height(self) -> float:
        c, s = np.cos(np.deg2rad(self.tilt)), np.sin(np.deg2rad(self.tilt))
        return float(np.hypot(self.a * s, self.b * c))


def _heart(f: Mapping[str, Any], cardiomegaly: int | None = None) -> _Heart:
    """The heart, whose horizontal extent is exactly CTR x the inner thorax width (2 tw), ``heart_right`` of it
    to the right of the midline (the image left)."""
    tw = _thorax_half_width(f)
    card = f["Cardiomegaly"] if cardiomegaly is None else cardiomegaly
    width = float(cardiothoracic_ratio(card, f["ctr_u"])) * 2 * tw
    c, s = np.cos(np.deg2rad(f["heart_tilt"])), np.sin(np.deg2rad(f["heart_tilt"]))
    a = 0.5 * width / np.hypot(c, f["heart_aspect"] * s)
    heart = _Heart(0.5 + (0.5 - f["heart_right"]) * width, 0.0, a, f["heart_aspect"] * a, f["heart_tilt"])
    # Its left border's widest point (image right) sits ``heart_lift`` above the top of the left hemidiaphragm
    # (at its base position: atelectasis does not move the heart), so the whole transverse diameter faces lung,
    # while its lower part overlaps the diaphragm and the abdomen as the heart rests on them.
    y_offset = (heart.a**2 - heart.b**2) * s * c / heart.half_width  # of that point below the centre
    cy = _domes(f, False)[1] - f["heart_lift"] - y_offset
    return _Heart(heart.cx, float(cy), heart.a, heart.b, heart.tilt)


def _consolidation_blobs(f: Mapping[str, Any]) -> tuple[float, list[tuple[float, float, float, float]]]:
    """(side, [(x, y, radius, weight)]) of the consolidation's blobs, present or not."""
    tw, side = _thorax_half_width(f), (1 if f["cons_side"] else -1)
    top, bottom = f["apex_y"] + 0.05, _domes(f, False)[side] - 0.01
    zone_h = (bottom - top) / 3
    y = top + zone_h * (int(f["cons_zone"]) + 0.2 + 0.6 * f["cons_v"])
    t = np.clip((y - f["apex_y"]) / (bottom + f["dome_h"] - f["apex_y"]), 0, 1)
    lateral = tw * np.sqrt(1 - (1 - t) ** 2.5)  # the lung's lateral margin at that height
    medial = f["med_l"] if side > 0 else f["med_r"]
    lo, hi = medial + 0.35 * (lateral - medial), medial + 0.75 * (lateral - medial)
    x = 0.5 + side * (lo + (hi - lo) * f["cons_u"])
    size = f["cons_size"]
    g = np.random.default_rng(int(f["cons_seed"]))
    blobs = [(float(x), float(y), 0.8 * size, 1.0)]
    for _ in range(7):
        ox, oy = (float(v) * size for v in g.uniform(-0.75, 0.75, 2))
        blobs.append((float(x) + ox, float(y) + oy, size * float(g.uniform(0.3, 0.6)), float(g.uniform(0.5, 1.0))))
    return side, blobs


def _plate(f: Mapping[str, Any]) -> tuple[int, np.ndarray, np.ndarray, float]:
    """(side, end point a, end point b, half-thickness) of the atelectasis plate, in patient coordinates."""
    tw, side = _thorax_half_width(f), (1 if f["atel_side"] else -1)
    dx = tw * (0.3 + 0.4 * f["atel_pos"])
    raised = _domes(f, False)[side] - f["atel_raise"]
    cy = float(_diaphragm(dx, tw, raised, f["dome_h"])) - f["atel_height"]
    ang = np.deg2rad(f["atel_angle"])
    half = 0.5 * f["atel_len"] * np.array([np.cos(ang), np.sin(ang)])
    centre = np.array([0.5 + side * dx, cy])
    return side, centre - half, centre + half, 0.5 * f["atel_thick"]


def _segment_distance(X: np.ndarray, Y: np.ndarray, a: Any, b: Any) -> np.ndarray:
    (ax, ay), (bx, by) = (float(v) for v in a), (float(v) for v in b)
    ux, uy = bx - ax, by - ay
    t = np.clip(((X - ax) * ux + (Y - ay) * uy) / (ux * ux + uy * uy), 0.0, 1.0)
    return np.hypot(X - ax - t * ux, Y - ay - t * uy)


def _grid(f: Mapping[str, Any], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (X, Y) of every pixel centre: the inverse of ``_to_pixels``."""
    p = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    u, v = p[None, :] - np.float32(f["shift_x"]), p[:, None] - np.float32(f["shift_y"])
    c, s = np.float32(np.cos(np.deg2rad(f["rot"]))), np.float32(np.sin(np.deg2rad(f["rot"])))
    k = np.float32(1.0 / f["scale"])
    return 0.5 + k * (c * u + s * v), 0.5 + k * (c * v - s * u)


def _to_pixels(f: Mapping[str, Any], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image-fraction coordinates of patient points (rotation by ``rot``, magnification, shift)."""
    c, s = np.cos(np.deg2rad(f["rot"])), np.sin(np.deg2rad(f["rot"]))
    dx, dy = f["scale"] * (np.asarray(x) - 0.5), f["scale"] * (np.asarray(y) - 0.5)
    return 0.5 + f["shift_x"] + c * dx - s * dy, 0.5 + f["shift_y"] + s * dx + c * dy


def _pixel_box(f: Mapping[str, Any], size: int, x0: float, x1: float, y0: float, y1: float
               ) -> tuple[int, int, int, int]:
    """Half-open pixel box ``(r0, r1, c0, c1)`` holding every pixel centre whose patient coordinates fall in
    the patient-space box [x0, x1] x [y0, y1]."""
    px, py = _to_pixels(f, np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
    cols, rows = px * size - 0.5, py * size - 0.5
    return (max(0, int(np.floor(rows.min()))), max(0, min(size, int(np.ceil(rows.max())) + 1)),
            max(0, int(np.floor(cols.min()))), max(0, min(size, int(np.ceil(cols.max())) + 1)))


def _window(f: Mapping[str, Any], size: int, x0: float, x1: float, y0: float, y1: float
            ) -> tuple[slice, slice]:
    """Array slices of ``_pixel_box``: shapes are evaluated only where they can be non-zero."""
    r0, r1, c0, c1 = _pixel_box(f, size, x0, x1, y0, y1)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


# ----------------------------------------------------------------------------------------------- drawing


def _bone_gain(age: float) -> float:
    """Bone density falls with age (osteopenia)."""
    return float(np.clip(1.15 - 0.006 * (age - 20), 0.65, 1.2))


def _ribs(X: np.ndarray, Y: np.ndarray, f: Mapping[str, Any], size: int, tw: float, w: float) -> np.ndarray:
    """Posterior ribs (arching out from the spine, falling laterally) and fainter anterior ribs (falling
    medially), one vectorised pass per side: each pixel is measured against its nearest rib."""
    floor_y = _domes(f, False)[1] + f["dome_h"]
    sp = (floor_y - f["apex_y"]) / 9.2 * f["rib_spacing"]
    out = np.zeros_like(X)
    for side in (-1, 1):
        rs = _window(f, size, min(0.5, 0.5 + side * (1.12 * tw + 2 * w)), max(0.5, 0.5 + side * (1.12 * tw + 2 * w)),
                     f["apex_y"] - 0.05, f["apex_y"] + 0.02 + 10 * sp + 0.15)
        Ys = Y[rs]
        uu = np.clip(side * (X[rs] - 0.5) / tw, 0.0, 1.25)
        q = (Ys + 0.025 * uu - 0.10 * uu * uu - f["apex_y"] - 0.01 - f["rib_phase"]) / sp
        k = np.clip(np.rint(q), 0, 9)
        half = (0.008 + 0.004 * uu) / sp
        post = _ramp(half - np.abs(q - k), w / sp) * _ramp(uu - 0.08, w / tw) * _ramp(1.12 - uu, w / tw)
        qa = (Ys - 0.11 * (1.05 - uu) - f["apex_y"] - 0.04 - f["rib_phase"]) / (1.1 * sp)
        ka = np.clip(np.rint(qa), 0, 6)
        ant = _ramp(0.007 / (1.1 * sp) - np.abs(qa - ka), w / sp) * _ramp(uu - 0.35, w / tw) * _ramp(1.05 - uu, w / tw)
        out[rs] += post + 0.45 * ant
    return out


def render_frontal(f: Mapping[str, Any], size: int, noise_std: float = 0.0, clavicles: bool = True) -> np.ndarray:
    """Render one row of factors (a mapping of Python scalars) as a PA/AP radiograph -> uint8 [size, size]."""
    X, Y = _grid(f, size)
    w = _EDGE_PX / size
    ax = X - 0.5
    tw = _thorax_half_width(f)
    apex, dome_h = f["apex_y"], f["dome_h"]
    domes, base_domes = _domes(f), _domes(f, False)

    def win(x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        return _window(f, size, x0 - w, x1 + w, y0 - w, y1 + w)

    # Soft tissue: the body's half-width along its height (neck, shoulders, chest wall), elliptic cross-section.
    bw = np.interp(Y, [-0.1, -0.02, 0.02, 0.07, 0.2, 0.45, 0.8, 1.1],
                   [0.07, 0.075, 0.13, tw + 0.15, tw + 0.14, tw + 0.1, tw + 0.09, tw + 0.075]).astype(np.float32)
    A = np.sqrt(np.clip(1.0 - np.square(ax / bw), 0.0, 1.0))

    # Heart: a tilted ellipse whose horizontal extent is the CTR's cardiac diameter.
    h = _heart(f)
    hw_, hh_ = h.half_width * (1 + w / h.b), h.half_height * (1 + w / h.b)
    hs = win(h.cx - hw_, h.cx + hw_, h.cy - hh_, h.cy + hh_)
    c, s = np.float32(np.cos(np.deg2rad(h.tilt))), np.float32(np.sin(np.deg2rad(h.tilt)))
    hx, hy = X[hs] - np.float32(h.cx), Y[hs] - np.float32(h.cy)
    r = np.sqrt(np.square((c * hx + s * hy) / np.float32(h.a)) + np.square((c * hy - s * hx) / np.float32(h.b)))
    heart = _ramp((1.0 - r) * h.b, w)
    A[hs] += 0.08 * heart

    # Lungs: air inside the rib cage, above the diaphragm, outside the mediastinum; the heart hides most of
    # the lung behind it.
    knob_y = apex + 0.12
    knob_r = f["knob_r"] * (1 + 0.006 * (f["Age"] - 60))
    cons_side, blobs = _consolidation_blobs(f) if f["Consolidation"] else (0, [])
    plate = _plate(f) if f["Atelectasis"] else None
    air = np.zeros_like(X)
    for side in (-1, 1):
        ls = win(min(0.5, 0.5 + side * tw), max(0.5, 0.5 + side * tw), apex, base_domes[side] + 1.2 * dome_h)
        Xs, Ys = X[ls], Y[ls]
        dx = side * ax[ls]
        cpa = base_domes[side] + dome_h
        t = np.clip((Ys - apex) / (cpa - apex), 0.0, 1.0)
        lateral = tw * np.sqrt(1.0 - (1.0 - t) ** 2.5)
        medial = f["med_l"] if side > 0 else f["med_r"]
        if side > 0:
            medial = medial + knob_r * np.sqrt(np.clip(1 - np.square((Ys - knob_y) / (1.3 * knob_r)), 0, 1))
        lung = (_ramp(lateral - dx, w) * _ramp(dx - medial, w)
                * _ramp(_diaphragm(dx, tw, domes[side], dome_h) - Ys, w) * _ramp(Ys - apex, w))
        lung *= 0.55 + 0.45 * np.sqrt(np.clip(1 - np.square((dx - 0.5 * tw) / (0.6 * tw)), 0, 1))
        if side == cons_side:
            field = np.zeros_like(X)
            for bx, by, br, wt in blobs:
                bs = _window(f, size, bx - br, bx + br, by - br, by + br)
                field[bs] += wt * _bump((np.square(X[bs] - bx) + np.square(Y[bs] - by)) / (br * br))
            lung *= 1.0 - 0.92 * (1.0 - np.exp(-2.5 * f["cons_density"] * field[ls]))
        if plate is not None and side == plate[0]:
            _, pa, pb, half = plate
            lung *= 1.0 - 0.9 * _ramp(half - _segment_distance(Xs, Ys, pa, pb), w)
        air[ls] += lung
    air[hs] *= 1.0 - 0.9 * heart
    A -= 0.6 * air

    # Trachea (air) down to the carina; gastric bubble under the left dome.
    ts = win(0.47, 0.53, -0.2, apex + 0.17)
    A[ts] -= 0.22 * _ramp(0.016 - np.abs(ax[ts] - 0.004), w) * _ramp(apex + 0.17 - Y[ts], w)
    if f["bubble"]:
        bx, by = 0.5 + 0.5 * tw, base_domes[1] + 0.35 * dome_h + 0.045
        bs = win(bx - 0.05 - w, bx + 0.05 + w, by - 0.025 - w, by + 0.025 + w)
        d = 1 - np.sqrt(np.square((X[bs] - bx) / 0.05) + np.square((Y[bs] - by) / 0.025))
        A[bs] -= 0.3 * _ramp(d, w / 0.025)

    # Breast shadows: soft tissue over the lower lung zones, with a sharp lower edge.
    if f["Sex"]:
        for side in (-1, 1):
            cx, cy = 0.5 + side * 0.62 * tw, base_domes[side] - 0.05
            ra, rb = 0.17 * f["breast"], 0.11 * f["breast"]
            bs = win(cx - ra, cx + ra, cy - rb, cy + rb)
            z = np.square((X[bs] - cx) / ra) + np.square((Y[bs] - cy) / rb)
            A[bs] += 0.16 * np.sqrt(np.clip(1 - z, 0, 1)) * np.clip((Y[bs] - cy + rb) / (1.4 * rb), 0, 1)

    # Bones: spine with vertebral bodies, ribs, clavicles.
    gain = _bone_gain(f["Age"])
    vert = 0.75 + 0.25 * np.square(np.cos(np.pi * (Y - f["rib_phase"]) / 0.045))
    bones = 0.12 * _ramp(0.04 - np.abs(ax), w) * vert
    bones += 0.13 * _ribs(X, Y, f, size, tw, w)
    if clavicles:
        for side in (-1, 1):
            a = (0.5 + side * 0.05, apex + 0.035 + f["clav_dy"])
            b = (0.5 + side * (tw + 0.04), apex - 0.02 - f["clav_tilt"] + f["clav_dy"])
            cs = win(min(a[0], b[0]) - 0.013, max(a[0], b[0]) + 0.013, b[1] - 0.013, a[1] + 0.013)
            bones[cs] += 0.16 * _ramp(0.013 - _segment_distance(X[cs], Y[cs], a, b), w)
    A += gain * bones

    v = (1.0 - np.exp(-f["exposure"] * np.clip(A, 0.0, None))) ** f["gamma"]
    return _finish(v, f, size, noise_std)


def render_lateral(f: Mapping[str, Any], size: int, noise_std: float = 0.0) -> np.ndarray:
    """A lateral view of the same patient (facing the image left) -> uint8 [size, size]; coarser than the
    frontal view but with the same findings: heart size, a consolidation blob, a raised diaphragm and plate."""
    X, Y = _grid(f, size)
    w = _EDGE_PX / size
    tw = _thorax_half_width(f)
    depth = 0.72 * tw  # half the antero-posterior diameter
    front, back = 0.5 - depth, 0.5 + depth
    apex, dome_h = f["apex_y"], f["dome_h"]
    domes = _domes(f)
    dome = 0.5 * (domes[-1] + domes[1])
    bulge = np.sin(np.pi * np.clip((Y - apex + 0.1) / (dome - apex + 0.3), 0, 1))
    body_front = front - 0.06 - (0.05 + 0.01 * f["size_z"]) * bulge
    body = _ramp(X - body_front, w) * _ramp(back + 0.1 + 0.03 * bulge - X, w)
    A = 1.25 * body + 0.25 * _ramp(apex + 0.06 - Y, 0.04) * body  # shoulders and arms over the apices

    h = _heart(f)
    ha, hb = 0.85 * h.half_width, h.half_height
    heart = _ramp(1 - np.sqrt(np.square((X - front - 0.9 * ha) / ha) + np.square((Y - h.cy) / hb)), w / hb)
    diaphragm = dome + dome_h * np.square((X - 0.5) / depth) * np.where(X > 0.5, 1.3, 0.6)
    t = np.clip((Y - apex) / (dome - apex), 0.0, 1.0)
    half = (depth - 0.025) * np.sqrt(1.0 - (1.0 - t) ** 3)  # the lung narrows towards the apex
    lung = _ramp(half - np.abs(X - 0.495), w) * _ramp(diaphragm - Y, w) * _ramp(Y - apex, w)
    if f["Consolidation"]:
        _, blobs = _consolidation_blobs(f)
        ap = front + 0.03 + (2 * depth - 0.06) * (0.25 + 0.5 * f["cons_u"])
        field = sum(wt * _bump((np.square(X - (ap + bx - blobs[0][0])) + np.square(Y - by)) / (br * br))
                    for bx, by, br, wt in blobs)
        lung = lung * (1 - 0.5 * np.clip(f["cons_density"] * field, 0, 0.95))  # one lung of two
    if f["Atelectasis"]:
        _, pa, pb, half = _plate(f)
        shift = np.array([0.5 + 0.3 * depth - 0.5 * (pa[0] + pb[0]), 0.0])
        lung = lung * (1 - 0.45 * _ramp(half - _segment_distance(X, Y, pa + shift, pb + shift), w))
    A -= 0.75 * lung * (1 - 0.85 * heart)
    A += 0.08 * heart
    gain = _bone_gain(f["Age"])
    vert = 0.7 + 0.3 * np.square(np.cos(np.pi * (Y - f["rib_phase"]) / 0.045))
    A += gain * (0.3 * _ramp(X - back + 0.005, w) * _ramp(back + 0.065 - X, w) * vert
                 + 0.12 * _ramp(0.006 - np.abs(X - front + 0.01), w) * _ramp(Y - apex + 0.02, w)
                 * _ramp(dome - 0.05 - Y, w))
    v = (1.0 - np.exp(-0.8 * f["exposure"] * np.clip(A, 0.0, None))) ** f["gamma"]
    return _finish(v, f, size, noise_std)


def _finish(v: np.ndarray, f: Mapping[str, Any], size: int, noise_std: float) -> np.ndarray:
    """Film base, quantum-like noise (stronger where brighter) from the row's ``noise_seed``, uint8."""
    v = 0.03 + 0.94 * v
    if noise_std > 0:
        rng = np.random.default_rng(int(f["noise_seed"]))
        u = np.frombuffer(rng.bytes(2 * size * size), np.uint8).reshape(2, size, size)
        noise = (u[0].astype(np.float32) + u[1] - np.float32(255)) / np.float32(_TRIANGULAR_STD)
        v = v + noise_std * (0.5 + v) * noise
    return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)


def render(f: Mapping[str, Any], size: int, noise_std: float = 0.0, clavicles: bool = True) -> np.ndarray:
    """Render one row of factors with the view it names -> uint8 [size, size]."""
    if f["frontal"]:
        return render_frontal(f, size, noise_std, clavicles)
    return render_lateral(f, size, noise_std)


def finding_box(f: Mapping[str, Any], finding: str, size: int) -> tuple[int, int, int, int]:
    """Pixel box ``(y0, y1, x0, x1)`` (half-open) of a frontal image holding every pixel that toggling
    ``finding`` can change for this row; it does not depend on the finding's current value."""
    if finding not in MODELLED_FINDINGS:
        raise ValueError(f"finding must be one of {MODELLED_FINDINGS}, got {finding!r}")
    w = _EDGE_PX / size
    if finding == "Cardiomegaly":
        xs, ys = [], []
        for card in (0, 1):
            h = _heart(f, card)
            grow = 1 + w / h.b
            xs += [h.cx - h.half_width * grow, h.cx + h.half_width * grow]
            ys += [h.cy - h.half_height * grow, h.cy + h.half_height * grow]
    elif finding == "Consolidation":
        _, blobs = _consolidation_blobs(f)
        xs = [x + s * r for x, _, r, _ in blobs for s in (-1, 1)]
        ys = [y + s * r for _, y, r, _ in blobs for s in (-1, 1)]
    else:  # the lung of that side between the raised and the base diaphragm, and the plate
        tw, (side, pa, pb, half) = _thorax_half_width(f), _plate(f)
        base = _domes(f, False)[side]
        xs = [0.5, 0.5 + side * (tw + w), pa[0] - half, pa[0] + half, pb[0] - half, pb[0] + half]
        ys = [base - f["atel_raise"], base + 1.2 * f["dome_h"], pa[1] - half, pb[1] - half]
    m = w + 1e-3  # the soft edges reach ``w`` beyond each shape
    return _pixel_box(f, size, min(xs) - m, max(xs) + m, min(ys) - m, max(ys) + m)


# ------------------------------------------------------------------------------------------------ files


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """The one JPEG encoder of the phantom (Pillow, 8-bit grayscale)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode as the CheXpert DataModule does (``Image.open(f).convert("L")``) -> uint8 [H, W]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def _row(factors: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    return {k: np.asarray(v)[i].item() for k, v in factors.items()}


def load_factors(root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read ``<root>/factors.npz`` -> (factors, builder parameters); rows follow train.csv then valid.csv."""
    return read_factors_npz(Path(root) / FACTORS_FILE, "build the chest phantom first (ChestPhantomBuilder.build).")


def _intervention(name: str, value: Any, n: int) -> np.ndarray:
    v = intervention_values(name, value, n)
    if name == "Age":
        if not ((v >= 0) & (v <= 120)).all():
            raise ValueError(f"do['Age'] must be in years (0-120), got {v.min()}..{v.max()}")
        # a DataModule hands back normalised ages converted to years in float32: round away that error, so
        # do(Age = own age) redraws the stored image exactly
        return np.round(v, 3).astype(np.float32)
    if not np.isin(v, (0.0, 1.0)).all():
        raise ValueError(f"do[{name!r}] values must be 0 or 1 (Sex: 1 = Female), got {np.unique(v)}")
    return v.astype(np.int8)


class ChestPhantomBuilder:
    """Writes (and caches) the chest phantom in CheXpert-v1.0-small's layout and renders true counterfactuals.

    Files in ``root``: ``train.csv`` (the ``n_train_patients`` patients' studies, frontal and lateral views),
    ``valid.csv`` (``n_valid_patients`` further patients, one frontal study each, consensus-style labels),
    ``train/`` and ``valid/`` JPEG trees (``image_size`` square, 8-bit grayscale), ``factors.npz`` (one array per
    factor plus ``_params``, rows in train.csv then valid.csv order, as the DataModule's ``index``) and
    ``builder.json`` (parameters and format version, written last so an interrupted build is never taken for
    a complete one). All arguments are JSON-serialisable; ``population`` is a partial dict of
    ``PhantomPopulation`` fields.
    """

    def __init__(self, n_train_patients: int = 3000, n_valid_patients: int = 300, image_size: int = 256,
                 seed: int = 0, population: Mapping[str, float] | None = None, jpeg_quality: int = 90,
                 noise_std: float = 0.012, clavicles: bool = True) -> None:
        if n_train_patients < 1 or n_valid_patients < 0:
            raise ValueError("need n_train_patients >= 1 and n_valid_patients >= 0")
        if image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {image_size}")
        self.n_train_patients, self.n_valid_patients = int(n_train_patients), int(n_valid_patients)
        self.image_size, self.seed = int(image_size), int(seed)
        self.population = _as_population(population)
        self.jpeg_quality, self.noise_std, self.clavicles = int(jpeg_quality), float(noise_std), bool(clavicles)
        self.render_count = 0  # images rendered by build(); tests use it to see the cache at work
        self._factors: dict[Path, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}

    @property
    def params(self) -> dict[str, Any]:
        return {"n_train_patients": self.n_train_patients, "n_valid_patients": self.n_valid_patients,
                "image_size": self.image_size, "seed": self.seed, "population": asdict(self.population),
                "jpeg_quality": self.jpeg_quality, "noise_std": self.noise_std, "clavicles": self.clavicles}

    def sample(self) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        return sample_phantom(self.n_train_patients, self.n_valid_patients, self.seed, self.population)

    def is_built(self, root: str | Path) -> bool:
        """True when ``root`` holds a complete build with exactly these parameters."""
        root = Path(root)
        if not read_manifest(root, MANIFEST_FILE, FORMAT_VERSION, self.params, (TRAIN_CSV, VALID_CSV, FACTORS_FILE)):
            return False
        manifest = json.loads((root / MANIFEST_FILE).read_text())
        first, last = manifest.get("first_image", ""), manifest.get("last_image", "")
        return bool(first) and (root / first).is_file() and (root / last).is_file()

    def build(self, root: str | Path) -> Path:
        """Write the phantom into ``root`` unless an identical build is already there; returns ``root``."""
        root = Path(root)
        if self.is_built(root):
            return root
        ours = (root / MANIFEST_FILE).exists() or (root / FACTORS_FILE).exists()
        if not ours and any((root / n).exists() for n in (TRAIN_CSV, VALID_CSV, "train", "valid")):
            raise DatasetError(f"{root} holds a CheXpert-like dataset that this builder did not write; refusing to "
                               f"overwrite it. Point the chest phantom at an empty folder.")
        (root / MANIFEST_FILE).unlink(missing_ok=True)
        for name in ("train", "valid"):
            shutil.rmtree(root / name, ignore_errors=True)
        for name in (TRAIN_CSV, VALID_CSV, FACTORS_FILE):
            (root / name).unlink(missing_ok=True)
        self._factors.pop(root.resolve(), None)

        # factors.npz first: from then on a partial build is recognisably ours and gets overwritten
        root.mkdir(parents=True, exist_ok=True)
        factors, rows = self.sample()
        np.savez(root / FACTORS_FILE, _params=np.array(json.dumps(self.params)), **factors)
        write_chexpert_csv(root / TRAIN_CSV, [r for r, s in zip(rows, factors["source"], strict=True) if s == 0])
        write_chexpert_csv(root / VALID_CSV, [r for r, s in zip(rows, factors["source"], strict=True) if s == 1])
        files = [Path(*Path(r["Path"]).parts[1:]) for r in rows]  # without the release folder
        for i in tqdm(range(len(rows)), desc=f"Rendering the chest phantom into {root}", unit="img",
                      disable=len(rows) < 500):
            img = render(_row(factors, i), self.image_size, self.noise_std, self.clavicles)
            (root / files[i]).parent.mkdir(parents=True, exist_ok=True)
            (root / files[i]).write_bytes(encode_jpeg(img, self.jpeg_quality))
            self.render_count += 1
        manifest = {"format_version": FORMAT_VERSION, "params": self.params,
                    "first_image": files[0].as_posix(), "last_image": files[-1].as_posix()}
        (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return root

    def load_factors(self, root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``load_factors(root)``, cached on this instance."""
        key = Path(root).resolve()
        if key not in self._factors:
            self._factors[key] = load_factors(key)
        return self._factors[key]

    def render(self, factors: Mapping[str, Any]) -> np.ndarray:
        """Render a row (scalars -> [H, W]) or a batch (arrays -> [N, H, W]) with this builder's size and
        noise; no JPEG."""
        if np.ndim(factors["Cardiomegaly"]) == 0:
            return render(dict(factors), self.image_size, self.noise_std, self.clavicles)
        n = len(factors["Cardiomegaly"])
        return np.stack([render(_row(factors, i), self.image_size, self.noise_std, self.clavicles)
                         for i in range(n)]) if n else np.zeros((0, self.image_size, self.image_size), np.uint8)

    def true_counterfactual(self, root: str | Path, indices: Any, do: Mapping[str, Any],
                            jpeg_roundtrip: bool = True) -> np.ndarray:
        """The images at ``indices`` (the DataModule's ``index``: train.csv rows, then valid.csv rows) re-rendered
        with the factors in ``do`` set and every other factor, noise included, unchanged -> uint8 [N, H, W].

        ``do`` maps ``Cardiomegaly``/``Consolidation``/``Atelectasis`` (0/1), ``Sex`` (0 Male, 1 Female) or
        ``Age`` (years) to a scalar or a length-N array. A finding switched on appears where the row's latent
        factors put it (its zone, size and shape are drawn for every image); Cardiomegaly keeps the heart's CTR
        quantile. Rendering uses the parameters stored in ``root``. With ``jpeg_roundtrip`` the images go
        through the phantom's JPEG encoder and a Pillow decode, so a no-op intervention returns exactly the
        stored file.
        """
        factors, params = self.load_factors(root)
        idx = row_indices(indices, len(factors["Cardiomegaly"]), f"the phantom in {root}")
        unknown = [k for k in do if k not in INTERVENABLE]
        if unknown:
            raise ValueError(f"cannot intervene on {unknown}: the chest phantom models only {', '.join(INTERVENABLE)}")
        rows = {k: v[idx].copy() for k, v in factors.items()}
        rows.update({k: _intervention(k, v, len(idx)) for k, v in do.items()})
        size = params["image_size"]
        images = np.empty((len(idx), size, size), np.uint8)
        for i in range(len(idx)):
            images[i] = render(_row(rows, i), size, params["noise_std"], params["clavicles"])
            if jpeg_roundtrip:
                images[i] = decode_jpeg(encode_jpeg(images[i], params["jpeg_quality"]))
        return images


def preview_grid(path: str | Path, n: int = 16, image_size: int = 256, seed: int = 0) -> np.ndarray:
    """Save a PNG: ``n`` frontal images, then one row each of normal | do(finding = 1) for the three findings."""
    factors, _ = sample_phantom(4 * n, 0, seed)
    frontal = np.flatnonzero(factors["frontal"] == 1)
    tiles = [render(_row(factors, i), image_size, 0.012) for i in frontal[:n]]
    clean = [i for i in frontal if not any(factors[f][i] for f in MODELLED_FINDINGS)][:n // 2]
    for name in MODELLED_FINDINGS:
        for i in clean[: n // 2]:
            row = _row(factors, i)
            tiles += [render(row, image_size, 0.012), render(dict(row, **{name: 1}), image_size, 0.012)]
    return save_grid(path, tiles, cols=n)


def main(argv: list[str] | None = None) -> int:
    """``python -m datamodules.synthetic.chest_phantom [--root DIR] [--n-train-patients N] ... [--preview P]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write the chest phantom in CheXpert-v1.0-small's layout (cached).")
    parser.add_argument("--root", default=None,
                        help="default: data/chest_phantom_<size>px_<patients>_seed<seed>, as data=chest_phantom")
    parser.add_argument("--n-train-patients", type=int, default=3000)
    parser.add_argument("--n-valid-patients", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", default=None, help="only save a PNG grid of phantoms and finding toggles here")
    args = parser.parse_args(argv)
    if args.preview:
        preview_grid(args.preview, image_size=args.image_size, seed=args.seed)
        print(f"preview: {args.preview}")
        return 0
    root = args.root or f"data/chest_phantom_{args.image_size}px_{args.n_train_patients}_seed{args.seed}"
    builder = ChestPhantomBuilder(args.n_train_patients, args.n_valid_patients, args.image_size, args.seed)
    print(f"chest phantom in {builder.build(root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
