"""Morpho-MNIST morphometrics of 28 x 28 digits (Castro et al., JMLR 2019); the perturbations that change
them are in ``datamodules.perturbations``.

Measurement protocol (``measure``), as Morpho-MNIST's ``measure_image`` describes it:

1. upscale x``scale`` (4) with a cubic ``pyramid_expand``; a uint8 digit is brought back to uint8 (x255);
2. binarise at ``min + threshold * (max - min)`` (relative threshold 0.5);
3. ``medial_axis(return_distance=True, rng=42)`` gives the skeleton and the distance transform; then
   thickness = 2 * mean(distance on the skeleton) / scale, length = the skeleton's chain length (3 x 3
   kernel: the right and lower neighbours weigh 1, the lower diagonals sqrt 2) / scale, area = number of
   binary pixels / scale**2;
4. slant = arctan(-mu11 / mu02), second-order central moments of the upscaled grey levels with x the column
   and y the row (y grows downwards, so a digit leaning right has a positive slant); width and height are the
   sides of the shear-aligned parallelogram that leaves out 1 % of the grey-level mass on each side, each
   pixel's mass spread over its own unit extent; both / scale;
5. intensity = median of the ORIGINAL-resolution pixels at or above ``min + threshold * (max - min)`` (the
   Deep-SCM convention).

On Morpho-MNIST's reference digit (the first MNIST training image) this gives area 107.19 (released 107.31),
length 47.75 (50.27), thickness 2.525 (2.461), slant 0.2316 (0.2311), width 14.50 (14.54), height 19.89
(19.85). The released values come from an earlier scikit-image (medial axis and resampling have changed
since); the differences are a few per cent, and Morpho-MNIST's own tests accept rtol 0.5. On the 10,000
published Deep-SCM test digits, the measured intensity is within 0.5 of the sampled one on average and the
measured thickness correlates with the sampled one at r = 0.97
(``python -m benchmarks.morphometrics_agreement``).

Speed: scikit-image's ``medial_axis`` rebuilds its 512-entry neighbourhood tables in Python on every call
(about 80 ms on 112 x 112, nearly all of a measurement). ``_medial_axis`` builds the same tables once and runs
the same ordering and the same compiled thinning loop, so the skeleton is identical (the tests compare
them); a whole measurement then takes about 3 ms. If the private loop ever moves, the public function is
used. ``measure_batch`` spreads images over a process pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import astuple, dataclass, fields
from functools import cache
from multiprocessing import get_all_start_methods, get_context

import numpy as np
from scipy import ndimage
from skimage.morphology import medial_axis
from threadpoolctl import ThreadpoolController
from tqdm import tqdm

try:  # the compiled single-pass thinning loop behind skimage.morphology.medial_axis
    from skimage.morphology._skeletonize import _skeletonize_loop
except ImportError:  # pragma: no cover - a future scikit-image; the public function is used instead
    _skeletonize_loop = None

MEASURE_SCALE = 4
DEEPSCM_SCALE = 16  # the Deep-SCM thickness/intensity data were made at 16x magnification
THRESHOLD = 0.5
MEDIAL_AXIS_SEED = 42

# The stroke-length kernel: each 8-connected skeleton edge is counted once, diagonals weigh sqrt 2.
_LENGTH_KERNEL = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [np.sqrt(2.0), 1.0, np.sqrt(2.0)]])


@dataclass(frozen=True)
class Morphometrics:
    """Morpho-MNIST's shape descriptors of one digit, in original (28 px) pixel units; slant in radians."""

    area: float
    length: float
    thickness: float
    slant: float
    width: float
    height: float
    intensity: float

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def as_tuple(self) -> tuple[float, ...]:
        return astuple(self)


# --------------------------------------------------------------------------------------------------------
# Skeleton and the high-resolution view of a digit
# --------------------------------------------------------------------------------------------------------


@cache
def _thinning_table() -> np.ndarray:
    """The thinning loop's table over the 512 3 x 3 patterns (1: keep the centre pixel).

    Pattern ``k`` has pixel ``(b // 3, b % 3)`` set when bit ``b`` of ``k`` is, so bit 4 is the centre. The
    loop keeps a pixel whose table entry is 1: the centre is set and either fewer than three pixels of
    the pattern are, or deleting the centre changes the number of 8-connected components.
    """
    keep = np.zeros(512, np.uint8)
    eight = np.ones((3, 3), bool)
    for k in range(512):
        pattern = np.array([(k >> b) & 1 for b in range(9)], bool).reshape(3, 3)
        if not pattern[1, 1]:
            continue
        without = pattern.copy()
        without[1, 1] = False
        changes = ndimage.label(pattern, eight)[1] != ndimage.label(without, eight)[1]
        keep[k] = changes or pattern.sum() < 3
    return keep


