"""The synthetic faces' generative factors: the attribute model, the nuisances, and their CelebA columns.

Generative model (one row of factors per image, all sampled i.i.d. from ``seed``):

* Attributes (stored under their CelebA names, 0/1 with CelebA's meaning; see ``FaceCorrelations``):
  ``Male`` ~ Bern; ``Smiling`` ~ Bern; ``Mouth_Slightly_Open`` | Smiling; ``No_Beard`` = 0 (a beard) only
  for males; ``Mustache`` only for males, likelier with a beard; hair colour is ONE categorical variable
  seen through ``Black_Hair`` / ``Blond_Hair`` (never both; blond mostly female; otherwise a nuisance
  brown/light-brown/gray/auburn); ``Bangs`` (likelier for females); ``Eyeglasses`` (likelier for males);
  ``Wearing_Hat``.
* Nuisance factors: face centre (small translation), half-width and aspect of the face, skin tone, hair
  style (4 per sex) and shade, eye spacing/height/shape/iris colour, mouth width/height, two background
  colours and a gradient angle, a directional lighting gradient, clothes/hat/glasses colours, hat style and
  a per-image ``noise_seed`` for the pixel noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from datamodules.celeba_format import CELEBA_ATTRIBUTES
from datamodules.synthetic.common import check_probabilities, options_from

MODELLED_ATTRIBUTES: tuple[str, ...] = (
    "Smiling", "Mouth_Slightly_Open", "Eyeglasses", "Bangs", "Black_Hair", "Blond_Hair", "Male",
    "Mustache", "No_Beard", "Wearing_Hat",
)  # fmt: skip

_HAIR_OTHER = np.array([[115, 75, 45], [150, 105, 65], [165, 165, 160], [150, 70, 35]], np.float32)
_HAIR_OTHER_P = (0.5, 0.2, 0.15, 0.15)  # brown, light brown, gray, auburn
_IRIS = np.array([[95, 60, 35], [55, 40, 30], [70, 110, 160], [85, 120, 80]], np.float32)
_GLASSES = np.array([[20, 20, 20], [90, 55, 30], [120, 120, 130]], np.float32)


@dataclass(frozen=True)
class FaceCorrelations:
    """Probabilities of the attribute model (defaults loosely follow CelebA's marginals).

    ``male`` P(Male); ``smiling`` P(Smiling); ``mouth_open_if_smiling`` / ``mouth_open_if_not_smiling``
    P(Mouth_Slightly_Open | Smiling); ``beard_if_male`` P(beard | male) (females never: No_Beard = 1);
    ``mustache_if_beard`` / ``mustache_if_no_beard`` P(Mustache | male, beard) (females never);
    ``black_hair`` P(Black_Hair); ``blond_hair_if_female`` / ``blond_hair_if_male`` P(Blond_Hair | sex),
    exclusive with black (``black_hair + blond_hair_if_* <= 1``); ``bangs_if_female`` /
    ``bangs_if_male``; ``eyeglasses_if_female`` / ``eyeglasses_if_male``; ``hat`` P(Wearing_Hat).
    Defaults give P(Blond) ~ 0.15, P(Bangs) ~ 0.15, P(Eyeglasses) ~ 0.07, P(No_Beard | male) = 0.6.
    """

    male: float = 0.42
    smiling: float = 0.48
    mouth_open_if_smiling: float = 0.7
    mouth_open_if_not_smiling: float = 0.3
    beard_if_male: float = 0.4
    mustache_if_beard: float = 0.2
    mustache_if_no_beard: float = 0.05
    black_hair: float = 0.24
    blond_hair_if_female: float = 0.24
    blond_hair_if_male: float = 0.03
    bangs_if_female: float = 0.2
    bangs_if_male: float = 0.08
    eyeglasses_if_female: float = 0.03
    eyeglasses_if_male: float = 0.12
    hat: float = 0.05

    def __post_init__(self) -> None:
        check_probabilities(asdict(self), "correlation")
        if self.black_hair + max(self.blond_hair_if_female, self.blond_hair_if_male) > 1.0:
            raise ValueError("black_hair + blond_hair_if_* must be <= 1: the hair colours are exclusive")


def as_correlations(correlations: Mapping[str, float] | FaceCorrelations | None) -> FaceCorrelations:
    return options_from(FaceCorrelations, correlations, "correlation")


def sample_factors(n: int, seed: int = 0, correlations: Mapping[str, float] | FaceCorrelations | None = None
                   ) -> dict[str, np.ndarray]:
    """Sample ``n`` rows of generative factors: attributes int8 0/1 under CelebA names, nuisances float32
    (colours [n, 3] RGB 0-255), ``hair_style`` / ``hat_style`` / ``noise_seed`` int64."""
    c = as_correlations(correlations)
    rng = np.random.default_rng(seed)
    u = lambda: rng.random(n)  # noqa: E731
    male = u() < c.male
    smiling = u() < c.smiling
    mouth_open = u() < np.where(smiling, c.mouth_open_if_smiling, c.mouth_open_if_not_smiling)
    beard = male & (u() < c.beard_if_male)
    mustache = male & (u() < np.where(beard, c.mustache_if_beard, c.mustache_if_no_beard))
    r = u()
    black = r < c.black_hair
    blond = ~black & (r < c.black_hair + np.where(male, c.blond_hair_if_male, c.blond_hair_if_female))
    bangs = u() < np.where(male, c.bangs_if_male, c.bangs_if_female)
    glasses = u() < np.where(male, c.eyeglasses_if_male, c.eyeglasses_if_female)
    hat = u() < c.hat
    attrs = {"Smiling": smiling, "Mouth_Slightly_Open": mouth_open, "Eyeglasses": glasses, "Bangs": bangs,
             "Black_Hair": black, "Blond_Hair": blond, "Male": male, "Mustache": mustache, "No_Beard": ~beard,
             "Wearing_Hat": hat}
    out: dict[str, np.ndarray] = {k: v.astype(np.int8) for k, v in attrs.items()}

    def jitter(palette: np.ndarray, p: tuple[float, ...] | None, std: float) -> np.ndarray:
        pick = palette[rng.choice(len(palette), n, p=p)]
        return np.clip(pick + rng.normal(0, std, (n, 3)), 0, 255)

    tone = u()[:, None] ** 1.3
    skin = np.array([240, 208, 185]) * (1 - tone) + np.array([115, 75, 52]) * tone
    a = 0.22 + 0.04 * u()
    # backgrounds are random colours pulled halfway towards grey, like CelebA's mostly muted backdrops
    bg = 40 + 190 * rng.random((2, n, 3))
    bg = 0.45 * bg + 0.55 * bg.mean(2, keepdims=True)
    nuis = {
        "face_x": 0.5 + 0.03 * (2 * u() - 1), "face_y": 0.5 + 0.025 * (2 * u() - 1),
        "face_a": a, "face_b": a * (1.25 + 0.15 * u()),
        "skin": np.clip(skin + rng.normal(0, 6, (n, 3)), 0, 255),
        "hair_other": jitter(_HAIR_OTHER, _HAIR_OTHER_P, 10), "hair_shade": 2 * u() - 1,
        "eye_sep": 0.4 + 0.06 * u(), "eye_dy": 0.012 * (2 * u() - 1), "eye_w": 0.16 + 0.04 * u(),
        "eye_aspect": 0.45 + 0.15 * u(), "iris": jitter(_IRIS, None, 8),
        "mouth_w": 0.44 + 0.1 * u(), "mouth_dy": 0.01 * (2 * u() - 1),
        "bg0": bg[0], "bg1": bg[1],
        "bg_angle": 2 * np.pi * u(), "light_angle": 2 * np.pi * u(), "light_strength": 0.25 * u(),
        "clothes": 20 + 210 * rng.random((n, 3)), "hat_color": 20 + 210 * rng.random((n, 3)),
        "glasses_color": jitter(_GLASSES, None, 6),
    }
    out.update({k: np.asarray(v, np.float32) for k, v in nuis.items()})
    out["hair_style"] = rng.integers(0, 4, n)
    out["hat_style"] = rng.integers(0, 2, n)
    out["noise_seed"] = rng.integers(0, 2**31 - 1, n)
    return out


def celeba_attributes(factors: Mapping[str, np.ndarray]) -> np.ndarray:
    """[N, 40] int8 in {1, -1} in CelebA's column order; every unmodelled column is -1."""
    n = len(factors["Smiling"])
    attrs = -np.ones((n, len(CELEBA_ATTRIBUTES)), np.int8)
    for name in MODELLED_ATTRIBUTES:
        attrs[:, CELEBA_ATTRIBUTES.index(name)] = 2 * np.asarray(factors[name], np.int8) - 1
    return attrs


def factor_row(factors: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    """Row ``i`` of a table of factors as Python scalars and lists, what ``render_face`` draws."""
    return {k: np.asarray(v)[i].tolist() for k, v in factors.items()}
