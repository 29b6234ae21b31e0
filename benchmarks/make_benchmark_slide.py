"""Build a real-content pyramidal whole-slide TIFF from the bm_graz H&E images.

The slide is a white canvas (empty glass) with one elliptical "tissue section" covering a
target fraction of the area, paved with seeded random copies of the 1200x1200 bone-marrow
images.
It is written tile by tile (memory stays small whatever the size) as a tiled, JPEG-compressed
BigTIFF with one directory per pyramid level (each 2x smaller) and the resolution in the
TIFF tags, which OpenSlide reads as a "generic-tiff" with ``openslide.mpp-x``.

    python benchmarks/make_benchmark_slide.py OUT.tif --gigapixels 1
    python benchmarks/make_benchmark_slide.py OUT.tif --width 2048 --height 1536 --images 1

Images: P. Kainz et al., "You should use regression to detect cells", MICCAI 2015.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from wsicell.io.slide import read_rgb_image

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "bm_graz" / "images"


def plan_layout(width, height, image_size, tissue_fraction, n_images, seed):
    """Top-left corners (x, y) and image indices of the tissue pieces on the canvas.

    Like a tissue section on glass: the grid cells of side ``image_size`` whose centre lies
    in a centred ellipse covering ``tissue_fraction`` of the canvas are filled, each with a
    random image; at least one piece is always placed.
    """
    rng = np.random.default_rng(seed)
    cols, rows = max(1, width // image_size), max(1, height // image_size)
    cy, cx = (np.mgrid[0:rows, 0:cols] + 0.5) * image_size
    scale = math.sqrt(tissue_fraction / math.pi) * 2  # ellipse area = fraction of the canvas
    inside = (((cx - width / 2) / (scale * width / 2)) ** 2
              + ((cy - height / 2) / (scale * height / 2)) ** 2) <= 1
    inside.flat[0] = inside.flat[0] or not inside.any()
    row_idx, col_idx = np.nonzero(inside)
    which = rng.integers(0, n_images, size=len(row_idx))
    return [(int(c) * image_size, int(r) * image_size, int(i))
            for r, c, i in zip(row_idx, col_idx, which)]


def render_tile(layout, images, x0, y0, tile, scale):
    """One level tile: white, with the (downscaled) pieces that overlap it pasted in."""
    out = np.full((tile, tile, 3), 255, dtype=np.uint8)
    for px, py, index in layout:
        image = images[index]
        ix, iy = round(px / scale) - x0, round(py / scale) - y0
        h, w = image.shape[:2]
        ox0, oy0 = max(ix, 0), max(iy, 0)
        ox1, oy1 = min(ix + w, tile), min(iy + h, tile)
        if ox1 > ox0 and oy1 > oy0:
            out[oy0:oy1, ox0:ox1] = image[oy0 - iy:oy1 - iy, ox0 - ix:ox1 - ix]
    return out


def write_pyramidal_tiff(
    path, width, height, layout, images, *, mpp, tile=512, quality=90, min_level_size=512
):
    """Write the layout as a tiled JPEG BigTIFF pyramid (level 0 first, each level /2)."""
    levels, scale = [], 1
    while True:
        levels.append(scale)
        if max(width, height) / (scale * 2) < min_level_size:
            break
        scale *= 2
    total = sum(math.ceil(width / s / tile) * math.ceil(height / s / tile) for s in levels)
    bar = tqdm(total=total, desc=f"writing {Path(path).name}", unit="tile")
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for scale in levels:
            scaled = [cv2.resize(im, (round(im.shape[1] / scale), round(im.shape[0] / scale)),
                                 interpolation=cv2.INTER_AREA) for im in images]
            level_w, level_h = math.ceil(width / scale), math.ceil(height / scale)

            def tiles():
                for ty in range(0, level_h, tile):
                    for tx in range(0, level_w, tile):
                        bar.update(1)
                        yield render_tile(layout, scaled, tx, ty, tile, scale)

            tif.write(
                tiles(), shape=(level_h, level_w, 3), dtype=np.uint8, tile=(tile, tile),
                photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                resolution=(1e4 / (mpp * scale), 1e4 / (mpp * scale)),
                resolutionunit="CENTIMETER", subfiletype=1 if scale > 1 else 0,
                metadata=None,
            )
    bar.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--gigapixels", type=float, default=1.0,
                        help="level-0 size (square canvas) unless --width/--height are given")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--tissue-fraction", type=float, default=0.3)
    parser.add_argument("--images", type=int, default=0, help="use the first N images (0 = all)")
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--mpp", type=float, default=0.4, help="level-0 um/px written to the tags")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    side = math.ceil(math.sqrt(args.gigapixels * 1e9) / args.tile) * args.tile
    width, height = args.width or side, args.height or side
    files = sorted(args.image_dir.glob("*.png"))
    if args.images:
        files = files[:args.images]
    images = [read_rgb_image(f) for f in files]
    layout = plan_layout(width, height, images[0].shape[0], args.tissue_fraction,
                         len(images), args.seed)
    write_pyramidal_tiff(args.out, width, height, layout, images,
                         mpp=args.mpp, tile=args.tile, quality=args.quality)
    print(f"slide: {args.out}")
    print(f"level0_gigapixels: {width * height / 1e9:.3f}")
    print(f"tissue_pieces: {len(layout)}")
    print(f"file_mb: {args.out.stat().st_size / 1e6:.1f}")


if __name__ == "__main__":
    main()
