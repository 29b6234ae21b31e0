"""Whole-slide ingest: slides -> tissue tiles -> nuclei -> the Zarr cell store, on Dask.

Per slide, the client (this process) only reads metadata and a thumbnail; everything that
touches tile pixels runs inside Dask workers:

1. **Plan.** Tissue is detected on a thumbnail; the slide's reference grid (the slide at
   ``segmentation.reference_mpp``) is cut into tiles of ``ingest.tile_size``; tiles with
   enough tissue are kept.  The slide group is created with ``status="ingesting"``.
2. **Pass 1.** A seeded sample of tissue tiles gives a pixel sample from which the slide's
   :class:`~wsicell.stain.StainParameters` are fitted once and recorded.
3. **Pass 2.** Each task segments a few tiles: only a tile's tissue region (the box of the
   tissue mask inside it) is read, with a halo so that a nucleus on a border is found
   whole; a nucleus belongs to the tile whose region holds its centroid.  A finished
   tile is written atomically to the staging directory, so a killed run loses at most the
   tiles in flight and a rerun skips what is staged.
4. **Consolidation.** Cells are numbered in tile order; each task writes one block of
   whole chunks of the cell columns or of the crops (no two tasks write the same chunk).
   ``status`` is set to ``"complete"`` last, then the staging files are removed.

The result depends only on the slide and the configuration, so a run that was killed and
restarted produces the same store as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import shutil
import sys
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
from tqdm import tqdm

from wsicell import __version__
from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.slide import (
    ReferenceGrid, find_slide_files, open_slide, read_reference_region, resolve_mpp,
)
from wsicell.stain import StainLookup, StainParameters, fit_stain_parameters
from wsicell.store import (
    CELL_COLUMNS, STATUS_COMPLETE, begin_slide, claim, create_cell_arrays, discard_slide,
    file_fingerprint, finish_slide, open_store, read_staged_tile, remove_staging, slide_status,
    staged_tiles, staging_dir, store_lock, wait_for_array, write_array, write_staged_tile,
)
from wsicell.tissue import detect_tissue, stained_pixels, tile_tissue_fractions, tissue_boxes

STAIN_PIXELS_PER_TILE = 1 << 16
#: Tissue pixels (reference grid) from which a slide's colours go through a StainLookup:
#: building the table costs about as much as computing ~40 MP directly, per worker.
LOOKUP_MIN_PIXELS = 64_000_000
STAIN_WINDOW = 1024  # reference px read per sampled tile in pass 1
SLIDES_IN_FLIGHT = 4  # slides ingested at the same time by a multi-slide run
#: Seconds a worker waits for a look-up block another worker claimed (one takes ~0.04 s)
#: before building it itself.
LOOKUP_BLOCK_WAIT_S = 10.0
LOOKUP_DIR = "lookup"  # in a slide's staging directory: the blocks its workers share
_STAGED_COLUMNS = [c for c in CELL_COLUMNS if c not in ("cell_id", "tile_id")]


@dataclass(frozen=True)
class SlidePlan:
    """Everything a worker needs to process a slide's tiles (small and picklable).

    Coordinates of tiles are reference-grid pixels; ``tile_id = row * grid_cols + col``.
    A tile's *region* is the part of it that holds tissue (:func:`wsicell.tissue.tissue_boxes`):
    the tile owns the nuclei whose centroid lies in its region.
    """

    slide_id: str
    path: str
    fingerprint: str
    store: str
    mpp: float
    reference_mpp: float
    grid: ReferenceGrid
    tile_size: int
    halo: int
    grid_cols: int
    grid_rows: int
    stain_lookup: bool = True

    def core(self, tile_id: int) -> tuple[int, int, int, int]:
        """``[x0, y0, x1, y1)`` of the tile itself (reference px)."""
        row, col = divmod(int(tile_id), self.grid_cols)
        x0, y0 = col * self.tile_size, row * self.tile_size
        return x0, y0, min(x0 + self.tile_size, self.grid.width), min(y0 + self.tile_size,
                                                                      self.grid.height)

    def window(self, region) -> tuple[int, int, int, int]:
        """A region ``[x0, y0, x1, y1)`` grown by the halo, clipped to the slide (reference px)."""
        x0, y0, x1, y1 = region
        return (max(x0 - self.halo, 0), max(y0 - self.halo, 0),
                min(x1 + self.halo, self.grid.width), min(y1 + self.halo, self.grid.height))

    @property
    def staging(self) -> Path:
        return staging_dir(self.store, self.slide_id)


def slide_id_for(path: Path) -> str:
    """Store id of a slide: its file name without suffix, reduced to ``[A-Za-z0-9._-]``."""
    name = path.name[: -len(".ome.tif")] if path.name.lower().endswith(".ome.tif") else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "slide"


# --------------------------------------------------------------------------- worker side


@functools.lru_cache(maxsize=1)
def _prepare_worker() -> None:
    """Once per worker process: one thread for OpenCV and BLAS (parallelism comes from
    Dask), and glibc's allocator told to keep freed memory for reuse."""
    import cv2
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(1)
    threadpool_limits(1)
    _reuse_freed_memory()


