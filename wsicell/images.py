"""Segment plain image files: per-image results on disk, and detection evaluation.

The whole-image counterpart of :mod:`wsicell.ingest` for fields of view (PNG, JPEG,
TIFF): each image is brought to the reference resolution, segmented with the paper's
recipe (stain parameters fitted on the image itself) and measured.  Coordinates are
reported in the pixels of the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage.segmentation import find_boundaries
from tqdm import tqdm

from wsicell import __version__
from wsicell.config import WsicellConfig, load_config
from wsicell.errors import WsicellError
from wsicell.files import read_points
from wsicell.metrics import DetectionScore, detection_score
from wsicell.report import crop_mosaic
from wsicell.segment import Nuclei, is_grayscale, segment_image
from wsicell.slide import ReferenceGrid, open_slide, read_reference_region, resolve_mpp

OUTLINE_COLOUR = (0, 200, 0)
GALLERY_CELLS = 400


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
    slide = open_slide(path)
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


def outline_overlay(rgb: np.ndarray, labels: np.ndarray, colour=OUTLINE_COLOUR) -> np.ndarray:
    """The image with every nucleus outlined.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
    labels : ndarray, shape (H, W), int

    Returns
    -------
    ndarray, shape (H, W, 3), uint8
    """
    out = rgb.copy()
    out[find_boundaries(labels, mode="inner")] = colour
    return out


def _write_image_outputs(result: SegmentedImage, folder: Path) -> None:
    folder.mkdir(parents=True)
    result.table().to_csv(folder / "cells.csv", index=False)
    np.save(folder / "crops.npy", result.nuclei.crops)
    Image.fromarray(outline_overlay(result.rgb, result.labels)).save(folder / "overlay.png")
    gallery = crop_mosaic(result.nuclei.crops[:GALLERY_CELLS], columns=20)
    Image.fromarray(gallery).save(folder / "crops.png")


def write_segmentation(result: SegmentedImage, out_dir: Path, config: WsicellConfig) -> Path:
    """Write one image's results into ``out_dir/<stem>/`` atomically.

    Files: ``cells.csv`` (one row per nucleus), ``crops.npy`` ((N, 32, 32, 3) uint8),
    ``crops.png`` (a gallery of the first cells), ``overlay.png`` (outlines on the image
    at the reference resolution) and ``run.json`` (configuration, version, source).
    An existing folder of the same image is replaced only once the new one is complete.
    """
    folder = out_dir / result.path.stem
    staging = Path(tempfile.mkdtemp(prefix=f".{result.path.stem}.", dir=out_dir))
    try:
        _write_image_outputs(result, staging / "result")
        (staging / "result" / "run.json").write_text(json.dumps({
            "source": str(result.path),
            "mpp": result.mpp,
            "n_cells": len(result.nuclei),
            "wsicell_version": __version__,
            "config": config.to_json(),
        }, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging / "result", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def segment_files(paths: list[Path], out_dir: str | Path, config: WsicellConfig,
                  mpp: float | None = None, progress: bool = True) -> list[Path]:
    """Segment image files and write their results (see :func:`write_segmentation`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WsicellError(f"{out_dir}: output path exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [write_segmentation(segment_file(p, config, mpp), out_dir, config)
            for p in tqdm(paths, desc="segment", unit="image", disable=not progress)]


def annotated_images(image_dir: Path, points_dir: Path) -> list[tuple[Path, Path]]:
    """(image, points CSV) pairs matched by file stem; images without a CSV are skipped."""
    for folder in (image_dir, points_dir):
        if not folder.is_dir():
            raise WsicellError(f"{folder}: not a directory")
    points = {p.stem: p for p in points_dir.glob("*.csv")}
    pairs = [(image, points[image.stem]) for image in sorted(image_dir.iterdir())
             if image.is_file() and image.stem in points]
    if not pairs:
        raise WsicellError(f"{image_dir}: no image has a points CSV of the same name in {points_dir}")
    return pairs


def evaluate_detection(image_dir: str | Path, points_dir: str | Path, presets: list[str],
                       radius: float = 12.0, config_file: str | Path | None = None,
                       mpp: float | None = None, progress: bool = True) -> dict:
    """Precision, recall and F1 of detected nucleus centroids against annotated points.

    Predicted centroids are matched one-to-one to points within ``radius`` (pixels of
    the files) by :func:`wsicell.metrics.match_points`.

    Returns
    -------
    dict
        ``{"radius": r, "presets": {name: {"precision", "recall", "f1", ..., "images":
        {stem: {...}}}}}``
    """
    pairs = annotated_images(Path(image_dir), Path(points_dir))
    results = {"radius": radius, "presets": {}}
    configs = {name: load_config(config_file, name) for name in presets}
    per_image = {name: {} for name in presets}
    for image, points_file in tqdm(pairs, desc="evaluate", unit="image", disable=not progress):
        reference = read_points(points_file, ("x", "y")).to_numpy()
        for name, config in configs.items():
            found = segment_file(image, config, mpp)
            per_image[name][image.stem] = detection_score(found.centroids(), reference, radius)
    for name, scores in per_image.items():
        overall = sum(scores.values(), DetectionScore(0, 0, 0))
        results["presets"][name] = {
            **overall.as_dict(),
            "images": {stem: score.as_dict() for stem, score in scores.items()},
        }
    return results
