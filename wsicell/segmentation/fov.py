"""The nuclei of one plain image file (a field of view: PNG, JPEG, TIFF).

The whole-image counterpart of the tiled whole-slide ingest: the image is brought to the
reference resolution, segmented with the configured recipe (stain parameters fitted on the
image itself) and measured.  The ``adaptive`` method instead segments at the file's native
resolution when that is finer than the reference (its sizes are in microns) and brings the
labels to the reference grid for the measurements and crops.  Coordinates are reported in
the pixels of the file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.segmentation import relabel_sequential

from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.io.slide import (
    ReferenceGrid,
    open_slide,
    read_reference_region,
    resolve_mpp,
)
from wsicell.segmentation.adaptive import hematoxylin_od, segment_hematoxylin_od
from wsicell.segmentation.nuclei import (
    Nuclei,
    Objects,
    is_grayscale,
    measure_nuclei,
    segment_image,
)
from wsicell.segmentation.stain import fit_stain_parameters


@dataclass
class SegmentedImage:
    """Nuclei of one image file, coordinates in the file's pixels.

    Attributes
    ----------
    path : Path
    mpp : float
        Microns per pixel of the file.
    grid : ReferenceGrid
        How the file maps to the reference resolution the nuclei were found at.
    rgb : ndarray, shape (H, W, 3), uint8
        The image at the reference resolution.
    labels : ndarray, shape (H, W), int32
        Nucleus labels at the reference resolution.
    nuclei : Nuclei
        Measurements at the reference resolution.
    file_shape : tuple of int
        (height, width) of the file, pixels.
    native_labels : ndarray, shape file_shape, int32, optional
        Nucleus labels at the file's resolution, where the recipe segmented there
        (``adaptive``); None when it segmented at the reference resolution.
    refused : int
        Objects too large to be a nucleus that the recipe removed (``adaptive``).
    """

    path: Path
    mpp: float
    grid: ReferenceGrid
    rgb: np.ndarray
    labels: np.ndarray
    nuclei: Nuclei
    file_shape: tuple[int, int] | None = None
    native_labels: np.ndarray | None = None
    refused: int = 0

    def file_labels(self) -> np.ndarray:
        """Nucleus labels at the file's resolution, (H, W) int32, 0 = background: the
        native segmentation where there is one, else the reference labels resampled by
        nearest neighbour (pixel centres aligned)."""
        if self.native_labels is not None:
            return self.native_labels
        shape = self.file_shape or self.labels.shape
        if self.grid.scale == 1.0 and self.labels.shape == tuple(shape):
            return self.labels
        return resample_labels(self.labels, shape, self.grid.scale)

    def centroids(self) -> np.ndarray:
        """Nucleus centroids (x, y) in the file's pixels, shape (N, 2), float64."""
        return self.grid.to_level0(np.column_stack([self.nuclei.x, self.nuclei.y]))

    def table(self) -> pd.DataFrame:
        """One row per nucleus: id, centroid and box in file pixels, area, hematoxylin."""
        xy = self.centroids()
        box = self.nuclei.bbox * self.grid.scale
        reference_mpp = self.mpp * self.grid.scale
        return pd.DataFrame({
            "cell_id": np.arange(len(self.nuclei), dtype=np.int64),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "bbox_x0": box[:, 0], "bbox_y0": box[:, 1], "bbox_x1": box[:, 2], "bbox_y1": box[:, 3],
            "area_um2": self.nuclei.area * reference_mpp**2,
            "mean_hematoxylin": self.nuclei.mean_hematoxylin,
        })