def _reuse_freed_memory() -> None:
    """Serve large arrays from glibc's heap instead of fresh ``mmap`` pages.

    By default every temporary array of a tile (tens of MB) is a new mapping whose pages
    the kernel faults in and zeroes, then unmaps; reusing the heap made the tile kernel
    about 15% faster here.  Memory stays bounded by the largest tile's working set.
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc only (not musl)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 256 << 20)
        mallopt(_M_TRIM_THRESHOLD, 512 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.lru_cache(maxsize=2)
def _worker_slide(path: str, fingerprint: str):
    """The opened slide, cached per worker (the fingerprint keys out a replaced file)."""
    return open_slide(path)


@functools.lru_cache(maxsize=1)
def _worker_lookup(staging: Path, stain_json: str) -> StainLookup:
    """The slide's StainLookup, its blocks built once per slide by the workers together."""
    params = StainParameters.from_json(json.loads(stain_json))
    return StainLookup.from_blocks(shared_lookup_blocks(staging / LOOKUP_DIR, params))


def shared_lookup_blocks(directory: Path, params: StainParameters,
                         wait_s: float = LOOKUP_BLOCK_WAIT_S):
    """Yield ``(index, colours, hematoxylin)`` for every block of the StainLookup of
    ``params`` (:meth:`StainLookup.build_block`), sharing the work through ``directory``.

    A process first builds and publishes every block it can claim, then loads the blocks
    other processes claimed, building one itself if it has not appeared within ``wait_s``
    (its claimer may have died).  A block is the same whoever builds it, so a lost race
    costs time only.  With N workers on a slide, each builds about 1/N of the tables.
    """
    directory.mkdir(parents=True, exist_ok=True)
    claimed_elsewhere = []
    for index in range(StainLookup.N_BLOCKS):
        if not claim(directory / f"{index:02d}.claim"):
            claimed_elsewhere.append(index)
            continue
        colours, hematoxylin = StainLookup.build_block(params, index)
        # one (BLOCK, 5) array per block: the 4-byte colour words, then the hematoxylin
        write_array(directory / f"{index:02d}.npy", np.column_stack([colours, hematoxylin]))
        yield index, colours, hematoxylin
    for index in claimed_elsewhere:
        block = wait_for_array(directory / f"{index:02d}.npy", wait_s)
        yield (index, block[:, :4], block[:, 4]) if block is not None else (
            index, *StainLookup.build_block(params, index))


