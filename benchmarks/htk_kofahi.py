"""HistomicsTK's own weight-free nuclei detection, the baseline of the accuracy benchmark.

Not product code (HistomicsTK is a test-only dependency).  Otsu foreground of the
hematoxylin intensity, hole filling, then ``detect_nuclei_kofahi`` (multiscale
Laplacian-of-Gaussian + max-clustering; Al-Kofahi et al., IEEE TBME 2010).  The sizes of
HistomicsTK's documented example (radius 10-15 px, nucleus area 80 px, local-maximum search
radius 10 px, at 40x = 0.25 um/px) converted to microns, then to the image's pixels.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
from histomicstk.segmentation.nuclear import detect_nuclei_kofahi
from skimage.filters import threshold_otsu

MIN_RADIUS_UM = 2.5
MAX_RADIUS_UM = 3.75
MIN_NUCLEUS_AREA_UM2 = 5.0
LOCAL_MAX_SEARCH_RADIUS_UM = 2.5


def htk_kofahi(hematoxylin: np.ndarray, mpp: float) -> np.ndarray:
    """Nuclei of a hematoxylin intensity image by HistomicsTK's Kofahi pipeline.

    Parameters
    ----------
    hematoxylin : ndarray, shape (H, W), uint8
        Hematoxylin intensity (0 = much stain), e.g. wsicell's stain fit of the image.
    mpp : float
        Microns per pixel.

    Returns
    -------
    ndarray, shape (H, W), int32
        Nucleus labels, 0 = background.
    """
    h = np.asarray(hematoxylin, dtype=np.float64)
    if h.max() == h.min():
        return np.zeros(h.shape, np.int32)
    mask = ndi.binary_fill_holes(h < threshold_otsu(h))
    labels = detect_nuclei_kofahi(h, mask, min_radius=MIN_RADIUS_UM / mpp,
                                  max_radius=MAX_RADIUS_UM / mpp,
                                  min_nucleus_area=int(MIN_NUCLEUS_AREA_UM2 / mpp ** 2),
                                  local_max_search_radius=LOCAL_MAX_SEARCH_RADIUS_UM / mpp)
    return np.asarray(labels, dtype=np.int32)
