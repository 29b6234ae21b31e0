"""Cost of the nucleus measurements against the segmentation they follow, single-threaded.

On each bm_graz image: wsicell's whole nuclei recipe (``segment_image``: normalisation,
deconvolution, threshold, post-processing, crops) and then
``nucleus_measurements`` on its crops and masks, each run ``--repeat`` times interleaved,
best time counted (other processes on the machine stay out of the figures).

Prints ``name: value`` lines: ``measurements_s_per_1000_nuclei`` and
``measurements_vs_segmentation`` (measurement time / segmentation time, same images).

Usage: python benchmarks/bench_measurements.py [--images N] [--repeat 5]
"""

import argparse
import time

import numpy as np
from _common import bm_graz_dir, single_threaded

single_threaded()

from wsicell.io.slide import read_rgb_image  # noqa: E402
from wsicell.segmentation.measurements import nucleus_measurements  # noqa: E402
from wsicell.segmentation.nuclei import segment_image  # noqa: E402
from wsicell.segmentation.stain import fit_stain_parameters  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    images = sorted((bm_graz_dir() / "images").glob("*.png"))[:args.images]
    segment_s = measure_s = 0.0
    nuclei_count = 0
    for path in images:
        rgb = read_rgb_image(path)
        stain = fit_stain_parameters(rgb)
        matrix = np.asarray(stain.stain_matrix)
        best_segment = best_measure = float("inf")
        for _ in range(args.repeat):  # interleaved: both see the same machine load
            start = time.perf_counter()
            nuclei, _ = segment_image(rgb, stain=stain)
            best_segment = min(best_segment, time.perf_counter() - start)
            start = time.perf_counter()
            nucleus_measurements(nuclei.masks, nuclei.crops, matrix,
                                 np.full(len(nuclei), 0.4))
            best_measure = min(best_measure, time.perf_counter() - start)
        segment_s += best_segment
        measure_s += best_measure
        nuclei_count += len(nuclei)
    print(f"images: {len(images)}")
    print(f"nuclei: {nuclei_count}")
    print(f"measurements_s_per_1000_nuclei: {1000 * measure_s / max(nuclei_count, 1):.4f}")
    print(f"measurements_vs_segmentation: {measure_s / segment_s:.3f}")


if __name__ == "__main__":
    main()
