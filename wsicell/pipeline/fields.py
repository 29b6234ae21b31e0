"""Plain image files (fields of view) end to end: nuclei to per-image results on disk, and
the detection evaluation against annotated centre points.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from wsicell import __version__
from wsicell.analysis.metrics import DetectionScore, detection_score
from wsicell.config import WsicellConfig, load_config
from wsicell.errors import WsicellError
from wsicell.io.points import read_points
from wsicell.segmentation.fov import SegmentedImage, segment_file
from wsicell.viz.figures import crop_mosaic, outline_overlay

GALLERY_CELLS = 400


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
    the files) by :func:`wsicell.analysis.metrics.match_points`.

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