def read_tile(plan: SlidePlan, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels of a reference-grid box ``[x0, y0, x1, y1)``: (h, w, 3) uint8."""
    x0, y0, x1, y1 = box
    slide = _worker_slide(plan.path, plan.fingerprint)
    return read_reference_region(slide, plan.grid, x0, y0, x1 - x0, y1 - y0)


def sample_stain_pixels(plan: SlidePlan, region) -> np.ndarray:
    """The stained pixels among a regular subsample (at most ``STAIN_PIXELS_PER_TILE``) of
    the central ``STAIN_WINDOW`` square of a tile's region, (n, 3) uint8: glass would bias
    the slide's Reinhard statistics by how much of it the sampled windows happen to hold."""
    _prepare_worker()
    x0, y0, x1, y1 = region
    cx, cy, half = (x0 + x1) // 2, (y0 + y1) // 2, STAIN_WINDOW // 2
    rgb = read_tile(plan, (max(x0, cx - half), max(y0, cy - half),
                           min(x1, cx + half), min(y1, cy + half)))
    stride = max(1, math.ceil(math.sqrt(rgb.shape[0] * rgb.shape[1] / STAIN_PIXELS_PER_TILE)))
    pixels = rgb[::stride, ::stride].reshape(-1, 3)
    return pixels[stained_pixels(pixels)]


def segment_tile(plan: SlidePlan, colours: StainLookup | StainParameters, config: WsicellConfig,
                 region) -> dict[str, np.ndarray]:
    """The nuclei owned by one tile region ``[x0, y0, x1, y1)`` (reference px), in level-0
    pixels, as staged columns plus ``crops``."""
    from wsicell.segment import measure_nuclei, segment_hematoxylin

    wx0, wy0, wx1, wy1 = window = plan.window(region)
    rgb = read_tile(plan, window)
    hematoxylin = colours.hematoxylin_of(rgb)
    objects = segment_hematoxylin(hematoxylin, config.segmentation)
    x, y = objects.x + wx0, objects.y + wy0
    x0, y0, x1, y1 = region
    # A nucleus touching a window edge inside the slide is cut by the window: it is
    # longer than the halo, so segment_hematoxylin drops it in a whole-image pass too.
    bx0, by0, bx1, by1 = objects.bbox.T
    cut = (((bx0 == 0) & (wx0 > 0)) | ((by0 == 0) & (wy0 > 0))
           | ((bx1 == wx1 - wx0) & (wx1 < plan.grid.width))
           | ((by1 == wy1 - wy0) & (wy1 < plan.grid.height)))
    owned = measure_nuclei(objects, hematoxylin, rgb, config.segmentation, colours.normalise,
                           which=(x >= x0) & (x < x1) & (y >= y0) & (y < y1) & ~cut)
    scale = plan.grid.scale
    bbox = owned.bbox.astype(np.float64) + [wx0, wy0, wx0, wy0]
    return {
        "x": plan.grid.to_level0(owned.x + wx0),
        "y": plan.grid.to_level0(owned.y + wy0),
        "bbox_x0": np.floor(bbox[:, 0] * scale).astype(np.int32),
        "bbox_y0": np.floor(bbox[:, 1] * scale).astype(np.int32),
        "bbox_x1": np.ceil(bbox[:, 2] * scale).astype(np.int32),
        "bbox_y1": np.ceil(bbox[:, 3] * scale).astype(np.int32),
        "area": (owned.area * plan.reference_mpp ** 2).astype(np.float32),
        "mean_hematoxylin": owned.mean_hematoxylin.astype(np.float32),
        "crops": owned.crops,
    }


def segment_tiles(plan: SlidePlan, stain: dict, config: WsicellConfig,
                  tiles: list[tuple[int, tuple[int, int, int, int]]]) -> dict[int, int]:
    """Dask task: segment ``(tile_id, region)`` tiles and stage each one atomically; returns
    the number of cells of each tile."""
    _prepare_worker()
    plan.staging.mkdir(parents=True, exist_ok=True)
    colours = (_worker_lookup(plan.staging, json.dumps(stain, sort_keys=True))
               if plan.stain_lookup else StainParameters.from_json(stain))
    counts = {}
    for tile_id, region in tiles:
        cells = segment_tile(plan, colours, config, region)
        write_staged_tile(plan.staging, tile_id, cells)
        counts[tile_id] = len(cells["x"])
    return counts


def _staged_rows(plan: SlidePlan, pieces: list[tuple[int, int, int]],
                 names: list[str]) -> dict[str, np.ndarray]:
    """Rows ``first:stop`` of the staged arrays ``names`` of each piece's tile (one read per
    tile), concatenated per name."""
    parts = [(read_staged_tile(plan.staging, tile_id, names), first, stop)
             for tile_id, first, stop in pieces]
    return {name: np.concatenate([staged[name][first:stop] for staged, first, stop in parts])
            for name in names}


def _every_chunk(array):
    """``array`` writing every chunk, skipping zarr's costly check for chunks that equal the
    fill value (measured: it doubled the time of writing crops)."""
    return array.with_config({"write_empty_chunks": True})


def write_cell_columns(plan: SlidePlan, start: int, pieces: list[tuple[int, int, int]]) -> int:
    """Dask task: write the cell table rows ``start..`` of ``pieces`` (see :func:`cell_blocks`);
    ``start`` and the end of the block fall on chunk boundaries of the columns (or the end)."""
    import zarr

    _prepare_worker()
    columns = zarr.open_group(Path(plan.store) / "slides" / plan.slide_id / "cells", mode="r+")
    stop = start + sum(b - a for _, a, b in pieces)
    _every_chunk(columns["cell_id"])[start:stop] = np.arange(start, stop, dtype=np.int64)
    _every_chunk(columns["tile_id"])[start:stop] = np.concatenate(
        [np.full(b - a, tile_id, dtype=np.int32) for tile_id, a, b in pieces])
    for name, values in _staged_rows(plan, pieces, _STAGED_COLUMNS).items():
        _every_chunk(columns[name])[start:stop] = values
    return stop - start


def write_crops(plan: SlidePlan, start: int, pieces: list[tuple[int, int, int]]) -> int:
    """Dask task: write the crops rows ``start..`` of ``pieces``, a block of whole chunks."""
    import zarr

    _prepare_worker()
    crops = _every_chunk(zarr.open_array(Path(plan.store) / "slides" / plan.slide_id / "crops",
                                         mode="r+"))
    block = _staged_rows(plan, pieces, ["crops"])["crops"]
    crops[start:start + len(block)] = block
    return len(block)


def cell_blocks(counts: np.ndarray, tile_ids: np.ndarray, block: int):
    """Split the cells of the tiles (in order) into blocks of ``block`` rows.

    Yields ``(start, pieces)`` with pieces ``(tile_id, first, stop)`` as
    :func:`write_cell_columns` and :func:`write_crops` take them.
    """
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    for start in range(0, total, block):
        stop = min(start + block, total)
        first_tile = int(np.searchsorted(offsets, start, side="right")) - 1
        pieces = []
        for t in range(first_tile, len(counts)):
            if offsets[t] >= stop:
                break
            lo, hi = max(start, offsets[t]) - offsets[t], min(stop, offsets[t + 1]) - offsets[t]
            if hi > lo:
                pieces.append((int(tile_ids[t]), int(lo), int(hi)))
        yield start, pieces


# --------------------------------------------------------------------------- client side


#: Dask's housekeeping intervals for the embedded LocalCluster.  With the defaults (event-loop
#: checks every 20 ms, worker memory every 100 ms, system monitor every 500 ms) the client
#: process of an idle two-worker cluster used 7.9% of a core here, with these 1.7%; the
#: profiler samples every worker's stack 10x less often.  On a laptop whose cores all run
#: workers, that time is taken from segmentation.  An existing cluster (``scheduler=``)
#: keeps its own configuration.
LOCAL_CLUSTER_POLLING = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.worker.profile.interval": "100ms",
}


