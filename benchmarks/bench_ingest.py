"""Whole-slide ingest throughput, scaling and memory on real-content benchmark slides.

Builds (once, with make_benchmark_slide.py) a pyramidal JPEG TIFF of ``--gigapixels`` level-0
pixels at 0.4 um/px, and measures:

- ``core_s_per_tissue_mp``: end-to-end ingest (plan, read + decode, stain pass, segment,
  crops, staging, consolidated Zarr write) on a fresh LocalCluster of ``--workers`` single-
  threaded workers: wall seconds x workers / tissue megapixels (tissue area from the tissue
  mask, at the reference resolution);
- ``speedup_vs_histomicstk``: the HistomicsTK-composed recipe (htk_reference.htk_recipe) timed
  on a seeded random sample of the slide's tissue tiles (each with its halo), seconds per
  megapixel, over wsicell's end-to-end core seconds per processed (tile + halo) megapixel;
  timed right after each ingest, the median over ``--repeats`` such pairs;
- ``speedup_2_workers``: wall time with 1 worker / wall time with 2 workers, the median over
  ``--repeats`` pairs of runs made one after the other (``--speedup``);
- ``peak_rss_growth_4x``: peak RSS of the largest worker on a slide 4x larger
  (``--scale-4x``), divided by that on the base slide, minus 1;
- ``phase_<name>_s``: where the median run's wall time went, by the phases ingest logs
  (plan, stain sample and fit, calibration, segmentation of the tiles, writing the store);
- ``checksum_cost_ratio`` (``--checksum-ratio``): wall time of an ingest into a store whose
  arrays carry CRC-32C checksums (the default) over one without them, the median over
  ``--repeats`` pairs run one after the other.

Usage::

    python benchmarks/bench_ingest.py                       # 1 gigapixel, everything
    python benchmarks/bench_ingest.py --gigapixels 0.1 --htk-tiles 1 --no-speedup --no-scale-4x

Each ingest runs on a fresh cluster, ``--repeats`` times; the figures use the run of median
wall time.  On this project's shared virtual machine the same ingest took 11 to 16 s from one
minute to the next, so single runs are not to be trusted; the machine's other load inflates
wall-clock figures too.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from _common import headline, single_threaded

single_threaded()

import make_benchmark_slide  # noqa: E402
import numpy as np  # noqa: E402

from wsicell.config import IngestConfig, WsicellConfig  # noqa: E402
from wsicell.io.slide import open_slide, read_reference_region  # noqa: E402
from wsicell.io.store import open_store  # noqa: E402
from wsicell.pipeline.cluster import local_cluster  # noqa: E402
from wsicell.pipeline.ingest import ingest  # noqa: E402
from wsicell.pipeline.tiles import plan_slide, segment_tile  # noqa: E402
from wsicell.segmentation.stain import StainLookup, StainParameters  # noqa: E402


def build_slide(path: Path, gigapixels: float) -> Path:
    if not path.exists():
        make_benchmark_slide.main([str(path), "--gigapixels", str(gigapixels)])
    return path


def _worker_peak_rss_mb() -> float:
    """Peak resident memory of this worker process (``VmHWM``, Linux).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that over ``execve`` from the parent at
    fork time, and a LocalCluster's workers are forked from this (client) process, so it
    would report the client's size, not the worker's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak memory needs Linux)")


