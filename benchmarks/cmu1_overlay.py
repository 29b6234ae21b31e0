"""Outline a region of an ingested slide with its exported nuclei (docs/images figures).

The nuclei are those of ``wsicell ingest`` as ``wsicell export --format geojson`` writes
them (level-0 outlines), filled into a label image of the region and drawn with
:func:`wsicell.viz.figures.outline_overlay`; objects under ``--small-um2`` are drawn in red.
The PNG is palette-quantised (256 colours) to stay small.

    wsicell ingest ../shared/data/slides/CMU-1-Small-Region.svs --store cmu/cells.zarr
    wsicell export cmu/cells.zarr --format geojson --out cmu/cmu.geojson
    python benchmarks/cmu1_overlay.py ../shared/data/slides/CMU-1-Small-Region.svs \\
        cmu/cmu.geojson docs/images/cmu1_keratin_dermis.png --box 900 1150 1600 1850
"""

import argparse
import json

import cv2
import numpy as np
from PIL import Image

from wsicell.io.slide import open_slide
from wsicell.viz.figures import outline_overlay


def region_labels(features: list, box: tuple[int, int, int, int]) -> np.ndarray:
    """Label image (h, w) int32 of the region ``box = (x0, y0, x1, y1)`` (level-0 px):
    feature i's outline filled with i + 1 (pixel centres inside the polygon)."""
    x0, y0, x1, y1 = box
    labels = np.zeros((y1 - y0, x1 - x0), np.int32)
    for i, feature in enumerate(features):
        ring = np.asarray(feature["geometry"]["coordinates"][0]) - [x0 + 0.5, y0 + 0.5]
        cv2.fillPoly(labels, [np.round(ring * 4).astype(np.int32)], i + 1, shift=2)
    return labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slide")
    parser.add_argument("geojson")
    parser.add_argument("out")
    parser.add_argument("--box", type=int, nargs=4, required=True,
                        metavar=("X0", "Y0", "X1", "Y1"), help="level-0 pixels")
    parser.add_argument("--small-um2", type=float, default=10.0)
    args = parser.parse_args()
    x0, y0, x1, y1 = args.box
    slide = open_slide(args.slide)
    rgb = slide.read_level_region(0, x0, y0, x1 - x0, y1 - y0)
    with open(args.geojson) as file:
        features = json.load(file)["features"]
    labels = region_labels(features, args.box)
    area_um2 = np.array([0.0] + [f["properties"]["measurements"]["Nucleus: Area \u00b5m^2"]
                                 for f in features])
    small = area_um2 < args.small_um2
    small[0] = False
    picture = outline_overlay(outline_overlay(rgb, np.where(small[labels], 0, labels)),
                              np.where(small[labels], labels, 0), colour=(230, 0, 0))
    Image.fromarray(picture).quantize(256).save(args.out, optimize=True)
    shown = np.unique(labels[labels > 0])
    print(f"{args.out}: {len(shown)} nuclei in the region, {int(small[shown].sum())} under "
          f"{args.small_um2:g} um2")


if __name__ == "__main__":
    main()