def local_cluster(workers: int, threads_per_worker: int, memory_limit: str):
    """A LocalCluster of worker processes with :data:`LOCAL_CLUSTER_POLLING`; the dashboard
    on a free port."""
    from distributed import LocalCluster

    with dask.config.set(LOCAL_CLUSTER_POLLING):  # the workers inherit it from their nannies
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                            memory_limit=memory_limit, processes=True, dashboard_address=":0",
                            silence_logs=logging.ERROR)


@contextmanager
def dask_client(workers: int, threads_per_worker: int, memory_limit: str,
                scheduler: str | None, progress: bool):
    """A client of an existing scheduler, or of a LocalCluster of worker processes."""
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise WsicellError(
                f"{scheduler}: cannot connect to the Dask scheduler ({err})") from None
        cluster = None
    else:
        cluster = local_cluster(workers, threads_per_worker, memory_limit)
        client = Client(cluster)
    if progress:
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class TileProgress:
    """One progress bar of tissue tiles over all the slides of a run, shared by the threads
    that ingest them: its total grows as slides are planned."""

    def __init__(self, desc: str, enabled: bool):
        self.enabled = enabled
        self._bar = tqdm(total=0, desc=desc, unit="tile", disable=not enabled, file=sys.stderr,
                         dynamic_ncols=True)
        self._lock = threading.Lock()

    def add(self, total: int, done: int = 0) -> None:
        """Count ``total`` more tiles, ``done`` of them already finished."""
        with self._lock:
            self._bar.total += total
            self._bar.update(done)
            self._bar.refresh()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def message(self, text: str) -> None:
        if self.enabled:
            with self._lock:
                self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def _phase_bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


