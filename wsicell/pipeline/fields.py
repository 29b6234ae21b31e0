"""Plain image files (fields of view) end to end: nuclei to per-image results on disk, the
detection evaluation against annotated centre points and the segmentation evaluation
against instance masks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from wsicell import __version__
from wsicell.analysis.metrics import (
    DetectionScore,
    detection_score,
    segmentation_scores,
)
from wsicell.config import WsicellConfig, load_config
from wsicell.errors import WsicellError
from wsicell.io.points import read_points
from wsicell.io.slide import PLAIN_IMAGE_SUFFIXES
from wsicell.segmentation.fov import SegmentedImage, segment_file
from wsicell.viz.figures import crop_mosaic, outline_overlay

GALLERY_CELLS = 400


def _write_image_outputs(result: SegmentedImage, folder: Path) -> None:
    folder.mkdir(parents=True)
    result.table().to_csv(folder / "cells.csv", index=False)
    np.save(folder / "crops.npy", result.nuclei.crops)
    Image.fromarray(outline_overlay(result.rgb, result.labels)).save(folder / "overlay.png")
    write_label_image(result.file_labels(), folder)
    gallery = crop_mosaic(result.nuclei.crops[:GALLERY_CELLS], columns=20)
    Image.fromarray(gallery).save(folder / "crops.png")


def write_label_image(labels: np.ndarray, folder: Path) -> Path:
    """The nucleus instance labels (H, W) int as ``labels.png`` (16-bit; 0 = background,
    nucleus i = the row of ``cells.csv`` with cell_id i - 1), or ``labels.tif`` (32-bit)
    when there are more than 65,535 nuclei."""
    if labels.max(initial=0) <= np.iinfo(np.uint16).max:
        path = folder / "labels.png"
        cv2.imwrite(str(path), labels.astype(np.uint16))
    else:
        path = folder / "labels.tif"
        Image.fromarray(labels.astype(np.int32)).save(path)
    return path


def write_segmentation(result: SegmentedImage, out_dir: Path, config: WsicellConfig) -> Path:
    """Write one image's results into ``out_dir/<stem>/`` atomically.

    Files: ``cells.csv`` (one row per nucleus), ``crops.npy`` ((N, 32, 32, 3) uint8),
    ``crops.png`` (a gallery of the first cells), ``overlay.png`` (outlines on the image
    at the reference resolution), ``labels.png`` (the instance labels at the file's
    resolution, :func:`write_label_image`) and ``run.json`` (configuration, version,
    source, objects refused as too large to be a nucleus).
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
            "n_refused": result.refused,
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
    folders = []
    for path in tqdm(paths, desc="segment", unit="image", disable=not progress):
        result = segment_file(path, config, mpp)
        out_dir.mkdir(parents=True, exist_ok=True)  # once an image is segmented, not before
        folders.append(write_segmentation(result, out_dir, config))
    return folders


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


def preset_configs(presets: list[str | None], config_file: str | Path | None = None) -> dict:
    """The configuration of each preset to evaluate, keyed by the preset's name: a named
    preset replaces the file's ``segmentation`` section; None is the file's configuration
    as written (its own preset with any values the file sets).

    Examples
    --------
    >>> sorted(preset_configs([None, "paper"]))
    ['adaptive', 'paper']
    """
    configs = {}
    for name in presets:
        config = load_config(config_file, name)
        configs[config.segmentation.preset] = config
    return configs


def evaluate_detection(image_dir: str | Path, points_dir: str | Path, presets: list[str | None],
                       radius: float = 12.0, config_file: str | Path | None = None,
                       mpp: float | None = None, progress: bool = True) -> dict:
    """Precision, recall and F1 of detected nucleus centroids against annotated points.

    Predicted centroids are matched one-to-one to points within ``radius`` (pixels of
    the files) by :func:`wsicell.analysis.metrics.match_points`.  An image where a preset
    finds no nucleus (or no tissue) scores zero for it and the run goes on.

    Returns
    -------
    dict
        ``{"radius": r, "presets": {name: {"precision", "recall", "f1", ..., "images":
        {stem: {...}}}}}``
    """
    pairs = annotated_images(Path(image_dir), Path(points_dir))
    results = {"radius": radius, "presets": {}}
    configs = preset_configs(presets, config_file)
    per_image = {name: {} for name in configs}
    for image, points_file in tqdm(pairs, desc="evaluate", unit="image", disable=not progress):
        reference = read_points(points_file, ("x", "y")).to_numpy()
        for name, config in configs.items():
            found = segment_file(image, config, mpp, allow_empty=True)  # none found: 0
            per_image[name][image.stem] = detection_score(found.centroids(), reference, radius)
    for name, scores in per_image.items():
        overall = sum(scores.values(), DetectionScore(0, 0, 0))
        results["presets"][name] = {
            **overall.as_dict(),
            "images": {stem: score.as_dict() for stem, score in scores.items()},
        }
    return results


