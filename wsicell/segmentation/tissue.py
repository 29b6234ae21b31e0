"""Tissue detection on a slide thumbnail, and the tiles that hold tissue.

Stained tissue is coloured (saturated) and absorbs light (optical density > 0); the glass
around it is white or grey.  A pixel is tissue when its saturation passes an Otsu threshold
(never below an absolute floor, so an empty slide stays empty) and it is not near-white;
morphology then removes dust and fills holes.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

MIN_SATURATION = 20  # 0..255: below this nothing is stained, whatever Otsu says
MIN_OPTICAL_DENSITY = 0.05  # sum over RGB of -log10(I/255): glass is ~0


STAINED_OPTICAL_DENSITY = 0.15  # glass (RGB ~240) is ~0.08, pale eosin ~0.3


def total_optical_density(rgb: np.ndarray) -> np.ndarray:
    """Sum over R, G, B of ``-log10(I / 255)``: (..., 3) uint8 -> (...) float64."""
    table = -np.log10(np.maximum(np.arange(256), 1) / 255.0)
    return table[rgb].sum(axis=-1)


def stained_pixels(rgb: np.ndarray) -> np.ndarray:
    """Pixels that absorb light like stained tissue (not glass, not fat vacuoles).

    Parameters
    ----------
    rgb : ndarray, shape (..., 3), uint8

    Returns
    -------
    ndarray, shape (...), bool
    """
    return total_optical_density(rgb) > STAINED_OPTICAL_DENSITY


def detect_tissue(thumbnail: np.ndarray, min_object_px: int = 16) -> np.ndarray:
    """Tissue mask of a low-resolution slide image.

    Parameters
    ----------
    thumbnail : ndarray, shape (h, w, 3), uint8
        RGB thumbnail (e.g. 8-32 um/px).
    min_object_px : int
        Connected tissue pieces smaller than this (thumbnail pixels) are dropped.

    Returns
    -------
    ndarray, shape (h, w), bool
        True on tissue.
    """
    hsv = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)
    saturation = hsv[..., 1]
    optical_density = total_optical_density(thumbnail)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (saturation > max(otsu, MIN_SATURATION)) & (optical_density > MIN_OPTICAL_DENSITY)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        mask = (sizes >= min_object_px)[labels] & mask
    return mask


SMALL_FIELD_PX = 512  # an image under this (both sides, pixels) is a field, not a slide


def small_field_tissue(rgb: np.ndarray, min_fraction: float = 0.01) -> np.ndarray:
    """Tissue mask of a small field (a patch, a TMA core, a field of view) at full resolution.

    A thumbnail of a field under :data:`SMALL_FIELD_PX` is a few pixels wide, too coarse to
    detect tissue on: the whole field is a tissue candidate when at least ``min_fraction``
    of its pixels absorb light like stained tissue (:func:`stained_pixels`), and nothing is
    tissue otherwise (a blank field).

    Parameters
    ----------
    rgb : ndarray, shape (h, w, 3), uint8
        The field at its own resolution.
    min_fraction : float
        Least fraction of stained pixels.

    Returns
    -------
    ndarray, shape (h, w), bool
        All True or all False.

    Examples
    --------
    >>> glass = np.full((40, 30, 3), 243, np.uint8)
    >>> bool(small_field_tissue(glass).any())
    False
    >>> glass[:10] = (150, 60, 140)
    >>> bool(small_field_tissue(glass).all())
    True
    """
    stained = bool(stained_pixels(rgb).mean() >= min_fraction) if rgb.size else False
    return np.full(rgb.shape[:2], stained, dtype=bool)


def _mask_boxes(mask_shape: tuple[int, int], tile_boxes: np.ndarray, tile_to_mask: float):
    """The mask pixels ``[x0, y0, x1, y1)`` each tile touches (at least one), as 4 int arrays."""
    h, w = mask_shape
    boxes = np.asarray(tile_boxes, dtype=np.float64).reshape(-1, 4) * tile_to_mask
    x0 = np.clip(np.floor(boxes[:, 0]), 0, w - 1).astype(int)
    y0 = np.clip(np.floor(boxes[:, 1]), 0, h - 1).astype(int)
    x1 = np.clip(np.ceil(boxes[:, 2]), x0 + 1, w).astype(int)
    y1 = np.clip(np.ceil(boxes[:, 3]), y0 + 1, h).astype(int)
    return x0, y0, x1, y1


def tile_tissue_fractions(
    mask: np.ndarray, tile_boxes: np.ndarray, tile_to_mask: float
) -> np.ndarray:
    """Fraction of each tile covered by tissue.

    Parameters
    ----------
    mask : ndarray, shape (h, w), bool
        Tissue mask (thumbnail pixels).
    tile_boxes : ndarray, shape (T, 4), int
        Tiles ``[x0, y0, x1, y1)`` in the pixels the tiles are defined in.
    tile_to_mask : float
        Mask pixels per tile pixel.

    Returns
    -------
    ndarray, shape (T,), float32
        Mean of the mask over the mask pixels each tile touches.
    """
    integral = cv2.integral(mask.astype(np.uint8)).astype(np.float64)
    x0, y0, x1, y1 = _mask_boxes(mask.shape, tile_boxes, tile_to_mask)
    covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (covered / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def tissue_boxes(mask: np.ndarray, tile_boxes: np.ndarray, tile_to_mask: float) -> np.ndarray:
    """The part of each tile that holds tissue: the bounding box of its tissue pixels.

    The box is grown by one mask pixel (the mask is coarse) and clipped to the tile; a tile
    without a tissue pixel keeps its whole box.  Parameters as :func:`tile_tissue_fractions`.

    Returns
    -------
    ndarray, shape (T, 4), int64
        ``[x0, y0, x1, y1)`` of the tissue of each tile, in tile pixels, inside the tile.
    """
    tiles = np.asarray(tile_boxes, dtype=np.int64).reshape(-1, 4)
    boxes = tiles.copy()
    for box, tile, mx0, my0, mx1, my1 in zip(boxes, tiles,
                                             *_mask_boxes(mask.shape, tiles, tile_to_mask)):
        rows = np.flatnonzero(mask[my0:my1, mx0:mx1].any(axis=1))
        cols = np.flatnonzero(mask[my0:my1, mx0:mx1].any(axis=0))
        if len(rows):
            grown = np.array([mx0 + cols[0] - 1, my0 + rows[0] - 1,
                              mx0 + cols[-1] + 2, my0 + rows[-1] + 2]) / tile_to_mask
            box[:2] = np.maximum(tile[:2], np.floor(grown[:2]))
            box[2:] = np.minimum(tile[2:], np.ceil(grown[2:]))
    return boxes