def _run_tasks(client, submissions, bar):
    """Submit ``(key, weight, fn, args)`` tasks and wait for all, adding the weights of the
    finished ones to ``bar`` (anything with ``update(n)``).

    Returns the results in submission order.  A task's exception (e.g. a
    :class:`WsicellError` from an unreadable region) cancels the rest and is raised here.
    """
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    futures = {client.submit(fn, *args, key=f"wsicell-{key}-{token}", pure=False): weight
               for key, weight, fn, args in submissions}
    try:
        for future in as_completed(futures):
            future.result()
            bar.update(futures[future])
    except BaseException:
        client.cancel(list(futures))
        raise
    return [future.result() for future in futures]


def _thumbnail_and_tissue(slide, mpp: float, config: WsicellConfig):
    tissue_mpp = config.ingest.tissue_mpp
    thumb = slide.thumbnail(round(slide.width * mpp / tissue_mpp),
                            round(slide.height * mpp / tissue_mpp))
    return thumb, detect_tissue(thumb), slide.width * mpp / thumb.shape[1]


def plan_slide(path: Path, store: Path, config: WsicellConfig, mpp: float | None):
    """Open a slide on the client: its plan, attributes, thumbnail, tissue and tiles.

    ``tiles`` holds the manifest columns (level-0 boxes of the tile regions) and
    ``region``, (T, 4) int64 regions in reference px.

    Raises
    ------
    WsicellError
        Unreadable slide, a pyramid without mpp, or no tissue.
    """
    fingerprint = file_fingerprint(path)
    slide = open_slide(path)
    try:
        slide_mpp = resolve_mpp(slide, mpp, config.segmentation.reference_mpp)
        mpp_source = "override" if mpp is not None else (
            "metadata" if slide.mpp is not None else "assumed")
        grid = ReferenceGrid.of(slide, slide_mpp, config.segmentation.reference_mpp)
        thumb, tissue, thumb_mpp = _thumbnail_and_tissue(slide, slide_mpp, config)
    finally:
        slide.close()
    size = config.ingest.tile_size
    plan = SlidePlan(
        slide_id=slide_id_for(path), path=str(path), fingerprint=fingerprint, store=str(store),
        mpp=slide_mpp,
        reference_mpp=config.segmentation.reference_mpp, grid=grid, tile_size=size,
        halo=config.ingest.halo, grid_cols=math.ceil(grid.width / size),
        grid_rows=math.ceil(grid.height / size),
    )
    all_ids = np.arange(plan.grid_cols * plan.grid_rows)
    cores = np.array([plan.core(t) for t in all_ids])
    to_mask = config.segmentation.reference_mpp / thumb_mpp  # thumbnail px per reference px
    fractions = tile_tissue_fractions(tissue, cores, to_mask)
    keep = (fractions >= config.ingest.min_tissue_fraction) & (fractions > 0)
    if not keep.any():
        raise WsicellError(f"{path}: no tissue found (tissue detection on a "
                           f"{thumb.shape[1]}x{thumb.shape[0]} thumbnail)")
    regions = tissue_boxes(tissue, cores[keep], to_mask)
    tissue_pixels = int(np.prod(regions[:, 2:] - regions[:, :2], axis=1).sum())
    plan = dataclasses.replace(plan, stain_lookup=tissue_pixels >= LOOKUP_MIN_PIXELS)
    level0 = np.round(regions * grid.scale).astype(np.int32)
    tiles = {"tile_id": all_ids[keep], "x0": level0[:, 0], "y0": level0[:, 1],
             "x1": level0[:, 2], "y1": level0[:, 3],
             "tissue_fraction": tile_tissue_fractions(tissue, regions, to_mask),
             "n_cells": np.zeros(keep.sum()), "cell_offset": np.zeros(keep.sum()),
             "region": regions}
    attrs = {
        "source_path": str(path), "fingerprint": fingerprint,
        "width": slide.width, "height": slide.height, "mpp": slide_mpp,
        "mpp_source": mpp_source, "backend": slide.backend,
        "reference_mpp": config.segmentation.reference_mpp, "thumbnail_mpp": thumb_mpp,
        "tile_size": size, "halo": plan.halo, "grid_cols": plan.grid_cols,
        "grid_rows": plan.grid_rows, "config": config.to_json(), "wsicell_version": __version__,
    }
    return plan, attrs, thumb, tissue, tiles