def resample_labels(labels: np.ndarray, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Nearest-neighbour resampling of a label image with pixel centres aligned.

    Parameters
    ----------
    labels : ndarray, shape (h, w), int
    shape : tuple of int
        (H, W) of the output.
    scale : float
        Output pixels per input pixel (e.g. 1.6 from 0.4 to 0.25 um/px).

    Returns
    -------
    ndarray, shape (H, W), int32
    """
    rows = np.clip(np.round((np.arange(shape[0]) + 0.5) / scale - 0.5).astype(np.int64),
                   0, labels.shape[0] - 1)
    cols = np.clip(np.round((np.arange(shape[1]) + 0.5) / scale - 0.5).astype(np.int64),
                   0, labels.shape[1] - 1)
    return np.ascontiguousarray(labels[rows[:, None], cols[None, :]], dtype=np.int32)


def _empty_nuclei(crop_size: int) -> Nuclei:
    return Nuclei(np.zeros(0), np.zeros(0), np.zeros((0, 4), np.int32), np.zeros(0, np.int32),
                  np.zeros(0, np.float32), np.zeros((0, crop_size, crop_size, 3), np.uint8),
                  np.zeros((0, crop_size, crop_size), bool))


def _segment_adaptive(slide, file_mpp: float, grid: ReferenceGrid, rgb: np.ndarray,
                      config: WsicellConfig):
    """The ``adaptive`` recipe on one file: (nuclei, reference labels, native labels or
    None, refused count).  Segments at the file's resolution when finer than the reference,
    else on the reference grid; measurements and crops on the reference grid."""
    native = grid.scale > 1.0  # the file is finer than the reference
    image = slide.read_level_region(0, 0, 0, slide.width, slide.height) if native else rgb
    seg_mpp = file_mpp if native else config.segmentation.reference_mpp
    if is_grayscale(image):
        stain, hematoxylin, eosin_od = None, image[..., 0], None
    else:
        stain = fit_stain_parameters(image, config.stain,
                                     **config.segmentation.adaptive.stain_fit)
        hematoxylin, eosin = stain.stains_of(image)
        eosin_od = hematoxylin_od(eosin)
    labels, big = segment_hematoxylin_od(hematoxylin_od(hematoxylin), seg_mpp,
                                         config.segmentation.adaptive, eosin_od=eosin_od,
                                         source_mpp=file_mpp)
    if native:
        # objects smaller than a reference pixel vanish: number the survivors 1..N, and the
        # native labels alike (the vanished ones become background there too)
        reference, forward, _ = relabel_sequential(
            resample_labels(labels, (grid.height, grid.width), 1.0 / grid.scale))
        survivors = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)
        survivors[forward.in_values] = forward.out_values
        reference_h = rgb[..., 0] if stain is None else stain.hematoxylin_of(rgb)
        native_labels = survivors[labels]
    else:
        reference, reference_h, native_labels = labels, hematoxylin, None
    objects = Objects.from_labels(reference)
    nuclei = measure_nuclei(objects, reference_h, rgb, config.segmentation,
                            None if stain is None else stain.normalise)
    return nuclei, reference, native_labels, len(big)


def segment_file(path: str | Path, config: WsicellConfig, mpp: float | None = None,
                 allow_empty: bool = False) -> SegmentedImage:
    """Read one image file at the reference resolution and segment its nuclei.

    Parameters
    ----------
    path : str or Path
    config : WsicellConfig
        ``config.segmentation.method == "adaptive"`` segments at the file's native
        resolution when finer than the reference (see the module docstring).
    mpp : float, optional
        Microns per pixel of the file, overriding its metadata.
    allow_empty : bool
        Return a result without nuclei for an image without stained tissue or without any
        nucleus (an evaluation scores it zero) instead of raising.

    Raises
    ------
    WsicellError
        Unreadable file, or (unless ``allow_empty``) an image without stained tissue or
        without any nucleus.
    """
    slide = open_slide(path, config.ingest.max_plain_image_pixels)
    reference_mpp = config.segmentation.reference_mpp
    file_mpp = resolve_mpp(slide, mpp, reference_mpp)
    grid = ReferenceGrid.of(slide, file_mpp, reference_mpp)
    if grid.width * grid.height > config.ingest.max_plain_image_pixels:  # read whole below
        raise WsicellError(
            f"{slide.path}: at {file_mpp:g} um/px the image is {grid.width} x {grid.height} "
            f"px at the reference resolution ({reference_mpp:g} um/px), over "
            f"ingest.max_plain_image_pixels ({config.ingest.max_plain_image_pixels}); check "
            "--mpp")
    rgb = read_reference_region(slide, grid, 0, 0, grid.width, grid.height)
    if is_grayscale(rgb):
        warnings.warn(f"{slide.path}: grayscale image; its grey level is taken as the "
                      "hematoxylin intensity (no stain separation)", stacklevel=2)
    file_shape = (slide.height, slide.width)
    native_labels, refused = None, 0
    try:
        if config.segmentation.method == "adaptive":
            nuclei, labels, native_labels, refused = _segment_adaptive(
                slide, file_mpp, grid, rgb, config)
        else:
            nuclei, labels = segment_image(rgb, config)
    except ValueError as err:  # no stained pixel to estimate colours from
        if not allow_empty:
            raise WsicellError(f"{slide.path}: no tissue found ({err})") from None
        nuclei = _empty_nuclei(config.segmentation.crop_size)
        labels = np.zeros(rgb.shape[:2], dtype=np.int32)
    if len(nuclei) == 0 and not allow_empty:
        raise WsicellError(f"{slide.path}: no nuclei found (no stained tissue in the image)")
    return SegmentedImage(slide.path, file_mpp, grid, rgb, labels, nuclei, file_shape,
                          native_labels, refused)
