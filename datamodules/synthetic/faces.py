"""Embedded synthetic faces: a deterministic procedural renderer that writes CelebA's on-disk layout.

Real CelebA is licensed, so experiments ending in ``_synth`` use these faces instead: the builder writes
``img_align_celeba/000001.jpg ...``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt`` exactly as
CelebA ships them (read back by the same code that reads CelebA), plus ``factors.npz``, every generative
factor of every image, from which the TRUE counterfactual of any image can be re-rendered.

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

What each attribute draws (and the only pixels it touches, other factors fixed):
``Smiling`` the mouth curve (flat/slightly downturned vs upturned; open + smiling shows teeth);
``Mouth_Slightly_Open`` a dark open mouth; both stay inside ``mouth_box``. ``Eyeglasses`` frames, bridge
and arms; ``Bangs`` a jagged fringe over the forehead; ``Black_Hair`` / ``Blond_Hair`` the colour of hair,
eyebrows, beard and mustache; ``Male`` shorter hair, a squarer jaw and thicker, flatter eyebrows;
``Mustache`` a band above the upper lip; ``No_Beard`` = 0 a beard around the jaw and chin;
``Wearing_Hat`` a beanie or a brimmed hat hiding the top of the hair.

Rendering: shapes are drawn with antialiased OpenCV primitives in image-fraction coordinates on a canvas
supersampled x2, downsampled with INTER_AREA (2x2 means: pixel-local), then lit and noised pixel-wise
(zero-mean triangular noise of std ``noise_std`` in [0, 1] units, drawn from the row's ``noise_seed``).
Every stage is pixel-local given the attribute-independent layers, so flipping ``Smiling`` changes only
pixels inside ``mouth_box``, and the noise, drawn from ``noise_seed`` alone, is identical in a factual and
its counterfactual.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from datamodules.base import DatasetError
from datamodules.celeba_format import (
    ATTR_FILE,
    CELEBA_ATTRIBUTES,
    IMAGE_DIR,
    PARTITION_FILE,
    write_attributes,
    write_partition,
)
from datamodules.synthetic.common import (
    check_probabilities,
    intervention_values,
    options_from,
    read_factors_npz,
    read_manifest,
    row_indices,
    save_grid,
)

# Part of the cache key with the builder's parameters: bump it whenever the renderer draws anything differently,
# or a dataset built earlier would be reused while true_counterfactual renders with the new drawing.
# 2: wider mouth and thicker lips (Smiling visible at 64 px).
FORMAT_VERSION = 2
FACTORS_FILE = "factors.npz"
MANIFEST_FILE = "builder.json"
MODELLED_ATTRIBUTES: tuple[str, ...] = (
    "Smiling", "Mouth_Slightly_Open", "Eyeglasses", "Bangs", "Black_Hair", "Blond_Hair", "Male",
    "Mustache", "No_Beard", "Wearing_Hat",
)  # fmt: skip

_SS = 2  # supersampling factor of the drawing canvas
_SHIFT = 4  # fractional bits of cv2's fixed-point coordinates
_AA = cv2.LINE_AA
_TRIANGULAR_STD = float(np.sqrt((256**2 - 1) / 6))  # std of the sum of two independent uniform bytes

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


def _as_correlations(correlations: Mapping[str, float] | FaceCorrelations | None) -> FaceCorrelations:
    return options_from(FaceCorrelations, correlations, "correlation")


def sample_factors(n: int, seed: int = 0, correlations: Mapping[str, float] | FaceCorrelations | None = None
                   ) -> dict[str, np.ndarray]:
    """Sample ``n`` rows of generative factors: attributes int8 0/1 under CelebA names, nuisances float32
    (colours [n, 3] RGB 0-255), ``hair_style`` / ``hat_style`` / ``noise_seed`` int64."""
    c = _as_correlations(correlations)
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


# ---------------------------------------------------------------------------------------------- drawing


def _col(rgb: Any, scale: float = 1.0) -> tuple[float, float, float]:
    return tuple(float(min(255.0, max(0.0, v * scale))) for v in rgb)  # type: ignore[return-value]


def _fill(img: np.ndarray, pts: np.ndarray, color: tuple[float, ...]) -> None:
    """Fill a polygon given in image-fraction coordinates, with sub-pixel precision."""
    s = img.shape[0] * (1 << _SHIFT)
    cv2.fillPoly(img, [np.rint(pts * s).astype(np.int32)], color, _AA, _SHIFT)


def _line(img: np.ndarray, pts: np.ndarray, color: tuple[float, ...], width: float, closed: bool = False
          ) -> None:
    """A polyline ``width`` (a fraction of the image) thick, at least 2 canvas pixels so it survives the
    downsampling."""
    s = img.shape[0]
    cv2.polylines(img, [np.rint(pts * s * (1 << _SHIFT)).astype(np.int32)], closed, color,
                  max(2, round(width * s)), _AA, _SHIFT)


@cache
def _unit_arc(t0: float, t1: float, n: int) -> np.ndarray:
    # cached because rendering spends most of its time building small point arrays, not drawing
    t = np.linspace(t0, t1, n)
    return np.stack([np.cos(t), np.sin(t)], 1)


@cache
def _lin(n: int, dtype: type = np.float64) -> np.ndarray:
    return np.linspace(-1.0, 1.0, n, dtype=dtype)


def _arc(cx: float, cy: float, a: float, b: float, t0: float = 0.0, t1: float = 2 * np.pi, n: int = 24
         ) -> np.ndarray:
    return _unit_arc(t0, t1, n) * (a, b) + (cx, cy)


def _mouth_geometry(f: Mapping[str, Any]) -> tuple[float, float, float]:
    """Centre x, centre y and half-width of the mouth."""
    return f["face_x"], f["face_y"] + 0.56 * f["face_b"] + f["mouth_dy"], f["mouth_w"] * f["face_a"]


def _between(x: np.ndarray, y_top: np.ndarray, y_bottom: np.ndarray) -> np.ndarray:
    return np.concatenate([np.stack([x, y_top], 1), np.stack([x, y_bottom], 1)[::-1]])


def _band(x: np.ndarray, y: np.ndarray, half: np.ndarray | float) -> np.ndarray:
    """Polygon of a curve thickened vertically by ``half`` on each side."""
    return _between(x, y - half, y + half)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


def _mouth_parts(f: Mapping[str, Any], smiling: bool, open_: bool) -> list[tuple[np.ndarray, tuple]]:
    """Polygons and colours of the mouth; ``mouth_box`` is their union over all four variants."""
    mx, my, mw = _mouth_geometry(f)
    lip = _col(np.asarray(f["skin"]) * np.array([0.82, 0.5, 0.52]) + np.array([30, 0, 5]))
    u = _lin(17)
    x, bow = mx + mw * u, 1 - u**2
    lt = 0.13 * mw + 0.006  # lip half-thickness
    if not open_:  # upturned corners when smiling, a slight downturn otherwise
        y = my - 0.32 * mw + 0.62 * mw * bow if smiling else my - 0.07 * mw * bow
        return [(_band(x, y, lt * (0.45 + 0.55 * bow)), lip)]
    if smiling:
        y_up, y_lo = my - 0.32 * mw + 0.18 * mw * bow, my - 0.32 * mw + 0.8 * mw * bow**0.8
    else:
        y_up, y_lo = my - 0.14 * mw * bow**0.7, my + 0.3 * mw * bow**0.7
    parts = [(_between(x, y_up, y_lo), (70.0, 22.0, 28.0))]
    if smiling:  # the upper teeth show in an open smile
        parts.append((_between(x, y_up, y_up + 0.42 * (y_lo - y_up)), (245.0, 242.0, 232.0)))
    parts += [(_band(x, y_up - 0.6 * lt * bow, 0.6 * lt * bow + 0.2 * lt), lip),
              (_band(x, y_lo + 0.8 * lt * bow, 0.8 * lt * bow + 0.2 * lt), lip)]
    return parts


def mouth_box(factors_row: Mapping[str, Any], image_size: int) -> tuple[int, int, int, int]:
    """Pixel box ``(y0, y1, x0, x1)`` (half-open, for ``img[y0:y1, x0:x1]``) containing every pixel that
    ``Smiling`` or ``Mouth_Slightly_Open`` can change for this row; independent of those two attributes."""
    f = {k: (v.tolist() if isinstance(v, np.ndarray | np.generic) else v) for k, v in factors_row.items()}
    pts = np.concatenate([p for s in (0, 1) for o in (0, 1) for p, _ in _mouth_parts(f, bool(s), bool(o))])
    lo, hi = pts.min(0) * image_size, pts.max(0) * image_size
    # one pixel of margin for antialiasing (which reaches one canvas pixel = half an output pixel)
    x0, y0 = (max(0, int(np.floor(v)) - 1) for v in lo)
    x1, y1 = (min(image_size, int(np.ceil(v)) + 1) for v in hi)
    return y0, y1, x0, x1


def _hair_color(f: Mapping[str, Any]) -> np.ndarray:
    shade = f["hair_shade"]
    if f["Black_Hair"]:
        return np.array([28.0, 24, 24]) * (1 + 0.3 * shade)
    if f["Blond_Hair"]:
        return np.array([228.0, 198, 122]) + 18 * shade
    return np.asarray(f["hair_other"], float) * (1 + 0.1 * shade)


def _hair_volume_length(f: Mapping[str, Any]) -> tuple[float, float]:
    """Hair volume (x the head size) and length below the face centre (x the face half-height) of the
    style; male styles are short."""
    style = int(f["hair_style"])
    if f["Male"]:
        return (1.05, 1.09, 1.02, 1.07)[style], (0.0, 0.0, 0.0, 0.35)[style]
    return (1.14, 1.17, 1.12, 1.1)[style], (1.55, 1.35, 0.55, 0.95)[style]


def _face_outline(cx: float, cy: float, a: float, b: float, male: bool) -> np.ndarray:
    c, s = _unit_arc(0.0, 2 * np.pi * 47 / 48, 48).T
    if male:  # superellipse below the cheekbones: a squarer jaw
        p = np.where(s > 0, 2 / 3.2, 1.0)
        x, y = np.sign(c) * np.abs(c) ** p, np.sign(s) * np.abs(s) ** p
    else:  # the chin narrows
        x, y = c * (1 - 0.12 * np.maximum(s, 0)), s
    return np.stack([cx + a * x, cy + b * y], 1)


def _draw_head(img: np.ndarray, f: Mapping[str, Any], hair: np.ndarray) -> None:
    """Body, hair behind the head, neck, ears, face, beard and nose."""
    cx, cy, a, b, male = f["face_x"], f["face_y"], f["face_a"], f["face_b"], bool(f["Male"])
    skin = np.asarray(f["skin"], float)
    _fill(img, _arc(cx, cy + b + 0.3, 0.42, 0.22), _col(f["clothes"]))
    vol, length = _hair_volume_length(f)
    if length > 0:
        yy = np.linspace(cy, cy + length * b, 10)
        wavy = int(f["hair_style"]) == 1 and not male
        flare = a * vol + 0.05 * (yy - cy) / b + (0.015 * np.sin((yy - cy) / b * 9) if wavy else 0.0)
        sides = np.concatenate([np.stack([cx + flare, yy], 1), np.stack([cx - flare, yy], 1)[::-1]])
        top = _arc(cx, cy, a * vol, b * vol, np.pi, 2 * np.pi, 20)
        _fill(img, np.concatenate([top, sides]), _col(hair, 0.9))
    neck = [[cx - 0.5 * a, cy], [cx + 0.5 * a, cy], [cx + 0.55 * a, 1.05], [cx - 0.55 * a, 1.05]]
    _fill(img, np.array(neck), _col(skin, 0.86))
    for side in (-1, 1):
        _fill(img, _arc(cx + side * a * 0.97, cy + 0.02 * b, 0.14 * a, 0.22 * b, n=16), _col(skin, 0.93))
    _fill(img, _face_outline(cx, cy, a, b, male), _col(skin))
    if not f["No_Beard"]:
        jaw = _face_outline(cx, cy, a * 1.01, b * 1.01, male)[2:23]  # right -> chin -> left
        inner = _arc(cx, cy + 0.5 * b, 0.62 * a, 0.3 * b, np.pi, 0, 16)  # left -> under the mouth -> right
        _fill(img, np.concatenate([jaw, inner]), _col(hair, 0.85))
    ny = cy + 0.3 * b
    _fill(img, _arc(cx, ny, 0.1 * a, 0.055 * b, n=16), _col(skin, 0.85))
    ridge = np.array([[cx + 0.02 * a, cy - 0.02 * b], [cx + 0.07 * a, ny - 0.02 * b]])
    _line(img, ridge, _col(skin, 0.8), 0.006)
    for side in (-1, 1):
        _fill(img, _arc(cx + side * 0.06 * a, ny + 0.03 * b, 0.03 * a, 0.018 * b, n=10), _col(skin, 0.55))


def _eyes(f: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """Eye height, half-separation, half-width and half-height."""
    ew = f["eye_w"] * f["face_a"]
    ey = f["face_y"] - 0.1 * f["face_b"] + f["eye_dy"]
    return ey, f["eye_sep"] * f["face_a"], ew, ew * f["eye_aspect"]


def _draw_features(img: np.ndarray, f: Mapping[str, Any], hair: np.ndarray) -> None:
    """Mustache, mouth, eyes and eyebrows."""
    cx, b, male, skin = f["face_x"], f["face_b"], bool(f["Male"]), np.asarray(f["skin"], float)
    _, my, mw = _mouth_geometry(f)
    if f["Mustache"]:  # drawn under the mouth so that the mouth stays fully visible
        u = _lin(15)
        y = my - 0.43 * mw - 0.05 * b + 0.06 * b * u**2
        _fill(img, _band(cx + 1.1 * mw * u, y, (0.028 * b + 0.012) * (1 - 0.5 * u**2)), _col(hair, 0.8))
    for poly, color in _mouth_parts(f, bool(f["Smiling"]), bool(f["Mouth_Slightly_Open"])):
        _fill(img, poly, color)
    ey, es, ew, eh = _eyes(f)
    brow = _col(hair, 0.7 if f["Blond_Hair"] else 0.8)
    u = _lin(11)
    for side in (-1, 1):
        ex = cx + side * es
        _fill(img, _arc(ex, ey, ew, eh, n=20), (242.0, 240.0, 236.0))
        _fill(img, _arc(ex, ey, eh * 0.95, eh * 0.95, n=14), _col(f["iris"]))
        _fill(img, _arc(ex, ey, eh * 0.45, eh * 0.45, n=10), (15.0, 12.0, 12.0))
        _line(img, _arc(ex, ey, ew, eh, np.pi, 2 * np.pi, 10), _col(skin, 0.45), 0.008)
        # male brows: thicker and flatter; the outer end tapers
        arch = (0.2 if male else 0.45) * ew * (1 - u**2)
        by = ey - eh - (0.55 if male else 0.75) * ew - arch
        th = (0.3 * eh + 0.006 if male else 0.12 * eh + 0.004) * (1 - 0.35 * u * side)
        _fill(img, _band(ex + side * (0.1 * ew + 1.15 * ew * u), by, th), brow)


def _draw_top(img: np.ndarray, f: Mapping[str, Any], hair: np.ndarray) -> None:
    """Hair over the head with its hairline, bangs, glasses and hat, each over what came before."""
    cx, cy, a, b, male = f["face_x"], f["face_y"], f["face_a"], f["face_b"], bool(f["Male"])
    vol, _ = _hair_volume_length(f)
    sd = 0.12 if male else 0.25  # how far down the sides the hair reaches
    hl, inner_c, ia = cy - (0.68 if male else 0.62) * b, cy + 0.1 * b, 0.9 * a
    outer = _arc(cx, cy, a * vol, b * vol, np.pi - sd, 2 * np.pi + sd, 28)
    _fill(img, np.concatenate([outer, _arc(cx, inner_c, ia, inner_c - hl, 2 * np.pi, np.pi, 20)]), _col(hair))
    ey, es, ew, eh = _eyes(f)
    if f["Bangs"]:  # a zigzag fringe from the hairline down to the brows, with a few strands
        xs = np.linspace(cx - 0.85 * ia, cx + 0.85 * ia, 15)
        y_top = inner_c - (inner_c - hl) * np.sqrt(np.clip(1 - ((xs - cx) / ia) ** 2, 0, 1)) - 0.01
        zigzag = 0.05 * b * (np.arange(15) % 2)
        y_fr = ey - eh - 0.75 * ew - 0.04 * b + 0.06 * b * ((xs - cx) / ia) ** 2 + zigzag
        _fill(img, _between(xs, y_top, np.maximum(y_fr, y_top)), _col(hair, 0.95))
        for j in (3, 6, 8, 11):
            _line(img, np.array([[xs[j], y_top[j] + 0.01], [xs[j + 1], y_fr[j + 1]]]), _col(hair, 0.75), 0.006)
    if f["Eyeglasses"]:
        gc, rx, ry = _col(f["glasses_color"]), ew * 1.45, ew * 1.1
        for side in (-1, 1):
            ex = cx + side * es
            _line(img, _arc(ex, ey, rx, ry, n=24), gc, 0.012, closed=True)
            arm = np.array([[ex + side * rx, ey - 0.2 * ry], [cx + side * a * 0.98, ey - 0.3 * ry]])
            _line(img, arm, gc, 0.01)
        _line(img, np.array([[cx - es + rx, ey - 0.3 * ry], [cx + es - rx, ey - 0.3 * ry]]), gc, 0.01)
    if f["Wearing_Hat"]:
        hc = np.asarray(f["hat_color"], float)
        if int(f["hat_style"]) == 0:  # beanie with a folded rim
            _fill(img, _arc(cx, cy - 0.48 * b, a * 1.18, b * 0.82, np.pi, 2 * np.pi, 24), _col(hc))
            _fill(img, _rect(cx - 1.18 * a, cy - 0.59 * b, cx + 1.18 * a, cy - 0.41 * b), _col(hc, 0.8))
        else:  # crown, ribbon and brim
            crown = _arc(cx, cy - 1.05 * b, 0.85 * a, 0.32 * b, np.pi, 2 * np.pi, 16)
            brim_line = [[cx + 0.95 * a, cy - 0.55 * b], [cx - 0.95 * a, cy - 0.55 * b]]
            _fill(img, np.concatenate([crown, brim_line]), _col(hc))
            _fill(img, _rect(cx - 0.93 * a, cy - 0.74 * b, cx + 0.93 * a, cy - 0.62 * b), _col(hc, 0.5))
            _fill(img, _arc(cx, cy - 0.56 * b, 1.55 * a, 0.09 * b, n=28), _col(hc, 0.85))


def render_face(f: Mapping[str, Any], image_size: int, noise_std: float = 0.0) -> np.ndarray:
    """Render one row of factors (a mapping of Python scalars/lists) -> uint8 [H, W, 3] RGB."""
    size = int(image_size)
    g, ang = _lin(size * _SS, np.float32), f["bg_angle"]
    t = np.clip(0.5 + 0.5 * np.cos(ang) * g[None, :] + 0.5 * np.sin(ang) * g[:, None], 0, 1)
    img = cv2.merge([cv2.convertScaleAbs(t, alpha=c1 - c0, beta=c0)
                     for c0, c1 in zip(f["bg0"], f["bg1"], strict=True)])
    hair = _hair_color(f)
    _draw_head(img, f, hair)
    _draw_features(img, f, hair)
    _draw_top(img, f, hair)

    # Lighting and noise are pixel-wise and attribute-free, so they keep every attribute's change local.
    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    gs, ang = _lin(size, np.float32), f["light_angle"]
    out *= (1 + f["light_strength"] * (np.cos(ang) * gs[None, :] + np.sin(ang) * gs[:, None]))[..., None]
    if noise_std > 0:
        # triangular noise (the sum of two uniform bytes) with std noise_std: Gaussian sampling would
        # dominate the render time
        rng = np.random.default_rng(int(f["noise_seed"]))
        u = np.frombuffer(rng.bytes(2 * size * size * 3), np.uint8).reshape(2, size, size, 3)
        noise = u[0].astype(np.float32) + u[1] - np.float32(255)
        out += noise * np.float32(255 * noise_std / _TRIANGULAR_STD)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _row(factors: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    return {k: np.asarray(v)[i].tolist() for k, v in factors.items()}


def render_faces(factors: Mapping[str, np.ndarray], image_size: int, noise_std: float = 0.0) -> np.ndarray:
    """Render a batch of factor rows (arrays with a leading N) -> uint8 [N, H, W, 3] RGB."""
    n = len(factors["Smiling"])
    out = np.empty((n, image_size, image_size, 3), np.uint8)
    for i in range(n):
        out[i] = render_face(_row(factors, i), image_size, noise_std)
    return out


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """The one JPEG encoder of the dataset (Pillow, 4:4:4 chroma so thin coloured strokes survive)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality), subsampling=0)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode as a Pillow-based loader does (``Image.open(f).convert("RGB")``) -> uint8 [H, W, 3]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def load_factors(root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read ``<root>/factors.npz`` -> (factors, builder parameters); rows align with list_attr_celeba.txt."""
    return read_factors_npz(Path(root) / FACTORS_FILE, "build the synthetic faces first (SyntheticFacesBuilder.build).")


def _binary(name: str, value: Any, n: int) -> np.ndarray:
    v = intervention_values(name, value, n)
    if not np.isin(v, (-1.0, 0.0, 1.0)).all():
        raise ValueError(f"do[{name!r}] values must be bools, 0/1 or -1/1")
    return (v > 0).astype(np.int8)


class SyntheticFacesBuilder:
    """Writes (and caches) the synthetic faces in CelebA's layout and renders true counterfactuals.

    Files in ``root``: ``img_align_celeba/%06d.jpg`` (1-based, exactly ``image_size`` square, JPEG by
    ``encode_jpeg``), ``list_attr_celeba.txt`` (all 40 columns, unmodelled ones -1),
    ``list_eval_partition.txt`` (the first ``n_train`` rows 0, the next ``n_val`` 1, the last ``n_test`` 2;
    rows are i.i.d. so no shuffle is needed), ``factors.npz`` (one array per factor plus ``_params``, the
    parameters as JSON) and ``builder.json`` (parameters and format version, written last so that an
    interrupted build is never taken for a complete one). All arguments are JSON-serialisable.
    ``correlations`` is a partial dict of ``FaceCorrelations`` fields (None -> defaults).
    """

    def __init__(self, n_train: int = 20000, n_val: int = 2000, n_test: int = 2000, image_size: int = 64,
                 seed: int = 0, correlations: Mapping[str, float] | None = None, jpeg_quality: int = 95,
                 noise_std: float = 0.02) -> None:
        if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test == 0:
            raise ValueError("split sizes must be >= 0 with at least one image")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        self.n_train, self.n_val, self.n_test = int(n_train), int(n_val), int(n_test)
        self.image_size, self.seed = int(image_size), int(seed)
        self.correlations = _as_correlations(correlations)
        self.jpeg_quality, self.noise_std = int(jpeg_quality), float(noise_std)
        self.render_count = 0  # images rendered by build(); tests use it to see the cache at work
        self._factors: dict[Path, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}

    @property
    def params(self) -> dict[str, Any]:
        return {"n_train": self.n_train, "n_val": self.n_val, "n_test": self.n_test,
                "image_size": self.image_size, "seed": self.seed, "correlations": asdict(self.correlations),
                "jpeg_quality": self.jpeg_quality, "noise_std": self.noise_std}

    @property
    def n_images(self) -> int:
        return self.n_train + self.n_val + self.n_test

    def filenames(self) -> list[str]:
        return [f"{i + 1:06d}.jpg" for i in range(self.n_images)]

    def sample_factors(self) -> dict[str, np.ndarray]:
        return sample_factors(self.n_images, self.seed, self.correlations)

    def is_built(self, root: str | Path) -> bool:
        """True when ``root`` holds a complete build with exactly these parameters."""
        root = Path(root)
        if not read_manifest(root, MANIFEST_FILE, FORMAT_VERSION, self.params, (ATTR_FILE, PARTITION_FILE, FACTORS_FILE)):
            return False
        names = self.filenames()
        img_dir = root / IMAGE_DIR
        return (img_dir.is_dir() and len(os.listdir(img_dir)) == len(names)
                and (img_dir / names[0]).is_file() and (img_dir / names[-1]).is_file())

    def build(self, root: str | Path) -> Path:
        """Write the dataset into ``root`` unless an identical build is already there; returns ``root``."""
        root = Path(root)
        if self.is_built(root):
            return root
        ours = (root / MANIFEST_FILE).exists() or (root / FACTORS_FILE).exists()
        if not ours and ((root / IMAGE_DIR).exists() or (root / ATTR_FILE).exists()):
            raise DatasetError(f"{root} holds a CelebA-like dataset that this builder did not write; "
                               f"refusing to overwrite it. Point the synthetic faces at an empty folder.")
        (root / MANIFEST_FILE).unlink(missing_ok=True)
        shutil.rmtree(root / IMAGE_DIR, ignore_errors=True)
        for name in (ATTR_FILE, PARTITION_FILE, FACTORS_FILE):
            (root / name).unlink(missing_ok=True)
        self._factors.pop(root.resolve(), None)

        # factors.npz first: from then on a partial build is recognisably ours and gets overwritten
        root.mkdir(parents=True, exist_ok=True)
        factors = self.sample_factors()
        np.savez(root / FACTORS_FILE, _params=np.array(json.dumps(self.params)), **factors)
        (root / IMAGE_DIR).mkdir()
        names = self.filenames()
        write_attributes(root / ATTR_FILE, names, celeba_attributes(factors))
        partition = np.repeat([0, 1, 2], [self.n_train, self.n_val, self.n_test])
        write_partition(root / PARTITION_FILE, names, partition)
        for i in tqdm(range(self.n_images), desc=f"Rendering synthetic faces into {root}", unit="img"):
            img = render_face(_row(factors, i), self.image_size, self.noise_std)
            (root / IMAGE_DIR / names[i]).write_bytes(encode_jpeg(img, self.jpeg_quality))
            self.render_count += 1
        manifest = {"format_version": FORMAT_VERSION, "params": self.params}
        (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return root

    def load_factors(self, root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``load_factors(root)``, cached on this instance."""
        key = Path(root).resolve()
        if key not in self._factors:
            self._factors[key] = load_factors(key)
        return self._factors[key]

    def render(self, factors: Mapping[str, Any]) -> np.ndarray:
        """Render a row (scalars -> [H, W, 3]) or a batch (arrays -> [N, H, W, 3]) with this builder's
        image size and noise; no JPEG."""
        if np.ndim(factors["Smiling"]) == 0:
            return render_face(_row({k: np.asarray(v)[None] for k, v in factors.items()}, 0),
                               self.image_size, self.noise_std)
        return render_faces(factors, self.image_size, self.noise_std)

    def true_counterfactual(self, root: str | Path, indices: Any, do: Mapping[str, Any],
                            jpeg_roundtrip: bool = True) -> np.ndarray:
        """The images at ``indices`` (0-based rows of list_attr_celeba.txt) re-rendered with the attributes
        in ``do`` set and every other factor, noise included, unchanged -> uint8 [N, H, W, 3] RGB.

        ``do`` maps a modelled attribute (``MODELLED_ATTRIBUTES``, CelebA meaning: ``No_Beard=0`` draws a
        beard) to a scalar or a length-N array of bools, 0/1 or -1/1 (numpy, lists or CPU tensors). The
        intervention sets only what it names: do(Smiling=1) leaves Mouth_Slightly_Open, although correlated
        with Smiling in the data, as it was, and do(Male=0) keeps a beard; the one exception is hair
        colour, a single categorical variable, so setting Black_Hair or Blond_Hair to 1 clears the other
        unless ``do`` sets it too (both 1 is an error). Rendering uses the parameters stored in ``root``.
        With ``jpeg_roundtrip`` the images go through the dataset's JPEG encoder and a Pillow decode, so an
        empty or no-op intervention returns exactly the stored file as ``Image.open(f).convert("RGB")``
        decodes it.
        """
        factors, params = self.load_factors(root)
        idx = row_indices(indices, len(factors["Smiling"]), f"the dataset in {root}")
        unknown = [k for k in do if k not in MODELLED_ATTRIBUTES]
        if unknown:
            raise ValueError(f"cannot intervene on {unknown}: the synthetic faces model only "
                             f"{', '.join(MODELLED_ATTRIBUTES)}")
        rows = {k: v[idx].copy() for k, v in factors.items()}
        values = {k: _binary(k, v, len(idx)) for k, v in do.items()}
        for mine, other in (("Black_Hair", "Blond_Hair"), ("Blond_Hair", "Black_Hair")):
            if mine in values and other in values and (values[mine] & values[other]).any():
                raise ValueError("Black_Hair and Blond_Hair cannot both be 1: hair colour is one variable")
            if mine in values and other not in values:
                rows[other] = np.where(values[mine] == 1, 0, rows[other]).astype(np.int8)
        rows.update(values)
        images = render_faces(rows, params["image_size"], params["noise_std"])
        if jpeg_roundtrip:
            for i in range(len(images)):
                images[i] = decode_jpeg(encode_jpeg(images[i], params["jpeg_quality"]))
        return images


def preview_grid(path: str | Path, n: int = 32, image_size: int = 64, seed: int = 0, pairs: int = 8
                 ) -> np.ndarray:
    """Save a PNG of ``n`` sampled faces followed by ``pairs`` factual | do(Smiling = flipped) pairs."""
    factors = sample_factors(n + pairs, seed)
    faces = list(render_faces({k: v[:n] for k, v in factors.items()}, image_size, 0.02))
    for i in range(n, n + pairs):
        row = _row(factors, i)
        flipped = dict(row, Smiling=1 - row["Smiling"])
        faces += [render_face(row, image_size, 0.02), render_face(flipped, image_size, 0.02)]
    return save_grid(path, faces, cols=8)


def main(argv: list[str] | None = None) -> int:
    """``python -m datamodules.synthetic.faces [--root DIR] [--n-train N] ...`` (``make data-faces``)."""
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic faces in CelebA's layout (cached).")
    parser.add_argument("--root", default=None, help="default: data/synthetic_faces_<size>px_<n-train>_seed<seed>, as data=synthetic_faces")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-val", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", default=None, help="also save a PNG grid of faces and Smiling flips here")
    args = parser.parse_args(argv)
    root = args.root or f"data/synthetic_faces_{args.image_size}px_{args.n_train}_seed{args.seed}"
    builder = SyntheticFacesBuilder(args.n_train, args.n_val, args.n_test, args.image_size, args.seed)
    print(f"synthetic faces in {builder.build(root)}")
    if args.preview:
        preview_grid(args.preview, image_size=args.image_size, seed=args.seed)
        print(f"preview: {args.preview}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
