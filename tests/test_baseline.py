import numpy as np
import pytest
from skimage.color import rgb2gray
from skimage.feature import hog, local_binary_pattern

from wsicell.analysis.metrics import clustering_score
from wsicell.learning.baseline import (
    baseline_clusters,
    colour_histograms,
    grayscale,
    handmade_features,
    hog_features,
    uniform_lbp,
)


def _nucleus_crops(n, colour, radius, seed):
    """White 32x32 crops holding one noisy disc of the given colour and radius."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    crops = np.full((n, 32, 32, 3), 255, np.uint8)
    for crop in crops:
        cy, cx = rng.uniform(13, 19, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        crop[disc] = np.clip(np.asarray(colour) + rng.normal(0, 12, (disc.sum(), 3)), 0, 255)
    return crops


@pytest.fixture(scope="module")
def crops():
    return np.concatenate([_nucleus_crops(40, (70, 40, 120), 6, 0),
                           _nucleus_crops(40, (200, 120, 170), 11, 1)])


def test_grayscale_matches_skimage(crops):
    np.testing.assert_allclose(grayscale(crops[:3])[1], rgb2gray(crops[1]))


def test_lbp_equals_skimage(crops):
    gray = grayscale(crops[:10])
    expected = np.stack([local_binary_pattern((g * 255).round().astype(np.uint8), 8, 1, "uniform")
                         for g in gray])
    got = uniform_lbp((gray * 255).round())
    np.testing.assert_array_equal(got, expected)


def test_hog_equals_skimage(crops):
    gray = grayscale(crops[:10])
    expected = np.stack([hog(g, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2),
                             block_norm="L2-Hys") for g in gray])
    np.testing.assert_allclose(hog_features(gray), expected, atol=1e-6)


def test_colour_histograms_are_fractions(crops):
    hist = colour_histograms(crops, bins=16)
    assert hist.shape == (80, 48)
    np.testing.assert_allclose(hist.reshape(80, 3, 16).sum(axis=2), 1.0, rtol=1e-6)
    white = colour_histograms(np.full((1, 4, 4, 3), 255, np.uint8), bins=16)[0]
    assert white[15] == white[31] == white[47] == 1.0


def test_features_do_not_depend_on_batching(crops):
    np.testing.assert_array_equal(handmade_features(crops, batch_size=7), handmade_features(crops))


def test_baseline_separates_two_cell_types(crops):
    classes = np.repeat([0, 1], 40)
    clusters = baseline_clusters(crops, k=2, seed=0)
    assert clustering_score(clusters, classes).purity >= 0.95


def test_bad_crops_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        handmade_features(np.zeros((2, 32, 32), np.uint8))
