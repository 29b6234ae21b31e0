"""The paper's hand-made-feature baseline, "MF + k-means".

Each crop is described by a colour histogram, a local-binary-pattern (texture)
histogram and a histogram of oriented gradients; the features are standardised and
clustered with k-means (k-means++ initialisation).  The LBP and HOG kernels compute
exactly what ``skimage.feature.local_binary_pattern(..., method="uniform")`` and
``skimage.feature.hog(..., block_norm="L2-Hys")`` compute, but on a whole batch of
crops at once (the tests check the equality), a few times faster than a loop over crops.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler

COLOUR_BINS = 16
LBP_POINTS = 8
LBP_RADIUS = 1.0
HOG_ORIENTATIONS = 9
HOG_CELL = 8
HOG_BLOCK = 2


def colour_histograms(crops: np.ndarray, bins: int = COLOUR_BINS) -> np.ndarray:
    """Per-channel colour histograms, normalised to fractions of the pixels.

    Parameters
    ----------
    crops : ndarray, shape (N, H, W, 3), uint8
    bins : int
        Bins per channel over 0..255.

    Returns
    -------
    ndarray, shape (N, 3 * bins), float32
    """
    n, h, w, c = crops.shape
    values = (crops.reshape(n, h * w, c).astype(np.int64) * bins) // 256
    index = (np.arange(n)[:, None, None] * c + np.arange(c)) * bins + values
    counts = np.bincount(index.ravel(), minlength=n * c * bins)
    return (counts.reshape(n, c * bins) / (h * w)).astype(np.float32)


def grayscale(crops: np.ndarray) -> np.ndarray:
    """Luminance in 0..1 (``skimage.color.rgb2gray`` weights), shape (N, H, W), float64."""
    return crops.astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721]) / 255.0


def _bilinear_at(images: np.ndarray, dr: float, dc: float) -> np.ndarray:
    """Each image sampled at (row + dr, col + dc) for every pixel, zero outside."""
    n, h, w = images.shape
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    r0, c0 = int(np.floor(dr)), int(np.floor(dc))
    r1, c1 = int(np.ceil(dr)), int(np.ceil(dc))
    fr, fc = dr - r0, dc - c0

    def shifted(r, c):
        return padded[:, 2 + r:2 + r + h, 2 + c:2 + c + w]

    def along_columns(r):
        return shifted(r, c0) if fc == 0 else (1 - fc) * shifted(r, c0) + fc * shifted(r, c1)

    if fr == 0:
        return along_columns(r0)
    return (1 - fr) * along_columns(r0) + fr * along_columns(r1)


def uniform_lbp(images: np.ndarray, points: int = LBP_POINTS, radius: float = LBP_RADIUS) -> np.ndarray:
    """Rotation-invariant uniform local binary patterns of a batch of images.

    Same values as ``skimage.feature.local_binary_pattern(image, points, radius,
    "uniform")``: the number of neighbours at least as bright as the centre when the
    circular pattern has at most two 0/1 transitions, ``points + 1`` otherwise.

    Parameters
    ----------
    images : ndarray, shape (N, H, W), float
    points : int
    radius : float

    Returns
    -------
    ndarray, shape (N, H, W), int64, values in ``0..points+1``
    """
    angles = 2 * np.pi * np.arange(points) / points
    dr = np.round(-radius * np.sin(angles), 5)
    dc = np.round(radius * np.cos(angles), 5)
    signed = np.stack([_bilinear_at(images, r, c) - images >= 0 for r, c in zip(dr, dc)])
    transitions = (signed[1:] != signed[:-1]).sum(axis=0)
    return np.where(transitions <= 2, signed.sum(axis=0), points + 1)


def lbp_histograms(crops: np.ndarray) -> np.ndarray:
    """Histograms of uniform LBP codes (8 points, radius 1), shape (N, 10), float32."""
    codes = uniform_lbp(grayscale(crops))
    n = len(codes)
    bins = LBP_POINTS + 2
    index = np.arange(n)[:, None] * bins + codes.reshape(n, -1)
    counts = np.bincount(index.ravel(), minlength=n * bins).reshape(n, bins)
    return (counts / codes[0].size).astype(np.float32)


def hog_features(images: np.ndarray, orientations: int = HOG_ORIENTATIONS,
                 cell: int = HOG_CELL, block: int = HOG_BLOCK) -> np.ndarray:
    """Histograms of oriented gradients of a batch of images, L2-Hys block normalised.

    Same values as ``skimage.feature.hog(image, orientations, (cell, cell),
    (block, block), block_norm="L2-Hys")`` for each image.

    Parameters
    ----------
    images : ndarray, shape (N, H, W), float

    Returns
    -------
    ndarray, shape (N, F), float32
        ``F = blocks_y * blocks_x * block * block * orientations``.
    """
    n, h, w = images.shape
    g_row = np.zeros_like(images)
    g_col = np.zeros_like(images)
    g_row[:, 1:-1, :] = images[:, 2:, :] - images[:, :-2, :]
    g_col[:, :, 1:-1] = images[:, :, 2:] - images[:, :, :-2]
    magnitude = np.hypot(g_col, g_row)
    orientation = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    bin_index = np.minimum((orientation / (180 / orientations)).astype(np.int64), orientations - 1)
    cy, cx = h // cell, w // cell
    magnitude = magnitude[:, :cy * cell, :cx * cell]
    bin_index = bin_index[:, :cy * cell, :cx * cell]
    cell_row = np.arange(cy * cell) // cell
    cell_col = np.arange(cx * cell) // cell
    flat = (((np.arange(n)[:, None, None] * cy + cell_row[None, :, None]) * cx
             + cell_col[None, None, :]) * orientations + bin_index)
    hist = np.bincount(flat.ravel(), weights=magnitude.ravel(), minlength=n * cy * cx * orientations)
    hist = hist.reshape(n, cy, cx, orientations) / (cell * cell)
    by, bx = cy - block + 1, cx - block + 1
    blocks = np.stack([np.stack([hist[:, r:r + block, c:c + block] for c in range(bx)], axis=1)
                       for r in range(by)], axis=1)  # (n, by, bx, block, block, orientations)
    eps = 1e-5
    axes = (3, 4, 5)
    blocks = blocks / np.sqrt((blocks ** 2).sum(axis=axes, keepdims=True) + eps ** 2)
    blocks = np.minimum(blocks, 0.2)
    blocks = blocks / np.sqrt((blocks ** 2).sum(axis=axes, keepdims=True) + eps ** 2)
    return blocks.reshape(n, -1).astype(np.float32)


def handmade_features(crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Colour histogram + LBP histogram + HOG of each crop ("MF" in the paper).

    Parameters
    ----------
    crops : ndarray, shape (N, H, W, 3), uint8
    batch_size : int
        Crops processed at once (bounds memory).

    Returns
    -------
    ndarray, shape (N, F), float32
    """
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be uint8 (N, H, W, 3), got {crops.dtype} {crops.shape}")
    parts = []
    for start in range(0, len(crops), batch_size):
        batch = crops[start:start + batch_size]
        parts.append(np.hstack([colour_histograms(batch), lbp_histograms(batch),
                                hog_features(grayscale(batch))]))
    return np.vstack(parts) if parts else np.empty((0, 0), np.float32)


def baseline_clusters(crops: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Cluster crops with k-means (k-means++) on standardised hand-made features.

    Parameters
    ----------
    crops : ndarray, shape (N, H, W, 3), uint8, N >= k
    k : int

    Returns
    -------
    ndarray, shape (N,), int64, values in ``0..k-1``
    """
    features = StandardScaler().fit_transform(handmade_features(crops))
    return KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed) \
        .fit_predict(features).astype(np.int64)