def _area(box) -> int:
    """Pixels of a box ``[x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    return (x1 - x0) * (y1 - y0)


def _resumable(root, plan: SlidePlan, attrs: dict) -> bool:
    """Whether the store holds an unfinished run of this very slide and configuration."""
    if slide_status(root, plan.slide_id) is None:
        return False
    try:
        group = root["slides"][plan.slide_id]
        old = dict(group.attrs)
        written = "tiles/cell_offset" in group  # the last array begin_slide writes
    except Exception:  # a group whose metadata a crash left unreadable is redone
        return False
    return written and all(old.get(k) == v for k, v in attrs.items())


def _stain_parameters(client, plan: SlidePlan, tiles: dict, config: WsicellConfig,
                      bars: bool) -> dict:
    """Pass 1: fit the slide's stain parameters on a seeded sample of tissue tiles."""
    rows = np.arange(len(tiles["tile_id"]))
    fractions = tiles["tissue_fraction"]
    candidates = rows[fractions >= 0.5] if (fractions >= 0.5).any() else rows
    rng = np.random.default_rng(config.ingest.seed)
    sample = np.sort(rng.choice(candidates, min(len(candidates), config.ingest.stain_sample_tiles),
                                replace=False))
    submissions = [(f"stain-{plan.slide_id}-{tiles['tile_id'][r]}", 1, sample_stain_pixels,
                    (plan, tuple(int(v) for v in tiles["region"][r]))) for r in sample]
    with _phase_bar(len(submissions), f"{plan.slide_id} stain", bars) as bar:
        pixels = np.concatenate(_run_tasks(client, submissions, bar))
    if len(pixels) < 1000:
        raise WsicellError(f"{plan.path}: too few stained pixels ({len(pixels)}) in the "
                           "sampled tissue tiles to estimate the stain")
    try:
        return fit_stain_parameters(pixels, config.stain).to_json()
    except ValueError as err:  # degenerate colours, e.g. a blank or single-colour slide
        raise WsicellError(f"{plan.path}: cannot estimate the stain ({err})") from None


