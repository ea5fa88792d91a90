"""The chest phantom's renderer: one row of factors -> an 8-bit grayscale radiograph, frontal or lateral.

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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from datamodules.synthetic.chest_phantom_factors import MODELLED_FINDINGS, cardiothoracic_ratio
from datamodules.synthetic.common import TRIANGULAR_STD

_EDGE_PX = 1.5  # half-width of every soft edge, in output pixels


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
        noise = (u[0].astype(np.float32) + u[1] - np.float32(255)) / np.float32(TRIANGULAR_STD)
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
