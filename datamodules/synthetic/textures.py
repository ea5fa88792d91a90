"""Procedural stand-ins for Wildlife MNIST's textures: 10 striped object textures and 10 veined backgrounds.

The CGN paper's Wildlife MNIST pastes crops of 20 photographs from the Describable Textures Dataset (class i:
one "striped" object texture and one "veined" background). We draw our own instead, so nothing is downloaded
and no licence applies; they play the same role (a class-specific object texture and background whose
colours and patterns, not the digit's shape, give the class away in training) but are not the same images.

* ``striped_textures``: texture k has stripes at angle 18°·((7k) mod 10) with period 4-8.5 px, meandering
  by a smooth random phase, alternating a bright colour of hue k/10 and a dark, slightly shifted hue, with a
  faint grain.
* ``veined_textures``: texture k is a mottled, muted colour of hue (k/10 + 0.55) crossed by a network of
  thin veins (the zero set of a smooth random field, plus a finer second network), lighter than the base
  for even k and darker for odd k, at a class-specific scale.

Both are a function of ``(size, seed)`` alone (``numpy.random.default_rng`` streams and scipy filters), in
[0, 1], float32 [10, size, size, 3]. ``crop`` cuts one window per image, vectorised.
"""

from __future__ import annotations

import colorsys
import functools

import numpy as np
from scipy.ndimage import gaussian_filter

NUM_TEXTURES = 10
TEXTURE_SIZE = 96


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """A periodic Gaussian random field, standardised to zero mean and unit std."""
    field = gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (field - field.mean()) / field.std()


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float64)


def striped_textures(size: int = TEXTURE_SIZE, seed: int = 0) -> np.ndarray:
    """The 10 object textures, float32 [10, size, size, 3] in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    periods = (4.0, 5.0, 6.0, 7.0, 8.0, 4.5, 5.5, 6.5, 7.5, 8.5)
    out = np.empty((NUM_TEXTURES, size, size, 3), dtype=np.float32)
    for k in range(NUM_TEXTURES):
        rng = np.random.default_rng([seed, 0, k])
        angle = np.pi * ((7 * k) % NUM_TEXTURES) / NUM_TEXTURES
        u = xx * np.cos(angle) + yy * np.sin(angle)
        phase = 2 * np.pi * u / periods[k] + 1.5 * _smooth_noise(rng, size, size / 8)
        # tanh of a sine: nearly square stripes with soft edges.
        stripe = 0.5 + 0.5 * np.tanh(3.0 * np.sin(phase))
        bright, dark = _hsv(k / 10, 0.85, 1.0), _hsv(k / 10 + 0.05, 0.9, 0.3)
        rgb = stripe[..., None] * bright + (1 - stripe[..., None]) * dark
        rgb += 0.04 * _smooth_noise(rng, size, 0.7)[..., None]
        out[k] = np.clip(rgb, 0.0, 1.0)
    return out


def veined_textures(size: int = TEXTURE_SIZE, seed: int = 0) -> np.ndarray:
    """The 10 background textures, float32 [10, size, size, 3] in [0, 1]."""
    scales = (6.0, 9.0, 12.0, 7.0, 10.0, 14.0, 8.0, 11.0, 5.0, 13.0)
    out = np.empty((NUM_TEXTURES, size, size, 3), dtype=np.float32)
    for k in range(NUM_TEXTURES):
        rng = np.random.default_rng([seed, 1, k])
        hue = k / 10 + 0.55
        base = _hsv(hue, 0.6, 0.6)
        vein_colour = _hsv(hue, 0.25, 0.95) if k % 2 == 0 else _hsv(hue + 0.03, 0.8, 0.2)
        # Near the zero set of a smooth field the Gaussian is ~1: a connected network of thin curves.
        veins = np.exp(-(_smooth_noise(rng, size, scales[k]) / 0.18) ** 2)
        fine = np.exp(-(_smooth_noise(rng, size, scales[k] / 2.5) / 0.12) ** 2)
        v = np.maximum(veins, 0.6 * fine)[..., None]
        mottle = 1.0 + 0.1 * _smooth_noise(rng, size, size / 6)[..., None]
        rgb = (1 - v) * base * mottle + v * vein_colour
        out[k] = np.clip(rgb, 0.0, 1.0)
    return out


@functools.cache
def wildlife_textures(size: int = TEXTURE_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(object textures, background textures), generated once per process; treat as read-only."""
    obj, bg = striped_textures(size, seed), veined_textures(size, seed)
    obj.flags.writeable = False
    bg.flags.writeable = False
    return obj, bg


def crop(textures: np.ndarray, ids: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """Window ``[oy:oy+size, ox:ox+size]`` of texture ``ids[i]`` for every i, channels first: [N, 3, size, size].

    :param textures: [K, T, T, 3] as made by this module.
    :param offsets: int [N, 2] (row, column) of each window's top-left corner, within the texture.
    """
    ids, offsets = np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    if len(offsets) and (offsets.min() < 0 or offsets.max() > textures.shape[1] - size):
        raise ValueError(f"crop offsets must lie in [0, {textures.shape[1] - size}], got "
                         f"[{offsets.min()}, {offsets.max()}]")
    # A view [K, T-size+1, T-size+1, 3, size, size] of every window; indexing it copies whole windows.
    windows = np.lib.stride_tricks.sliding_window_view(textures, (size, size), axis=(1, 2))
    return windows[ids, offsets[:, 0], offsets[:, 1]]