def _consolidate(client, plan: SlidePlan, tile_ids: np.ndarray, config: WsicellConfig,
                 bars: bool, known: dict[int, int]) -> np.ndarray:
    """Write the final arrays from the staged tiles; returns cells per tile (``known``:
    the counts this run's tasks returned; the tiles of an earlier run are read)."""
    import zarr

    counts = np.array([known[t] if t in known else
                       len(read_staged_tile(plan.staging, t, ["x"])["x"])
                       for t in map(int, tile_ids)], dtype=np.int64)
    group = zarr.open_group(Path(plan.store) / "slides" / plan.slide_id, mode="r+")
    ingest = config.ingest
    create_cell_arrays(group, int(counts.sum()), config.segmentation.crop_size,
                       ingest.crops_per_chunk, ingest.cells_per_chunk)
    # Crops are most of the bytes: one chunk per task spreads them evenly over the workers
    # (blocks of 4 chunks left one worker writing alone at the end: 1.0 -> 0.87 s here).
    blocks = [("columns", write_cell_columns, ingest.cells_per_chunk),
              ("crops", write_crops, ingest.crops_per_chunk)]
    submissions = [(f"write-{what}-{plan.slide_id}-{start}", len(pieces), write,
                    (plan, start, pieces))
                   for what, write, block in blocks
                   for start, pieces in cell_blocks(counts, tile_ids, block)]
    with _phase_bar(sum(w for _, w, _, _ in submissions), f"{plan.slide_id} write",
                    bars) as bar:
        _run_tasks(client, submissions, bar)
    return counts


def ingest_slide(client, root, path: Path, store: Path, config: WsicellConfig, *,
                 mpp: float | None, overwrite: bool, tiles_bar: TileProgress,
                 phase_bars: bool) -> str:
    """Ingest one slide into an open store (the caller holds the store lock).

    ``client`` returns the Dask client; the segmented tiles count on ``tiles_bar``, and
    ``phase_bars`` adds bars of the stain and write phases.
    """
    plan, attrs, thumb, tissue, tiles = plan_slide(path, store, config, mpp)
    if slide_status(root, plan.slide_id) == STATUS_COMPLETE and not overwrite:
        existing = root["slides"][plan.slide_id].attrs
        if existing.get("fingerprint") != attrs["fingerprint"]:
            raise WsicellError(f"{path}: the store already holds a different slide "
                               f"{plan.slide_id!r}; pass --overwrite to replace it")
        tiles_bar.message(f"{plan.slide_id}: already complete, skipped")
        remove_staging(store, plan.slide_id)
        return plan.slide_id
    fresh = overwrite or not _resumable(root, plan, attrs)
    if fresh:
        remove_staging(store, plan.slide_id)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="wsicell-begin") as pool:
            # A new slide's group is written while the workers sample its stain (leaving
            # the block waits for it).
            begun = (pool.submit(begin_slide, root, plan.slide_id, attrs, thumb, tissue, tiles)
                     if fresh else None)
            stain = None if fresh else root["slides"][plan.slide_id].attrs.get("stain")
            if stain is None:
                stain = _stain_parameters(client(), plan, tiles, config, phase_bars)
            if begun is not None:
                begun.result()
    except WsicellError:  # a slide refused before any cell: take its new group away
        if fresh:
            discard_slide(root, plan.slide_id)
        raise
    group = root["slides"][plan.slide_id]
    if "stain" not in group.attrs:
        group.attrs["stain"] = stain
    tile_ids = tiles["tile_id"]
    done = staged_tiles(plan.staging)
    todo = [(int(t), tuple(int(v) for v in region))
            for t, region in zip(tile_ids, tiles["region"]) if int(t) not in done]
    # Largest regions first (Dask runs tasks in submission order): the last tasks, which
    # decide how long workers wait for each other at the end, are the smallest.
    todo.sort(key=lambda tile: -_area(tile[1]))
    # look-up blocks an interrupted run claimed (a slide's stain never changes in its staging)
    shutil.rmtree(plan.staging / LOOKUP_DIR, ignore_errors=True)
    per_task = config.ingest.tiles_per_task
    submissions = [(f"segment-{plan.slide_id}-{todo[i][0]}", len(todo[i:i + per_task]),
                    segment_tiles, (plan, stain, config, todo[i:i + per_task]))
                   for i in range(0, len(todo), per_task)]
    tiles_bar.add(len(tile_ids), done=len(tile_ids) - len(todo))
    known = {}
    if submissions:
        for task_counts in _run_tasks(client(), submissions, tiles_bar):
            known.update(task_counts)
    counts = _consolidate(client(), plan, tile_ids, config, phase_bars, known)
    finish_slide(group, counts, {"n_tiles": int(len(tile_ids))})
    remove_staging(store, plan.slide_id)
    tiles_bar.message(f"{plan.slide_id}: {int(counts.sum())} cells from {len(tile_ids)} "
                      "tissue tiles")
    return plan.slide_id