DETECTION_RADIUS_UM = 3.0  # centroid matches of the segmentation evaluation


def masked_images(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """(image, instance mask PNG) pairs matched by file stem.

    Raises
    ------
    WsicellError
        A missing directory, no image, or an image without a mask of the same stem.
    """
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise WsicellError(f"{folder}: not a directory")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    images = [p for p in sorted(image_dir.iterdir())
              if p.is_file() and p.suffix.lower() in PLAIN_IMAGE_SUFFIXES]
    if not images:
        raise WsicellError(f"{image_dir}: no image files")
    for image in images:
        if image.stem not in masks:
            raise WsicellError(f"{image}: no instance mask {image.stem}.png in {mask_dir}")
    return [(image, masks[image.stem]) for image in images]


def read_instance_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """An instance mask PNG: one 8- or 16-bit integer channel, 0 = background.

    Parameters
    ----------
    path : Path
    shape : tuple of int
        (height, width) of its image.

    Returns
    -------
    ndarray, shape ``shape``, uint8 or uint16

    Raises
    ------
    WsicellError
        Unreadable, not a single-channel 8/16-bit integer image, or of another shape.
    """
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise WsicellError(f"{path}: unreadable instance mask")
    if mask.ndim != 2 or mask.dtype not in (np.uint8, np.uint16):
        kind = f"{mask.shape[2]} channels" if mask.ndim == 3 else str(mask.dtype)
        raise WsicellError(f"{path}: an instance mask must be one 8- or 16-bit integer "
                           f"channel, got {kind}")
    if mask.shape != tuple(shape):
        raise WsicellError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} px, its image "
                           f"{shape[1]}x{shape[0]}")
    return mask


def _image_shape(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError) as err:
        raise WsicellError(f"{path}: unreadable image ({err})") from None


_MEAN_FIGURES = ("iou", "f1", "aji", "dq", "sq", "pq")


def evaluate_segmentation(image_dir: str | Path, mask_dir: str | Path, presets: list[str | None],
                          mpp: float, config_file: str | Path | None = None,
                          progress: bool = True) -> dict:
    """Instance segmentation of each preset against instance masks.

    Per image: the paper's foreground IoU and F (method section 4), AJI, panoptic quality
    (DQ, SQ, PQ) and detection of predicted centroids among the masks' centroids within
    3 um (one-to-one, :func:`wsicell.analysis.metrics.match_points`), all at the file's
    resolution (labels found at the reference resolution are resampled to it).  Overall:
    the mean over images of IoU, F, AJI, DQ, SQ, PQ, and detection pooled over the images.
    An image where a preset finds no nucleus scores zero and the run goes on.

    Parameters
    ----------
    image_dir, mask_dir : str or Path
        Images, and PNG instance masks of the same stems (8- or 16-bit, 0 = background).
    presets : list of str or None
    mpp : float
        Microns per pixel of the images.
    config_file : str or Path, optional
        JSON configuration the presets apply to.

    Returns
    -------
    dict
        ``{"mpp", "radius_um", "radius_px", "presets": {name: {"iou", "f1", "aji", "dq",
        "sq", "pq", "detection": {...}, "images": {stem: {...}}}}}``

    Raises
    ------
    WsicellError
        Bad input (all checked before any segmentation): an image without a mask, a mask
        that is not 8/16-bit integer, or of another shape than its image.
    """
    if not mpp > 0:
        raise WsicellError(f"--mpp must be positive, got {mpp}")
    pairs = masked_images(Path(image_dir), Path(mask_dir))
    for image, mask in pairs:  # every input is checked before the long part
        read_instance_mask(mask, _image_shape(image))
    radius = DETECTION_RADIUS_UM / mpp
    configs = preset_configs(presets, config_file)
    per_image = {name: {} for name in configs}
    for image, mask_file in tqdm(pairs, desc="evaluate", unit="image", disable=not progress):
        mask = read_instance_mask(mask_file, _image_shape(image))
        for name, config in configs.items():
            found = segment_file(image, config, mpp, allow_empty=True)
            scores = segmentation_scores(mask, found.file_labels(), radius)
            scores["refused"] = found.refused
            per_image[name][image.stem] = scores
    results = {"mpp": mpp, "radius_um": DETECTION_RADIUS_UM, "radius_px": radius,
               "presets": {}}
    for name, images in per_image.items():
        pooled = sum((s["detection"] for s in images.values()), DetectionScore(0, 0, 0))
        results["presets"][name] = {
            **{k: float(np.mean([s[k] for s in images.values()])) for k in _MEAN_FIGURES},
            "detection": pooled.as_dict(),
            "images": {stem: {**{k: s[k] for k in _MEAN_FIGURES}, "refused": s["refused"],
                              "detection": s["detection"].as_dict()}
                       for stem, s in images.items()},
        }
    return results
