"""Time wsicell's nuclei recipe against the HistomicsTK-composed one, single-threaded.

Both run the whole of method section 1 (Reinhard, Macenko, deconvolution, threshold,
post-processing, labels, 32x32 cell images) on the same bm_graz images in one run.

Each image is run ``--repeat`` times by each recipe and its best time counts, which
keeps other processes on the machine out of the figures.

Usage: python benchmarks/bench_segment.py [--images N] [--repeat 3]
"""

import argparse
import sys
import time

from _common import bm_graz_dir, headline, single_threaded

single_threaded()


from htk_reference import htk_recipe  # noqa: E402

from wsicell.config import WsicellConfig  # noqa: E402
from wsicell.io.slide import read_rgb_image  # noqa: E402
from wsicell.segmentation.nuclei import segment_image  # noqa: E402
from wsicell.segmentation.stain import fit_stain_parameters  # noqa: E402


def timed(repeat, function, *args):
    """Result of ``function(*args)`` and its best wall time over ``repeat`` runs (s)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - start)
    return result, best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=0, help="use only the first N images")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per image and recipe; the best time counts")
    args = parser.parse_args(argv)
    paths = sorted((bm_graz_dir() / "images").glob("*.png"))
    if args.images:
        paths = paths[: args.images]
    config = WsicellConfig().with_options("paper")  # the paper's recipe, next to its HTK composition
    threshold = config.segmentation.hematoxylin_threshold
    segment_image(read_rgb_image(paths[0])[:256, :256], config)  # warm-up (imports, caches)
    htk_recipe(read_rgb_image(paths[0])[:256, :256])

    totals = {"wsicell": 0.0, "histomicstk": 0.0}
    overlap = {"hema": [0, 0], "nuclei": [0, 0]}
    megapixels = 0.0
    cells = [0, 0]
    print(f"{'image':24s} {'MP':>5s} {'wsicell s':>10s} {'htk s':>8s} {'cells':>11s}")
    for path in paths:
        rgb = read_rgb_image(path)
        (nuclei, labels), t_ours = timed(args.repeat, segment_image, rgb, config)
        (hema_ref, fg_ref, labels_ref, crops_ref), t_ref = timed(args.repeat, htk_recipe, rgb)
        # Our hematoxylin foreground, recomputed outside the timing.
        params = fit_stain_parameters(rgb, config.stain)
        fg = params.hematoxylin(params.normalise(rgb)) < threshold
        for key, (a, b) in {"hema": (fg, fg_ref), "nuclei": (labels > 0, labels_ref > 0)}.items():
            overlap[key][0] += int((a & b).sum())
            overlap[key][1] += int((a | b).sum())
        mp = rgb.shape[0] * rgb.shape[1] / 1e6
        megapixels += mp
        totals["wsicell"] += t_ours
        totals["histomicstk"] += t_ref
        cells[0] += len(nuclei)
        cells[1] += len(crops_ref)
        print(f"{path.stem:24s} {mp:5.2f} {t_ours:10.3f} {t_ref:8.3f} {len(nuclei):5d}/{len(crops_ref):5d}")
    ours = totals["wsicell"] / megapixels
    ref = totals["histomicstk"] / megapixels
    print(f"images: {len(paths)} ({megapixels:.1f} MP), nuclei mask IoU "
          f"{overlap['nuclei'][0] / overlap['nuclei'][1]:.4f}, cells wsicell/htk {cells[0]}/{cells[1]}")
    headline(
        wsicell_s_per_mp=ours,
        histomicstk_s_per_mp=ref,
        speedup_vs_histomicstk=ref / ours,
        mask_iou_vs_histomicstk=overlap["hema"][0] / overlap["hema"][1],
    )


if __name__ == "__main__":
    sys.exit(main())