def _worker_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _core_s_per_processed_mp(run: dict, workers: int) -> float:
    """End-to-end core seconds of an ingest per megapixel it processed (tiles with halo)."""
    return run["wall_s"] * workers / run["recipes"][3]


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (its own figures, peak RSS included), with every run's
    wall time as ``wall_runs``."""
    runs = sorted(runs, key=lambda run: run["wall_s"])
    return {**runs[len(runs) // 2], "wall_runs": [round(run["wall_s"], 2) for run in runs]}


def remove_store(store) -> None:
    """Delete a store from an earlier run: a directory, or an fsspec URL (``--store``)."""
    if "://" not in str(store):
        shutil.rmtree(store, ignore_errors=True)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(store))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def timed_ingest(slide: Path, store: Path, config: WsicellConfig, workers: int) -> dict:
    """One ingest on a fresh LocalCluster; wall time, worker CPU and peak RSS."""
    from distributed import Client

    remove_store(store)
    with local_cluster(workers, 1, "6GB") as cluster, Client(cluster) as client, \
            logged_phases() as phases:
        client.run(lambda: __import__("wsicell.pipeline.ingest"))  # imports are not ingest time
        cpu_before = sum(client.run(_worker_cpu_s).values())
        start = time.perf_counter()
        (slide_id,) = ingest(store, [slide], config, scheduler=cluster.scheduler_address,
                             progress=True)
        wall = time.perf_counter() - start
        cpu = sum(client.run(_worker_cpu_s).values()) - cpu_before
        peak = max(client.run(_worker_peak_rss_mb).values())
    group = open_store(store)[f"slides/{slide_id}"]
    tiles = group["tiles"]
    # tile areas in reference px: the benchmark slides are written at the reference mpp
    ref_px = (tiles["x1"][:] - tiles["x0"][:]).astype(float) * (tiles["y1"][:] - tiles["y0"][:])
    return {
        "slide_id": slide_id, "wall_s": wall, "worker_cpu_s": cpu, "peak_rss_mb": peak,
        "tissue_mp": float((ref_px * tiles["tissue_fraction"][:]).sum() / 1e6),
        "tile_mp": float(ref_px.sum() / 1e6), "n_cells": int(group.attrs["n_cells"]),
        "n_tiles": int(tiles["tile_id"].shape[0]), "stain": group.attrs["stain"],
        "calibration": group.attrs["calibration"], "phases": phases,
    }


@contextmanager
def logged_phases():
    """The wall seconds of each phase that ingest logs for a slide (a dict, filled when the
    slide is done)."""
    phases = {}

    class Collect(logging.Handler):
        def emit(self, record):
            phases.update(getattr(record, "phases", {}))

    logger, handler = logging.getLogger("wsicell.pipeline.ingest"), Collect(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield phases
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def timed_ingest_without_checksums(slide: Path, store: Path, config: WsicellConfig,
                                   workers: int) -> dict:
    """:func:`timed_ingest` into a store whose arrays are only compressed (the codecs are
    fixed when the client creates the arrays; workers write with what the array says)."""
    from zarr.codecs import ZstdCodec

    from wsicell.io import store as store_module

    saved = store_module._COMPRESSOR
    store_module._COMPRESSOR = (ZstdCodec(level=1),)
    try:
        return timed_ingest(slide, store, config, workers)
    finally:
        store_module._COMPRESSOR = saved


def time_recipes_on_tiles(slide: Path, run: dict, config: WsicellConfig, n_tiles: int,
                          seed: int) -> tuple[float, float, float, float]:
    """Seconds per megapixel of HistomicsTK's recipe and of wsicell's tile kernel.

    Both on the same seeded sample of tissue tiles (their tissue regions with halo),
    single-threaded, in this process.  Returns (htk_s_per_mp, wsicell_kernel_s_per_mp,
    sampled_mp, processed_mp), the last being the megapixels ingest reads for all tiles.
    """
    from htk_reference import htk_recipe

    plan, _, _, _, tiles = plan_slide(slide, Path(tempfile.gettempdir()), config, None)
    full = np.flatnonzero(tiles["tissue_fraction"] >= 0.9)
    rows = full if len(full) else np.arange(len(tiles["tile_id"]))
    sample = np.random.default_rng(seed).choice(rows, min(n_tiles, len(rows)), replace=False)
    windows = np.array([plan.window(region) for region in tiles["region"]])
    processed_mp = float(np.prod(windows[:, 2:] - windows[:, :2], axis=1).sum() / 1e6)
    source = open_slide(slide)
    lookup = StainLookup.build(StainParameters.from_json(run["stain"]))
    htk_s = kernel_s = megapixels = 0.0
    for row in sample:
        region = tuple(int(v) for v in tiles["region"][row])
        x0, y0, x1, y1 = plan.window(region)
        rgb = read_reference_region(source, plan.grid, x0, y0, x1 - x0, y1 - y0)
        megapixels += rgb.shape[0] * rgb.shape[1] / 1e6
        start = time.perf_counter()
        htk_recipe(rgb)
        htk_s += time.perf_counter() - start
        start = time.perf_counter()
        segment_tile(plan, lookup, config, run["calibration"], region)
        kernel_s += time.perf_counter() - start
    return htk_s / megapixels, kernel_s / megapixels, megapixels, processed_mp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigapixels", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "wsicell-bench")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--htk-tiles", type=int, default=3,
                        help="tissue tiles timed with the HistomicsTK recipe (0 = skip)")
    parser.add_argument("--speedup", action=argparse.BooleanOptionalAction, default=True,
                        help="also ingest with 1 worker for speedup_2_workers")
    parser.add_argument("--scale-4x", action=argparse.BooleanOptionalAction, default=True,
                        help="also ingest a 4x larger slide for peak_rss_growth_4x")
    parser.add_argument("--tile-size", type=int, default=IngestConfig().tile_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default=None,
                        help="segmentation preset (default: the configuration's default)")
    parser.add_argument("--checksum-ratio", action=argparse.BooleanOptionalAction,
                        default=False, help="also ingest without checksums: checksum_cost_ratio")
    parser.add_argument("--store", default=None,
                        help="where the timed ingests write, e.g. s3://bucket/bench.zarr "
                        "(credentials from the environment) [default: in --workdir]")
    parser.add_argument("--repeats", type=int, default=3,
                        help="ingests per timed configuration (the median counts)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    config = WsicellConfig(ingest=IngestConfig(tile_size=args.tile_size)).with_options(
        args.preset)
    slide = build_slide(args.workdir / f"bench_{args.gigapixels:g}gp.tif", args.gigapixels)

    store = args.store or args.workdir / "store.zarr"
    runs, pairs = [], []
    for repeat in range(args.repeats):  # interleaved, so that the machine's drift hits all alike
        # the store without checksums goes first in every other pair (no order effect)
        unchecked = (timed_ingest_without_checksums(slide, store, config, args.workers)
                     if args.checksum_ratio and repeat % 2 else None)
        runs.append(timed_ingest(slide, store, config, args.workers))
        if args.htk_tiles:
            runs[-1]["recipes"] = time_recipes_on_tiles(slide, runs[-1], config,
                                                        args.htk_tiles, args.seed)
        if args.checksum_ratio:
            runs[-1]["unchecked_wall_s"] = (unchecked or timed_ingest_without_checksums(
                slide, store, config, args.workers))["wall_s"]
        if args.speedup:
            two = runs[-1] if args.workers == 2 else timed_ingest(slide, store, config, 2)
            pairs.append((timed_ingest(slide, store, config, 1)["wall_s"], two["wall_s"]))
    base = median_run(runs)
    core_s = base["wall_s"] * args.workers
    figures = {"core_s_per_tissue_mp": core_s / base["tissue_mp"]}
    print(f"slide: {slide} ({base['n_tiles']} tissue tiles, {base['tissue_mp']:.1f} tissue MP, "
          f"{base['tile_mp']:.1f} tile MP, {base['n_cells']} cells)")
    print(f"ingest_{args.workers}_workers_wall_s: {base['wall_s']:.1f}  (runs {base['wall_runs']})")
    print(f"worker_cpu_s_per_tissue_mp: {base['worker_cpu_s'] / base['tissue_mp']:.4f}")
    print(f"peak_rss_mb_per_worker: {base['peak_rss_mb']:.0f}")
    # where the wall time went (ingest's own phase clock; the client's time outside the
    # phases: opening the store, the summary)
    for phase, seconds in base["phases"].items():
        print(f"phase_{phase}_s: {seconds:.2f}  ({seconds / base['wall_s']:.0%} of the wall time)")

    if args.htk_tiles:
        ratios = [run["recipes"][0] / _core_s_per_processed_mp(run, args.workers)
                  for run in runs]
        htk, kernel, sampled, processed = base["recipes"]
        print(f"processed_mp: {processed:.1f}  (tissue regions of the tiles, with halo)")
        print(f"htk_s_per_mp: {htk:.3f}  (on {sampled:.1f} MP of tissue tiles; runs "
              f"{[round(run['recipes'][0], 3) for run in runs]})")
        print(f"wsicell_tile_kernel_s_per_mp: {kernel:.4f}")
        print(f"wsicell_end_to_end_core_s_per_tile_mp: "
              f"{_core_s_per_processed_mp(base, args.workers):.4f}")
        print(f"speedup_vs_histomicstk of each run: {[round(r, 2) for r in ratios]}")
        figures["speedup_vs_histomicstk"] = float(np.median(ratios))

    if args.speedup:
        ratios = [one / two for one, two in pairs]
        print(f"ingest_1_worker_wall_s: runs {[round(one, 2) for one, _ in pairs]}")
        print(f"ingest_2_workers_wall_s: runs {[round(two, 2) for _, two in pairs]}")
        figures["speedup_2_workers"] = float(np.median(ratios))

    if args.checksum_ratio:
        ratios = [run["wall_s"] / run["unchecked_wall_s"] for run in runs]
        print(f"checksum_cost_ratio of each pair: {[round(r, 3) for r in ratios]}")
        figures["checksum_cost_ratio"] = float(np.median(ratios))

    if args.scale_4x:
        large = build_slide(args.workdir / f"bench_{4 * args.gigapixels:g}gp.tif",
                            4 * args.gigapixels)
        big = timed_ingest(large, args.workdir / "store_4x.zarr", config, args.workers)
        print(f"peak_rss_mb_per_worker_4x: {big['peak_rss_mb']:.0f}")
        print(f"core_s_per_tissue_mp_4x: {big['wall_s'] * args.workers / big['tissue_mp']:.4f}")
        figures["peak_rss_growth_4x"] = big["peak_rss_mb"] / base["peak_rss_mb"] - 1

    headline(**figures)


if __name__ == "__main__":
    main()
