"""Does the chest phantom's cardiomegaly show in its pixels? Measure the cardiothoracic ratio from images.

``python -m benchmarks.chest_phantom_ctr [--n 400] [--seed 0] [--size 128]`` renders ``n`` frontal phantom
images exactly as the DataModule serves them (render, JPEG, decode, centre crop, antialiased resize to
``size``), MEASURES each one's CTR by image analysis alone, and reports the ROC AUC of the measured CTR against
the cardiomegaly label, plus how well it tracks the true CTR (read from the factors only to score the
measurement). Acceptance target: AUC > 0.95. Images whose lungs or heart borders are not found are counted as
unmeasurable, reported, and left out of the AUC. The exit status is 1 below the target.

The measurement (``measure_ctr``) is the radiologist's: CTR = widest transverse heart diameter / widest inner
thoracic diameter, both read off lung fields segmented by thresholds.

1. Smooth (Gaussian, 1 px); the body is the largest region brighter than Otsu's threshold over the image.
2. The lungs are the large dark regions inside the body, away from its thin edge (Otsu's threshold over body
   pixels, a 3x3 opening; holes filled and pieces on one side joined, so that an opacity inside a lung does
   not split it), one lung on each side of the body's centre.
3. Inner thorax: the widest row-wise span from the image-left lung's lateral edge to the image-right lung's.
4. Heart: its borders are the lungs' medial edges. Per lung, the medial edge is followed down from below the
   aortic knob to the heart's widest point, and no further: past it the edge recedes, or meets the
   diaphragm and turns outwards again, or jumps to the costophrenic recess (``_heart_border``). The heart
   diameter is the distance between the two extremes, which may sit on different rows, as in the clinical
   definition.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from datamodules.chexpert import preprocess
from datamodules.synthetic.chest_phantom import decode_jpeg, encode_jpeg
from datamodules.synthetic.chest_phantom_factors import cardiothoracic_ratio, sample_phantom
from datamodules.synthetic.chest_phantom_render import render_frontal


def _otsu(values: np.ndarray) -> float:
    hist = np.bincount(values.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return float(np.argmax(between))


def segment_lungs(img: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(image-left lung, image-right lung) boolean masks of a uint8 frontal radiograph, or None."""
    smooth = cv2.GaussianBlur(img, (0, 0), 1.0)
    labels, n = ndimage.label(smooth > _otsu(smooth))
    if n == 0:
        return None
    body = labels == 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(labels), labels, range(1, n + 1))))
    body = ndimage.binary_fill_holes(body)
    # The chest wall thins to nothing at the body's edge, which is as dark as lung: keep away from it.
    inner = ndimage.binary_erosion(body, np.ones((3, 3), bool), iterations=max(1, round(0.05 * img.shape[0])))
    dark = inner & (smooth <= _otsu(smooth[body]))
    dark = ndimage.binary_opening(dark, np.ones((3, 3), bool))
    labels, n = ndimage.label(dark)
    if n < 2:
        return None
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, range(1, n + 1))
    centres = np.array(ndimage.center_of_mass(dark, labels, range(1, n + 1)))[:, 1]
    middle = np.nonzero(body)[1].mean()
    lungs = []
    for on_side in (centres < middle, centres >= middle):
        if not on_side.any() or sizes[on_side].max() < 0.01 * img.size:
            return None
        # An opacity across a lung can cut it in two: every large dark region on a side is that lung.
        keep = 1 + np.flatnonzero(on_side & (sizes >= 0.15 * sizes[on_side].max()))
        lungs.append(ndimage.binary_fill_holes(np.isin(labels, keep)))
    return lungs[0], lungs[1]


