"""The synthetic faces' renderer: one row of factors -> an RGB image, drawn procedurally.

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

from collections.abc import Mapping
from functools import cache
from typing import Any

import cv2
import numpy as np

from datamodules.synthetic.common import TRIANGULAR_STD
from datamodules.synthetic.faces_factors import factor_row

_SS = 2  # supersampling factor of the drawing canvas
_SHIFT = 4  # fractional bits of cv2's fixed-point coordinates
_AA = cv2.LINE_AA


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
        out += noise * np.float32(255 * noise_std / TRIANGULAR_STD)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_faces(factors: Mapping[str, np.ndarray], image_size: int, noise_std: float = 0.0) -> np.ndarray:
    """Render a batch of factor rows (arrays with a leading N) -> uint8 [N, H, W, 3] RGB."""
    n = len(factors["Smiling"])
    out = np.empty((n, image_size, image_size, 3), np.uint8)
    for i in range(n):
        out[i] = render_face(factor_row(factors, i), image_size, noise_std)
    return out
