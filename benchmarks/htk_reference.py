"""The paper's nuclei recipe composed from HistomicsTK 1.4.0 calls: the numerical reference.

Not product code: tests and benchmarks compare wsicell's own kernels against it.
HistomicsTK is a test-only dependency (``pip install --no-deps histomicstk==1.4.0``).
"""

from __future__ import annotations

import histomicstk as htk
import numpy as np
import scipy.ndimage
import skimage.measure
import skimage.morphology
import skimage.transform

PAPER_TARGET_MEAN = (8.98, 0.08, 0.02)
PAPER_TARGET_STD = (0.64, 0.11, 0.03)
HEMATOXYLIN = htk.preprocessing.color_deconvolution.stain_color_map["hematoxylin"]


def htk_normalise(rgb: np.ndarray) -> np.ndarray:
    """Reinhard normalisation of an image with its own statistics to the paper's target."""
    return htk.preprocessing.color_normalization.reinhard(rgb, PAPER_TARGET_MEAN, PAPER_TARGET_STD)


def htk_stains(normalised: np.ndarray) -> tuple[np.ndarray, int]:
    """Macenko stain matrix (SDA with I_0 = 256, +1 offset) and its hematoxylin column."""
    w = htk.preprocessing.color_deconvolution.rgb_separate_stains_macenko_pca(normalised, None)
    return w, int(htk.preprocessing.color_deconvolution.find_stain_index(HEMATOXYLIN, w))


def htk_recipe(rgb: np.ndarray, threshold: int = 120, min_area: int = 200,
               protrusion: int = 3, opening: int = 7, max_hole: int = 1000,
               max_size: int = 60):
    """The whole recipe of method section 1 on one image, with the two bounds wsicell adds
    for whole slides: holes filled up to ``max_hole`` pixels, objects longer than
    ``max_size`` pixels dropped.

    Returns
    -------
    hematoxylin : (H, W) uint8
    foreground : (H, W) bool, ``hematoxylin < threshold``
    labels : (H, W) int, the post-processed nuclei
    crops : (N, 32, 32, 3) uint8, the cell images
    """
    normalised = htk_normalise(rgb)
    w, h_index = htk_stains(normalised)
    hematoxylin = htk.preprocessing.color_deconvolution.color_deconvolution(
        normalised, w, None).Stains[..., h_index]
    foreground = hematoxylin < threshold
    filled = scipy.ndimage.binary_fill_holes(foreground)
    holes = skimage.morphology.remove_small_objects(
        filled & ~foreground, max_size=max_hole, connectivity=1)
    mask = foreground | (filled & ~foreground & ~holes)
    mask = skimage.morphology.remove_small_objects(mask, max_size=min_area - 1, connectivity=2)
    mask = skimage.morphology.opening(mask, skimage.morphology.disk(protrusion // 2))
    mask = skimage.morphology.opening(mask, np.ones((opening, opening), bool))
    labels = skimage.measure.label(mask, connectivity=2)
    for region in skimage.measure.regionprops(labels):
        y0, x0, y1, x1 = region.bbox
        if max(y1 - y0, x1 - x0) > max_size:
            labels[labels == region.label] = 0
    labels = skimage.measure.label(labels > 0, connectivity=2)
    return hematoxylin, foreground, labels, htk_cell_crops(labels, normalised)


def htk_cell_crops(labels: np.ndarray, normalised: np.ndarray, size: int = 32) -> np.ndarray:
    """Straightforward cell images of the reference: per region, mask to white, shrink the
    longer side to ``size`` when larger, centre on a white ``size`` x ``size`` canvas."""
    crops = []
    for region in skimage.measure.regionprops(labels):
        y0, x0, y1, x1 = region.bbox
        cell = np.where(region.image[..., None], normalised[y0:y1, x0:x1], 255).astype(np.uint8)
        h, w = region.image.shape
        if max(h, w) > size:
            scale = size / max(h, w)
            h, w = max(1, round(h * scale)), max(1, round(w * scale))
            cell = (skimage.transform.resize(cell, (h, w), preserve_range=True,
                                             anti_aliasing=True)).astype(np.uint8)
        canvas = np.full((size, size, 3), 255, np.uint8)
        top, left = (size - h) // 2, (size - w) // 2
        canvas[top:top + h, left:left + w] = cell
        crops.append(canvas)
    return np.array(crops, dtype=np.uint8).reshape(-1, size, size, 3)