def _heart_border(lung: np.ndarray, side: int) -> int | None:
    """Column of the heart's border on ``lung`` (side -1: the image-left lung, whose medial edge is its last
    column; +1: the image-right lung, first column): the extreme of the medial edge, scanning down from 40% of
    the lung's height (below the aortic knob). The heart's border bulges outwards ever more slowly down to its
    widest point; the scan stops when the edge then recedes by 2 px, or speeds up outwards again (slope over 3
    rows up by 1 px/row from its least since the border turned near-vertical: the edge has met the
    diaphragm's lateral slope), jumps outwards (the costophrenic recess under a dome), the lung row splits
    (split rows before the first whole one are skipped: an opacity there), or the lung ends."""
    rows = np.flatnonzero(lung.any(1))
    if len(rows) == 0:
        return None
    jump = max(3, round(lung.shape[1] / 32))
    outs: list[int] = []  # distance of the medial edge from the image centre line, grows outwards
    armed, least_slope = False, np.inf
    for r in range(rows[0] + int(0.4 * (rows[-1] - rows[0])), rows[-1] + 1):
        cols = np.flatnonzero(lung[r])
        if len(cols) == 0 or cols[-1] - cols[0] + 1 != len(cols):
            if outs:
                break
            continue  # an opacity across the first rows: start below it
        out = -int(cols[-1]) if side < 0 else int(cols[0])
        if outs:
            if out <= max(outs) - 2 or out - outs[-1] > jump:
                break
            if len(outs) >= 3:
                slope = (out - outs[-3]) / 3
                if armed and slope >= least_slope + 1:
                    break
                armed = armed or (slope < 1 and max(outs) - outs[0] >= 3)
                if armed:
                    least_slope = min(least_slope, slope)
        outs.append(out)
    if not outs:
        return None
    return -max(outs) if side < 0 else max(outs)


def measure_ctr(img: np.ndarray) -> float:
    """The cardiothoracic ratio of a uint8 frontal radiograph from its pixels alone (nan if the lungs are not
    found)."""
    lungs = segment_lungs(img)
    if lungs is None:
        return float("nan")
    a, b = lungs  # image left (the patient's right), image right
    both = np.flatnonzero(a.any(1) & b.any(1))
    if len(both) == 0:
        return float("nan")
    a_lat = np.array([np.flatnonzero(a[r])[0] for r in both])
    b_lat = np.array([np.flatnonzero(b[r])[-1] for r in both])
    thorax = float((b_lat - a_lat + 1).max())
    left_border, right_border = _heart_border(a, -1), _heart_border(b, 1)
    if left_border is None or right_border is None:
        return float("nan")
    return float(right_border - left_border - 1) / thorax


def frontal_images(n: int, seed: int, size: int, render_size: int = 256, noise_std: float = 0.012,
                   jpeg_quality: int = 90) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` frontal phantom images (one per patient) as the DataModule serves them, and their factors."""
    factors, _ = sample_phantom(2 * n, 0, seed)
    frontal = np.flatnonzero(factors["frontal"] == 1)
    _, first = np.unique(factors["patient"][frontal], return_index=True)
    rows = frontal[first][:n]
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} patients sampled; ask for fewer images")
    images = np.empty((n, size, size), np.uint8)
    for k, i in enumerate(rows):
        f = {key: np.asarray(v)[i].item() for key, v in factors.items()}
        stored = decode_jpeg(encode_jpeg(render_frontal(f, render_size, noise_std), jpeg_quality))
        images[k] = preprocess(Image.fromarray(stored), size, center_crop=True)
    return images, {k: v[rows] for k, v in factors.items()}


def run(n: int = 400, seed: int = 0, size: int = 128) -> dict[str, float]:
    start = time.perf_counter()
    images, factors = frontal_images(n, seed, size)
    render_s = time.perf_counter() - start
    start = time.perf_counter()
    measured = np.array([measure_ctr(img) for img in images])
    measure_s = time.perf_counter() - start
    label = factors["Cardiomegaly"].astype(int)
    true = cardiothoracic_ratio(label, factors["ctr_u"])
    ok = ~np.isnan(measured)
    auc = roc_auc_score(label[ok], measured[ok])
    err = measured[ok] - true[ok]
    return {"n": n, "positives": int(label.sum()), "failed": int((~ok).sum()), "auc": float(auc),
            "corr": float(np.corrcoef(measured[ok], true[ok])[0, 1]), "bias": float(err.mean()),
            "mae": float(np.abs(err).mean()), "render_s": render_s, "measure_s": measure_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="the DataModule's image_size")
    args = parser.parse_args(argv)
    r = run(args.n, args.seed, args.size)
    print(f"chest phantom, {r['n']} frontal images at {args.size} px (seed {args.seed}), "
          f"{r['positives']} with cardiomegaly, {r['failed']} unmeasurable")
    print(f"AUC of the measured CTR vs the cardiomegaly label: {r['auc']:.4f} (target > 0.95)")
    print(f"measured vs true CTR: Pearson r {r['corr']:.3f}, bias {r['bias']:+.3f}, MAE {r['mae']:.3f}")
    print(f"time: render + JPEG + preprocess {r['render_s']:.1f} s, measurement {r['measure_s']:.1f} s")
    return 0 if r["auc"] > 0.95 else 1


if __name__ == "__main__":
    raise SystemExit(main())