def ingest(paths, store, config: WsicellConfig = WsicellConfig(), *, mpp=None, workers=2,
           threads_per_worker=1, memory_limit="4GB", scheduler=None, overwrite=False,
           progress=True) -> list[str]:
    """Ingest slides (files or directories of them) into a cell store.

    Parameters
    ----------
    paths : list of str or Path
        Slide files (OpenSlide formats, other pyramids large_image reads, plain images)
        or directories searched for them.
    store : str or Path
        The ``*.zarr`` store; created when missing.
    config : WsicellConfig
    mpp : float, optional
        Level-0 microns per pixel of every slide, overriding the metadata.
    workers, threads_per_worker, memory_limit
        The LocalCluster started when no ``scheduler`` is given.
    scheduler : str, optional
        Address of an existing Dask scheduler (its workers must see the same paths).
    overwrite : bool
        Redo slides that are already complete.
    progress : bool
        Print the dashboard link and progress bars (stderr).

    Returns
    -------
    list of str
        Slide ids, in the order of the inputs.

    Raises
    ------
    WsicellError
        Bad inputs (see :func:`plan_slide`), a store path that is a file or another
        ingest running into the same store.  With several slides, one that fails is
        reported as a warning and the others are still ingested; the error, raised at
        the end, counts the failures.

    Notes
    -----
    Several slides are ingested ``SLIDES_IN_FLIGHT`` at a time (small slides alone cannot
    keep the workers busy), with one progress bar of tissue tiles for all of them.
    """
    files = [p.resolve() for p in find_slide_files(paths)]
    ids = [slide_id_for(p) for p in files]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise WsicellError(f"{duplicates[0]}: two input slides share this id (file name); "
                           "ingest them into separate stores or rename one")
    store = Path(store).resolve()
    open_store(store, mode="a")  # refuse a file or foreign directory before locking
    one = len(files) == 1
    with store_lock(store), _lazy_client(workers, threads_per_worker, memory_limit,
                                         scheduler, progress) as client, \
            closing(TileProgress(files[0].stem if one else "tiles", progress)) as tiles_bar:
        root = open_store(store, mode="r+")

        def run(path: Path) -> str:
            return ingest_slide(client, root, path, store, config, mpp=mpp,
                                overwrite=overwrite, tiles_bar=tiles_bar,
                                phase_bars=progress and one)

        if one:
            return [run(files[0])]
        done, failed = _ingest_concurrently(run, files)
    for err in failed:
        warnings.warn(str(err), stacklevel=2)
    if failed:
        raise WsicellError(f"{len(failed)} of {len(files)} slides failed, the other "
                           f"{len(done)} are complete in {store}; first failure: {failed[0]}")
    return done


def _ingest_concurrently(run, files: list[Path]) -> tuple[list[str], list[WsicellError]]:
    """Run ``run(path)`` for every slide, ``SLIDES_IN_FLIGHT`` at a time, so that the tasks
    of small slides keep every worker busy.  Returns the ids of the slides done (in input
    order) and the errors of those that failed."""
    pool = ThreadPoolExecutor(SLIDES_IN_FLIGHT, thread_name_prefix="wsicell-slide")
    try:
        futures = [pool.submit(run, path) for path in files]
        done, failed = [], []
        for future in futures:
            try:
                done.append(future.result())
            except WsicellError as err:
                failed.append(err)
    finally:  # on an interrupt: start no more slides; the client's closing stops the rest
        pool.shutdown(wait=False, cancel_futures=True)
    return done, failed


@contextmanager
def _lazy_client(*args):
    """A callable returning the Dask client, started on first use (skipped slides need none)."""
    with ExitStack() as stack:
        holder: list = []
        lock = threading.Lock()

        def get():
            with lock:
                if not holder:
                    holder.append(stack.enter_context(dask_client(*args)))
                return holder[0]

        yield get