def ink_box(binary: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The bounding box of ``binary``'s set pixels grown by ``margin`` (clipped to the image)."""
    rows, cols = np.nonzero(binary.any(axis=1))[0], np.nonzero(binary.any(axis=0))[0]
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return (slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
            slice(max(cols[0] - margin, 0), cols[-1] + margin + 1))


def _medial_axis(binary: np.ndarray, rng: int = MEDIAL_AXIS_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``skimage.morphology.medial_axis(binary, return_distance=True, rng=rng)``, with cached tables.

    Computed on the shape's bounding box plus one background pixel, which changes nothing: the distance
    transform, the neighbourhood counts, the foreground pixels' row-major order (hence the seeded
    tie-break) and the thinning loop only ever look at that box.
    """
    binary = np.asarray(binary, bool)
    if _skeletonize_loop is None or min(binary.shape) < 3:
        return medial_axis(binary, return_distance=True, rng=rng)
    box = ink_box(binary, 1)
    crop = binary[box]
    if min(crop.shape) < 3 or crop.size == binary.size:
        skeleton, distance = _medial_axis_full(binary, rng)
    else:
        skeleton, distance = np.zeros(binary.shape, bool), np.zeros(binary.shape)
        skeleton[box], distance[box] = _medial_axis_full(crop, rng)
    return skeleton, distance


def _medial_axis_full(binary: np.ndarray, rng: int) -> tuple[np.ndarray, np.ndarray]:
    keep = _thinning_table()
    distance = ndimage.distance_transform_edt(binary)
    # 9 - (number of set pixels in the 3 x 3 neighbourhood, zero padded): the "cornerness" ordering key.
    corner = 9 - ndimage.correlate(binary.astype(np.int64), np.ones((3, 3), np.int64), mode="constant")
    ii, jj = np.nonzero(binary)
    tiebreak = np.random.default_rng(rng).permutation(np.arange(ii.size))
    order = np.lexsort((tiebreak, corner[ii, jj], distance[ii, jj])).astype(np.int32)
    result = np.ascontiguousarray(binary, np.uint8)
    _skeletonize_loop(result, ii.astype(np.intp), jj.astype(np.intp), order, keep)
    return result.astype(bool), distance


def relative_threshold(image: np.ndarray, threshold: float = THRESHOLD) -> float:
    """``min + threshold * (max - min)`` of ``image``: Morpho-MNIST's binarisation level."""
    lo, hi = float(image.min()), float(image.max())
    return lo + threshold * (hi - lo)


@cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _one_blas_thread():
    """Products this small run ~10x slower when OpenBLAS spreads them over busy cores (and pool workers
    already use every core), so they run on one thread."""
    return _blas_controller().limit(limits=1, user_api="blas")


@cache
def _zoom_operator(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of the cubic-spline resize that ``skimage.transform.resize`` performs along one
    axis (``ndimage.zoom``, order 3, ``mirror`` boundaries, grid mode): the zoom of the identity's columns."""
    op = ndimage.zoom(np.eye(n_in), (n_out / n_in, 1), order=3, mode="mirror", grid_mode=True)
    op[np.abs(op) < 1e-12] = 0.0  # the spline's far tails (down to 1e-245) only slow the products down
    return op


@cache
def _reduce_operator(n_in: int, scale: int) -> np.ndarray:
    """[n_in / scale, n_in] matrix of ``pyramid_reduce(order=3)`` along one axis: Gaussian smoothing
    (sigma = scale / 3, ``reflect``, truncated at 4 sigma), then the cubic resize."""
    smooth = ndimage.gaussian_filter1d(np.eye(n_in), 2 * scale / 6, axis=0, mode="reflect", truncate=4.0)
    return _zoom_operator(n_in, -(-n_in // scale)) @ smooth


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """``pyramid_expand(image, scale, order=3)``; a uint8 image comes back as uint8 (x255, truncated, as
    Morpho-MNIST does), anything else as float in its own range.

    Computed as scikit-image does (cubic resize clipped to the input's range, then a Gaussian of sigma
    scale / 3), with the separable resize as two small matrix products: the same grey levels as
    ``pyramid_expand`` (tested; floats agree to 1e-12 of their range), several times faster at scale 16.
    """
    image = np.asarray(image)
    if scale == 1:
        return image.copy()
    x = image / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    rows, cols = _zoom_operator(x.shape[0], x.shape[0] * scale), _zoom_operator(x.shape[1], x.shape[1] * scale)
    with _one_blas_thread():
        big = np.clip(rows @ x @ cols.T, x.min(), x.max())
    big = ndimage.gaussian_filter(big, 2 * scale / 6, mode="reflect", truncate=4.0)
    return (255.0 * big).astype(np.uint8) if image.dtype == np.uint8 else big


def downscale(image: np.ndarray, scale: int, canvas: tuple[int, int] | None = None,
              offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A high-resolution image in [0, 1] (e.g. a binary mask) -> uint8 at 1/``scale``: cubic
    ``pyramid_reduce`` (one matrix product per axis; within one grey level of scikit-image's, tested),
    x255, rounded.

    ``image`` may be a window of a larger zero canvas of shape ``canvas`` whose top-left corner sits at
    ``offset``: the result is that of the whole canvas, computed from the window alone.
    """
    x = np.asarray(image, np.float64)
    height, width = canvas or x.shape
    (r0, c0), (h, w) = offset, x.shape
    rows = _reduce_operator(height, scale)[:, r0:r0 + h]
    cols = _reduce_operator(width, scale)[:, c0:c0 + w]
    with _one_blas_thread():
        low = rows @ x @ cols.T
    return np.clip(np.rint(255.0 * low), 0, 255).astype(np.uint8)


class Morphology:
    """The high-resolution view of one digit that measurements and perturbations share.

    :param image: 2-D digit (uint8, or float in any range).
    :param scale: magnification of ``hires`` (4 for measurement, 16 as the Deep-SCM data were made).
    :param threshold: relative binarisation level.
    """

    def __init__(self, image: np.ndarray, scale: int = MEASURE_SCALE, threshold: float = THRESHOLD) -> None:
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"expected one 2-D image, got shape {image.shape}")
        self.image, self.scale, self.threshold = image, int(scale), float(threshold)
        self.hires = upscale(image, self.scale)
        self.blank = bool(self.hires.min() == self.hires.max())
        # a blank image has no stroke (every pixel would pass a zero-width threshold)
        level = relative_threshold(self.hires, threshold)
        self.binary = np.zeros(self.hires.shape, bool) if self.blank else self.hires >= level
        self._skeleton: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def skeleton(self) -> np.ndarray:
        return self._medial()[0]

    @property
    def distance(self) -> np.ndarray:
        """Euclidean distance of each foreground pixel to the background (high-resolution pixels)."""
        return self._medial()[1]

    def _medial(self) -> tuple[np.ndarray, np.ndarray]:
        if self._skeleton is None:
            self._skeleton = _medial_axis(self.binary)
        return self._skeleton

    @property
    def thickness(self) -> float:
        """2 * mean distance on the skeleton / scale (0 for a blank image)."""
        skeleton = self.skeleton
        return float(2.0 * self.distance[skeleton].mean() / self.scale) if skeleton.any() else 0.0

    @property
    def length(self) -> float:
        skeleton = self.skeleton.astype(np.float64)
        chained = ndimage.correlate(skeleton, _LENGTH_KERNEL, mode="constant")
        return float((chained * skeleton).sum() / self.scale)

    @property
    def area(self) -> float:
        return float(self.binary.sum() / self.scale**2)

    def downscale(self, hires: np.ndarray) -> np.ndarray:
        return downscale(hires, self.scale)


# --------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------


def intensity(image: np.ndarray, threshold: float = THRESHOLD) -> float:
    """Median of the pixels at or above ``min + threshold * (max - min)`` (Deep-SCM's stroke intensity)."""
    image = np.asarray(image)
    return float(np.median(image[image >= relative_threshold(image, threshold)]))


def _spread_quantiles(coords: np.ndarray, mass: np.ndarray, fracs: Sequence[float]) -> np.ndarray:
    """Quantiles of the distribution that spreads each ``mass[k]`` uniformly over ``coords[k] +- 0.5``.

    Its CDF is piecewise linear with knots at the box edges; the slope rises by ``mass[k]`` at the left
    edge and falls by it at the right edge, so sorting the edges and integrating the slope gives it exactly.
    """
    edges = np.concatenate([coords - 0.5, coords + 0.5])
    steps = np.concatenate([mass, -mass])
    order = np.argsort(edges, kind="stable")
    edges, slope = edges[order], np.cumsum(steps[order])
    cdf = np.concatenate([[0.0], np.cumsum(slope[:-1] * np.diff(edges))])
    return np.interp(np.asarray(fracs) * cdf[-1], cdf, edges)


def _shape_moments(hires: np.ndarray, scale: int, frac: float = 0.01) -> tuple[float, float, float]:
    """(slant, width, height) from the grey-level moments of the high-resolution image."""
    mass = hires.astype(np.float64)
    rows, cols = np.nonzero(mass)
    w = mass[rows, cols]
    y, x = rows.astype(np.float64), cols.astype(np.float64)
    ym, xm = np.average(y, weights=w), np.average(x, weights=w)
    mu11 = np.sum(w * (x - xm) * (y - ym))
    mu02 = np.sum(w * (y - ym) ** 2)
    shear = mu11 / mu02 if mu02 > 0 else 0.0
    left, right = _spread_quantiles(x - shear * (y - ym), w, (frac, 1 - frac))
    top, bottom = _spread_quantiles(y, w, (frac, 1 - frac))
    return float(np.arctan(-shear)), float((right - left) / scale), float((bottom - top) / scale)


def measure(image: np.ndarray, scale: int = MEASURE_SCALE, threshold: float = THRESHOLD) -> Morphometrics:
    """Morpho-MNIST's morphometrics of one 2-D digit (see the module docstring); all NaN for a blank image."""
    morph = Morphology(image, scale, threshold)
    if morph.blank:
        return Morphometrics(*([float("nan")] * len(Morphometrics.names())))
    slant, width, height = _shape_moments(morph.hires, morph.scale)
    return Morphometrics(area=morph.area, length=morph.length, thickness=morph.thickness, slant=slant,
                         width=width, height=height, intensity=intensity(morph.image, threshold))


def measure_thickness(image: np.ndarray, scale: int = MEASURE_SCALE, threshold: float = THRESHOLD) -> float:
    """Only ``measure(image).thickness`` (0 for a blank image), without the other descriptors."""
    return Morphology(image, scale, threshold).thickness


def _measure_tuple(image: np.ndarray, scale: int, threshold: float) -> tuple[float, ...]:
    return measure(image, scale, threshold).as_tuple()


def map_images(fn: Callable, items: Sequence, processes: int | None = None, progress: bool = True,
               chunksize: int = 64, desc: str = "", **kwargs) -> list:
    """``[fn(item, **kwargs) for item in items]`` over a pool of ``processes`` (None: every usable core;
    1: inline), in order, with a tqdm bar. ``fn`` must be a module-level function (it is pickled).

    Workers are forked where the platform allows: a spawned worker re-imports the caller's ``__main__``,
    which for anything that reads IDX files means torch and Lightning (~10 s per worker here). The workers
    run only numpy/scipy/scikit-image code, so they never touch the parent's torch or OpenMP threads.
    """
    n = len(items)
    processes = _usable_cores() if processes is None else int(processes)
    processes = max(1, min(processes, -(-n // max(1, chunksize)) if n else 1))
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, smoothing=0.05)
    try:
        if processes == 1:
            out = []
            for item in items:
                out.append(fn(item, **kwargs))
                bar.update()
            return out
        chunks = [items[i:i + chunksize] for i in range(0, n, chunksize)]
        out = []
        with ProcessPoolExecutor(processes, mp_context=_pool_context()) as pool:
            for result in pool.map(_apply_chunk, [fn] * len(chunks), chunks, [kwargs] * len(chunks)):
                out.extend(result)
                bar.update(len(result))
        return out
    finally:
        bar.close()


def _apply_chunk(fn: Callable, chunk: Iterable, kwargs: dict) -> list:
    return [fn(item, **kwargs) for item in chunk]


def _pool_context():
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def measure_batch(images: np.ndarray, processes: int | None = None, progress: bool = True, chunksize: int = 64,
                  scale: int = MEASURE_SCALE, threshold: float = THRESHOLD) -> dict[str, np.ndarray]:
    """``measure`` of every image of ``images`` [N, H, W] -> ``{name: float64 array [N]}`` in
    ``Morphometrics`` order, over a process pool (``processes=1`` runs inline; None uses every usable core)."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected images [N, H, W], got shape {images.shape}")
    rows = map_images(_measure_tuple, images, processes, progress, chunksize, desc="Measuring morphometrics",
                      scale=scale, threshold=threshold)
    table = np.array(rows, np.float64).reshape(len(images), len(Morphometrics.names()))
    return {name: table[:, k] for k, name in enumerate(Morphometrics.names())}
