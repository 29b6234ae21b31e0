"""Nuclei segmentation accuracy of every preset next to HistomicsTK's own weight-free
detection, on the three dev sets of ../shared/data.

- ``monuseg_train/`` (13 multi-organ images, 40x, 0.25 um/px): AJI, PQ (means over the
  images), detection F1 of centroids within 3 um (pooled);
- ``consep_patches/`` (256x256 colorectal patches, 40x, 0.25 um/px): AJI, detection F1
  within 3 um; every method is run on ``train/`` too and the preset with the best train
  AJI is reported on ``test/`` ("chosen on train"); the headline figures are test figures;
- ``bm_graz/`` (8 bone-marrow images with centre dots, 0.4 um/px): detection F1 within
  12 px;
- ``brca_m2c/`` (80 breast patches with typed centre dots, 0.5 um/px; not every nucleus
  is dotted, so precision is a lower bound): detection within 3 um, split by patient
  (TCGA case, the first 12 characters of the name; every other case of the sorted list is
  ``dev``, the rest ``test``); settings are chosen on ``dev``, ``test`` is only reported;
- a negative control: the 48 x 48 um nucleus-free regions of the dev images listed in
  ``negative_regions.csv`` (fat, background, blood, stroma), each segmented as a field of
  its own (it calibrates itself): objects found per mm2.

Every table shows detection precision (``det_p``) and recall (``det_r``) beside F1.

Presets run through the product path (``wsicell.segmentation.fov.segment_file``, labels
at the file's resolution), one image at a time: each image calibrates itself.  The
``adaptive (per tile)`` row is the same kernel with the stain fit and calibration pooled
over the patches of one original CoNSeP tile: what ``wsicell ingest``'s per-slide
calibration gives a slide.  HistomicsTK: ``htk_kofahi.py``, on the
hematoxylin of wsicell's per-image stain fit.

Run single-threaded (a full run is a few minutes; ``--limit N`` takes the first N images
of each set and of each CoNSeP split)::

    .venv/bin/python benchmarks/segmentation_accuracy.py [--limit N] [--no-train]

Ends with ``name: value`` lines: the default preset's ``monuseg_aji``, ``monuseg_pq``,
``consep_aji``, ``consep_det_f1``, ``bm_graz_det_f1``, ``bm_graz_precision``,
``brca_det_f1``, ``brca_precision``, ``brca_recall`` (dev), ``negative_objects_per_mm2``,
the same prefixed ``paper_`` and ``htk_``, and ``adaptive_tile_consep_aji`` /
``adaptive_tile_consep_det_f1``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import SHARED_DATA, headline, single_threaded

MONUSEG_MPP = 0.25
CONSEP_MPP = 0.25
BM_GRAZ_MPP = 0.4
BRCA_MPP = 0.5
NEGATIVE_REGIONS = Path(__file__).with_name("negative_regions.csv")
DETECTION_RADIUS_UM = 3.0
BM_GRAZ_RADIUS_PX = 12.0


class Tally:
    """Figures of one method on one set: per-image AJI / PQ, pooled detection, time."""

    def __init__(self):
        from wsicell.analysis.metrics import DetectionScore

        self.aji, self.pq = [], []
        self.detection = DetectionScore(0, 0, 0)
        self.seconds = self.megapixels = 0.0

    def add(self, truth, labels, centroids, radius_px, seconds):
        """``truth``: an instance map (AJI, PQ and its centroids) or (M, 2) points."""
        from wsicell.analysis.metrics import (
            aggregated_jaccard_index,
            detection_score,
            label_centroids,
            panoptic_quality,
        )

        if truth.ndim == 2 and truth.shape == labels.shape:
            self.aji.append(aggregated_jaccard_index(truth, labels))
            self.pq.append(panoptic_quality(truth, labels).pq)
            truth = label_centroids(truth)
        self.detection = self.detection + detection_score(centroids, truth, radius_px)
        self.seconds += seconds
        self.megapixels += labels.size / 1e6

    def summary(self) -> dict:
        out = {}
        if self.aji:
            out["aji"] = float(np.mean(self.aji))
            out["pq"] = float(np.mean(self.pq))
        out.update(det_p=self.detection.precision, det_r=self.detection.recall,
                   det_f1=self.detection.f1, s_per_mp=self.seconds / max(self.megapixels, 1e-9))
        return out


def preset_method(name: str):
    """A preset through the product path: (file labels, centroids) of an image file."""
    from wsicell.analysis.metrics import label_centroids
    from wsicell.config import load_config
    from wsicell.segmentation.fov import segment_file

    config = load_config(None, name)

    def run(path: Path, mpp: float):
        found = segment_file(path, config, mpp, allow_empty=True)
        labels = found.file_labels()
        return labels, label_centroids(labels)

    return run


def htk_method(path: Path, mpp: float):
    """HistomicsTK's Kofahi detection on the hematoxylin of wsicell's stain fit."""
    from htk_kofahi import htk_kofahi

    from wsicell.analysis.metrics import label_centroids
    from wsicell.config import StainConfig
    from wsicell.io.slide import read_rgb_image
    from wsicell.segmentation.stain import fit_stain_parameters

    rgb = read_rgb_image(path)
    try:
        hematoxylin = fit_stain_parameters(rgb, StainConfig()).hematoxylin_of(rgb)
    except ValueError:  # no stained pixel
        return np.zeros(rgb.shape[:2], np.int32), np.zeros((0, 2))
    labels = htk_kofahi(hematoxylin, mpp)
    return labels, label_centroids(labels)


def adaptive_per_tile(paths: list[Path], mpp: float) -> list[np.ndarray]:
    """The adaptive kernel with one stain fit and one calibration for a group of images."""
    from wsicell.config import WsicellConfig
    from wsicell.io.slide import read_rgb_image
    from wsicell.segmentation.adaptive import (
        calibrate,
        hematoxylin_od,
        segment_hematoxylin_od,
    )
    from wsicell.segmentation.stain import fit_stain_parameters

    config = WsicellConfig().with_options("adaptive")
    rgbs = [read_rgb_image(p) for p in paths]
    stain = fit_stain_parameters(np.concatenate([r.reshape(-1, 3) for r in rgbs]), config.stain,
                                 **config.segmentation.adaptive.stain_fit)
    stains = [[hematoxylin_od(channel) for channel in stain.stains_of(r)] for r in rgbs]
    p = config.segmentation.adaptive
    calibration = calibrate([od for od, _ in stains], mpp, p)
    return [segment_hematoxylin_od(od, mpp, p, calibration, eosin_od)[0]
            for od, eosin_od in stains]


def read_labels(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.int32)


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def instance_set(images: list[Path], masks: Path, mpp: float, methods: dict) -> dict:
    tallies = {name: Tally() for name in methods}
    for image in images:
        truth = read_labels(masks / f"{image.stem}.png")
        for name, method in methods.items():
            (labels, centroids), seconds = timed(method, image, mpp)
            tallies[name].add(truth, labels, centroids, DETECTION_RADIUS_UM / mpp, seconds)
    return tallies


def consep_split(split: str, limit: int | None, methods: dict) -> dict:
    from wsicell.analysis.metrics import label_centroids

    root = SHARED_DATA / "consep_patches"
    images = sorted((root / "images" / split).glob("*.jpg"))[:limit]
    masks = root / "instances" / split
    tallies = instance_set(images, masks, CONSEP_MPP, methods)
    tiles = collections.defaultdict(list)  # patches of one original tile share statistics
    for image in images:
        tiles[image.stem.rsplit("_", 1)[0]].append(image)
    tally = tallies["adaptive (per tile)"] = Tally()
    for group in tiles.values():
        labels, seconds = timed(adaptive_per_tile, group, CONSEP_MPP)
        for image, lab in zip(group, labels):
            tally.add(read_labels(masks / f"{image.stem}.png"), lab, label_centroids(lab),
                      DETECTION_RADIUS_UM / CONSEP_MPP, seconds / len(group))
    return tallies


def bm_graz(limit: int | None, methods: dict) -> dict:
    root = SHARED_DATA / "bm_graz"
    dots = sorted((root / "dots").glob("*.csv"))[:limit]
    tallies = {name: Tally() for name in methods}
    for csv in dots:
        points = np.loadtxt(csv, delimiter=",", skiprows=1, ndmin=2)
        for name, method in methods.items():
            (labels, centroids), seconds = timed(method, root / "images" / f"{csv.stem}.png",
                                                 BM_GRAZ_MPP)
            tallies[name].add(points, labels, centroids, BM_GRAZ_RADIUS_PX, seconds)
    return tallies


def brca_parts() -> dict[str, list[Path]]:
    """BRCA-M2C images split by patient: ``{"dev": [...], "test": [...]}``."""
    images = sorted((SHARED_DATA / "brca_m2c" / "images").glob("*.png"))
    cases = sorted({image.name[:12] for image in images})
    dev = set(cases[::2])
    return {"dev": [i for i in images if i.name[:12] in dev],
            "test": [i for i in images if i.name[:12] not in dev]}


def brca(images: list[Path], methods: dict) -> dict:
    tallies = {name: Tally() for name in methods}
    for image in images:
        points = np.loadtxt(SHARED_DATA / "brca_m2c" / "points" / f"{image.stem}.csv",
                            delimiter=",", skiprows=1, usecols=(0, 1), ndmin=2)
        for name, method in methods.items():
            (labels, centroids), seconds = timed(method, image, BRCA_MPP)
            tallies[name].add(points, labels, centroids, DETECTION_RADIUS_UM / BRCA_MPP,
                              seconds)
    return tallies


def negative_regions() -> list[dict]:
    """The rows of ``negative_regions.csv``: image (under ../shared/data), mpp, kind, box."""
    with open(NEGATIVE_REGIONS) as file:
        rows = csv.DictReader(line for line in file if not line.startswith("#"))
        return [dict(row, mpp=float(row["mpp"]),
                     box=tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1"))) for row in rows]


def negative_control(methods: dict) -> dict:
    """Objects per mm2 each method finds in the nucleus-free regions, overall and per kind:
    ``{method: {"all": value, kind: value, ...}}``."""
    from PIL import Image

    from wsicell.io.slide import read_rgb_image

    found = {name: collections.Counter() for name in methods}
    area_mm2 = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, region in enumerate(negative_regions()):
            x0, y0, x1, y1 = region["box"]
            path = Path(tmp) / f"region_{i}.png"
            Image.fromarray(read_rgb_image(SHARED_DATA / region["image"])[y0:y1, x0:x1]
                            ).save(path)
            area = (x1 - x0) * (y1 - y0) * region["mpp"] ** 2 / 1e6
            area_mm2.update({"all": area, region["kind"]: area})
            for name, method in methods.items():
                n = len(method(path, region["mpp"])[1])
                found[name].update({"all": n, region["kind"]: n})
    return {name: {kind: found[name][kind] / area_mm2[kind] for kind in area_mm2}
            for name in methods}


def show(title: str, tallies: dict) -> dict:
    print(f"\n{title}")
    summaries = {name: t.summary() for name, t in tallies.items()}
    keys = list(next(iter(summaries.values())))
    print(f"  {'method':22s}" + "".join(f"{k:>10s}" for k in keys))
    for name, s in summaries.items():
        print(f"  {name:22s}" + "".join(f"{s.get(k, float('nan')):10.3f}" for k in keys))
    return summaries


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None,
                        help="first N images of each set (and of each CoNSeP split)")
    parser.add_argument("--no-train", action="store_true",
                        help="skip the CoNSeP train split (no choice on train)")
    args = parser.parse_args()
    single_threaded()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    from wsicell.config import SEGMENTATION_PRESETS, WsicellConfig

    default = WsicellConfig().segmentation.preset
    methods = {name: preset_method(name) for name in sorted(SEGMENTATION_PRESETS)}
    methods["htk kofahi"] = htk_method

    monuseg_root = SHARED_DATA / "monuseg_train"
    monuseg = show(f"MoNuSeg train (0.25 um/px; detection within {DETECTION_RADIUS_UM:g} um)",
                   instance_set(sorted((monuseg_root / "images").glob("*.png"))[:args.limit],
                                monuseg_root / "instances", MONUSEG_MPP, methods))
    chosen = None
    if not args.no_train:
        train = show("CoNSeP train (choice)", consep_split("train", args.limit, methods))
        presets = [n for n in train if n in SEGMENTATION_PRESETS]
        chosen = max(presets, key=lambda n: train[n]["aji"])
    test = show("CoNSeP test (report)", consep_split("test", args.limit, methods))
    if chosen:
        print(f"  chosen on train (best AJI): {chosen}: test AJI {test[chosen]['aji']:.3f}, "
              f"detection F1 {test[chosen]['det_f1']:.3f}")
    bm = show(f"bm_graz (0.4 um/px; detection within {BM_GRAZ_RADIUS_PX:g} px)",
              bm_graz(args.limit, methods))
    parts = brca_parts()
    brca_dev = show(f"BRCA-M2C dev ({BRCA_MPP:g} um/px; detection within "
                    f"{DETECTION_RADIUS_UM:g} um; dots incomplete: precision a lower bound)",
                    brca(parts["dev"][:args.limit], methods))
    show("BRCA-M2C test (report only)", brca(parts["test"][:args.limit], methods))
    negative = negative_control(methods)
    kinds = list(next(iter(negative.values())))
    print(f"\nNegative control ({len(negative_regions())} nucleus-free regions of the dev "
          "images): objects per mm2")
    print(f"  {'method':22s}" + "".join(f"{k:>11s}" for k in kinds))
    for name, values in negative.items():
        print(f"  {name:22s}" + "".join(f"{values[k]:11.1f}" for k in kinds))
    print()
    figures = {}
    for prefix, name in (("", default), ("paper_", "paper"), ("htk_", "htk kofahi")):
        figures.update({
            f"{prefix}monuseg_aji": monuseg[name]["aji"],
            f"{prefix}monuseg_pq": monuseg[name]["pq"],
            f"{prefix}consep_aji": test[name]["aji"],
            f"{prefix}consep_det_f1": test[name]["det_f1"],
            f"{prefix}bm_graz_det_f1": bm[name]["det_f1"],
            f"{prefix}bm_graz_precision": bm[name]["det_p"],
            f"{prefix}brca_det_f1": brca_dev[name]["det_f1"],
            f"{prefix}brca_precision": brca_dev[name]["det_p"],
            f"{prefix}brca_recall": brca_dev[name]["det_r"],
            f"{prefix}negative_objects_per_mm2": negative[name]["all"],
        })
    figures["adaptive_tile_consep_aji"] = test["adaptive (per tile)"]["aji"]
    figures["adaptive_tile_consep_det_f1"] = test["adaptive (per tile)"]["det_f1"]
    if chosen:
        figures["consep_chosen_on_train"] = chosen
    headline(**figures)


if __name__ == "__main__":
    main()
