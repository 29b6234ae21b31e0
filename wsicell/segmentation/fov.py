"""The nuclei of one plain image file (a field of view: PNG, JPEG, TIFF).

The whole-image counterpart of the tiled whole-slide ingest: the image is brought to the
reference resolution, segmented with the configured recipe (stain parameters fitted on the
image itself) and measured.  Coordinates are reported in the pixels of the file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.io.slide import (
    ReferenceGrid,
    open_slide,
    read_reference_region,
    resolve_mpp,
)
from wsicell.segmentation.nuclei import Nuclei, is_grayscale, segment_image


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
    """

    path: Path
    mpp: float
    grid: ReferenceGrid
    rgb: np.ndarray
    labels: np.ndarray
    nuclei: Nuclei

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


def segment_file(path: str | Path, config: WsicellConfig, mpp: float | None = None) -> SegmentedImage:
    """Read one image file at the reference resolution and segment its nuclei.

    Parameters
    ----------
    path : str or Path
    config : WsicellConfig
    mpp : float, optional
        Microns per pixel of the file, overriding its metadata.

    Raises
    ------
    WsicellError
        Unreadable file, or an image without stained tissue or without any nucleus.
    """
    slide = open_slide(path, config.ingest.max_plain_image_pixels)
    reference_mpp = config.segmentation.reference_mpp
    file_mpp = resolve_mpp(slide, mpp, reference_mpp)
    grid = ReferenceGrid.of(slide, file_mpp, reference_mpp)
    rgb = read_reference_region(slide, grid, 0, 0, grid.width, grid.height)
    if is_grayscale(rgb):
        warnings.warn(f"{slide.path}: grayscale image; its grey level is taken as the "
                      "hematoxylin intensity (no stain separation)", stacklevel=2)
    try:
        nuclei, labels = segment_image(rgb, config)
    except ValueError as err:  # no stained pixel to estimate colours from
        raise WsicellError(f"{slide.path}: no tissue found ({err})") from None
    if len(nuclei) == 0:
        raise WsicellError(f"{slide.path}: no nuclei found (no stained tissue in the image)")
    return SegmentedImage(slide.path, file_mpp, grid, rgb, labels, nuclei)
