"""Write CoNSeP's nucleus types as points CSVs for ``wsicell evaluate clustering``.

    .venv/bin/python benchmarks/consep_points.py OUT_DIR [--data DIR]

One ``<patch>.csv`` (``x,y,label``: annotated centroid in level-0 pixels and nucleus type
name) per patch of train and test, named like the slide ids ingest gives the patches.
Then, with the store and model of ``benchmarks/consep_clustering.py``::

    wsicell evaluate clustering --store consep_bench/consep.zarr --model consep_bench/model-... \\
        --points OUT_DIR --radius 16      # 4 um at the patches' 0.25 um/px, as that benchmark

Data: S. Graham et al., "HoVer-Net", Medical Image Analysis 2019 (CoNSeP), 256x256 cut.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from consep_clustering import DATA, TYPES, annotations, patch_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: CoNSeP patches not found")
    args.out.mkdir(parents=True, exist_ok=True)
    images = patch_images(args.data, None)
    for image in images:
        centroids, kinds = annotations(args.data, image.stem)
        centroids = centroids.reshape(-1, 2)
        pd.DataFrame({"x": centroids[:, 0], "y": centroids[:, 1],
                      "label": [TYPES[k] for k in kinds]}).to_csv(args.out / f"{image.stem}.csv",
                                                                   index=False)
    print(f"points_files: {len(images)}")


if __name__ == "__main__":
    main()
