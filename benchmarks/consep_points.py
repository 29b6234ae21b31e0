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

from consep_clustering import DATA, patch_images, write_points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: CoNSeP patches not found")
    images = patch_images(args.data, None)
    write_points(args.data, args.out, images)
    print(f"points_files: {len(images)}")


if __name__ == "__main__":
    main()
