"""Whole-slide ingest: slides -> tissue tiles -> nuclei -> the Zarr cell store, on Dask.

Per slide, the client (this process) only reads metadata and a thumbnail; everything that
touches tile pixels runs inside Dask workers:

1. **Plan.** Tissue is detected on a thumbnail; the slide's reference grid (the slide at
   ``segmentation.reference_mpp``) is cut into tiles of ``ingest.tile_size``; tiles with
   enough tissue are kept.  The slide group is created with ``status="ingesting"``.
2. **Pass 1.** A seeded sample of tissue tiles gives a pixel sample from which the slide's
   :class:`~wsicell.segmentation.stain.StainParameters` are fitted once and recorded; the
   ``adaptive`` recipe's threshold and nucleus scale are calibrated once on the same
   tiles' hematoxylin and recorded beside them (``calibration``).
3. **Pass 2.** Each task segments a few tiles: only a tile's tissue region (the box of the
   tissue mask inside it) is read, with a halo so that a nucleus on a border is found
   whole; a nucleus belongs to the tile whose region holds its centroid.  A finished
   tile is written atomically to the staging directory, so a killed run loses at most the
   tiles in flight and a rerun skips what is staged.
4. **Consolidation.** Cells are numbered in tile order; each task writes one block of
   whole chunks of the cell columns or of the crops (no two tasks write the same chunk).
   ``status`` is set to ``"complete"`` last, then the staging files are removed.

The result depends only on the slide and the configuration (with ``ingest.shared_stain``,
on the run's images and the configuration: pass 1 then fits one stain on the sampled tiles
of all of them), so a run that was killed and restarted produces the same store as an
uninterrupted one.  The wall time of each phase of a slide is logged when it is done
(:data:`log`, INFO).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np

from wsicell.analysis.metrics import area_summary
from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.io.slide import check_mpp, find_slide_files
from wsicell.io.staging import local_dir, read_staged_tile, remove_staging, staged_tiles
from wsicell.io.store import (
    STATUS_COMPLETE,
    begin_slide,
    create_cell_arrays,
    discard_slide,
    finish_slide,
    ingesting_slide,
    is_remote,
    open_store,
    remove_empty_store,
    slide_attrs,
    slide_begun,
    slide_cells,
    slide_status,
    store_location,
    store_lock,
)
from wsicell.pipeline.cluster import (
    DASHBOARD,
    TileProgress,
    lazy_client,
    phase_bar,
    run_tasks,
)
from wsicell.pipeline.tiles import (
    LOOKUP_DIR,
    SlidePlan,
    cell_blocks,
    plan_slide,
    prepare_colours,
    sample_hematoxylin,
    sample_stain_pixels,
    segment_tiles,
    slide_id_for,
    write_cell_columns,
    write_crops,
)
from wsicell.segmentation.adaptive import calibrate, hematoxylin_od
from wsicell.segmentation.stain import fit_stain_parameters

SLIDES_IN_FLIGHT = 4  # slides ingested at the same time by a multi-slide run
#: Logs, per finished slide, the wall seconds of each phase of its ingest (INFO; the record
#: carries them as ``phases``, a dict).
log = logging.getLogger(__name__)


class PhaseClock(dict):
    """Wall seconds spent in each named phase, in the order first entered.

    Examples
    --------
    >>> clock = PhaseClock()
    >>> with clock("plan"):
    ...     pass
    >>> list(clock), clock["plan"] >= 0
    (['plan'], True)
    """

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - start

    def __str__(self) -> str:
        return ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in self.items())


def _area(box) -> int:
    """Pixels of a box ``[x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    return (x1 - x0) * (y1 - y0)


def _resumable(root, plan: SlidePlan, attrs: dict) -> bool:
    """Whether the store holds an unfinished run of this very slide and configuration."""
    if not slide_begun(root, plan.slide_id):  # a group a crash left unreadable is redone
        return False
    old = slide_attrs(root, plan.slide_id)
    return all(old.get(k) == v for k, v in attrs.items())


def _sampled_regions(tiles: dict, config: WsicellConfig) -> list[tuple[int, tuple]]:
    """The seeded sample of tissue tiles of pass 1: ``(tile_id, region)`` pairs."""
    rows = np.arange(len(tiles["tile_id"]))
    fractions = tiles["tissue_fraction"]
    candidates = rows[fractions >= 0.5] if (fractions >= 0.5).any() else rows
    rng = np.random.default_rng(config.ingest.seed)
    sample = np.sort(rng.choice(candidates, min(len(candidates), config.ingest.stain_sample_tiles),
                                replace=False))
    return [(int(tiles["tile_id"][r]), tuple(int(v) for v in tiles["region"][r]))
            for r in sample]


def _stain_parameters(client, planned: list[tuple[SlidePlan, dict]], where: str,
                      config: WsicellConfig, bars: bool) -> dict:
    """Pass 1: fit stain parameters on a seeded sample of tissue tiles of each planned
    slide, ``(plan, tiles)`` pairs, pooled (one slide's, or the run's with
    ``ingest.shared_stain``); ``where`` names them in errors."""
    submissions = [(f"stain-{plan.slide_id}-{tile_id}", 1, sample_stain_pixels, (plan, region))
                   for plan, tiles in planned
                   for tile_id, region in _sampled_regions(tiles, config)]
    label = planned[0][0].slide_id if len(planned) == 1 else "shared"
    with phase_bar(len(submissions), f"{label} stain", bars) as bar:
        pixels = np.concatenate(run_tasks(client, submissions, bar))
    if len(pixels) < 1000:
        raise WsicellError(f"{where}: too few stained pixels ({len(pixels)}) in the "
                           "sampled tissue tiles to estimate the stain")
    try:
        seg = config.segmentation
        return fit_stain_parameters(pixels, config.stain, **(seg.adaptive.stain_fit
                                    if seg.method == "adaptive" else {})).to_json()
    except ValueError as err:  # degenerate colours, e.g. a blank or single-colour slide
        raise WsicellError(f"{where}: cannot estimate the stain ({err})") from None


def _shared_stain(client, files: list[Path], store, config: WsicellConfig,
                  mpp: float | None, bars: bool) -> dict:
    """``ingest.shared_stain``: one stain fit for all ``files`` (those that cannot be
    planned are left out here; their own ingest reports them)."""
    planned = []
    for path in files:
        try:
            plan, _, _, _, tiles = plan_slide(path, store, config, mpp)
        except WsicellError:
            continue
        planned.append((plan, tiles))
    if not planned:
        raise WsicellError(f"{files[0]}: no image of this run can be read for a shared stain")
    return _stain_parameters(client, planned, f"{files[0].parent} (the shared stain of "
                             f"{len(planned)} images)", config, bars)


def _calibration_windows(client, plan: SlidePlan, tiles: dict, stain: dict,
                         config: WsicellConfig, bars: bool) -> list[np.ndarray] | None:
    """Pass 1, ``adaptive`` recipe: the hematoxylin of the tiles sampled for the stain, on
    which the slide's threshold and nucleus radius are calibrated (None for the
    fixed-threshold recipes)."""
    if config.segmentation.method != "adaptive":
        return None
    submissions = [(f"calibrate-{plan.slide_id}-{tile_id}", 1, sample_hematoxylin,
                    (plan, stain, region)) for tile_id, region in _sampled_regions(tiles, config)]
    with phase_bar(len(submissions), f"{plan.slide_id} calibration", bars) as bar:
        return run_tasks(client, submissions, bar)


def _calibration(windows: list[np.ndarray] | None, config: WsicellConfig) -> dict | None:
    """The ``adaptive`` recipe's threshold and nucleus radius, calibrated once for the
    slide on :func:`_calibration_windows` (computed here, in the client)."""
    if windows is None:
        return None
    seg = config.segmentation
    found = calibrate([hematoxylin_od(h) for h in windows], seg.reference_mpp, seg.adaptive)
    return dataclasses.asdict(found)


def _prepare_colours(client, plan: SlidePlan, stain: dict) -> list:
    """Start building the slide's StainLookup on every worker (:func:`prepare_colours`),
    so that it is ready when the tiles come; returns the futures, to be held until then
    (a released future is cancelled).  Tiles build it themselves on workers that join
    later or where a future failed."""
    return [client.submit(prepare_colours, plan, stain, workers=[address],
                          allow_other_workers=False, pure=False,
                          key=f"wsicell-colours-{plan.slide_id}-{uuid.uuid4().hex[:8]}")
            for address in client.scheduler_info()["workers"]]


def _consolidate(client, plan: SlidePlan, tile_ids: np.ndarray, config: WsicellConfig,
                 bars: bool, known: dict[int, int]) -> np.ndarray:
    """Write the final arrays from the staged tiles; returns cells and refused objects per
    tile, (T, 2) int64 (``known``: the counts this run's tasks returned; the tiles of an
    earlier run are read)."""
    def staged(tile_id: int) -> tuple[int, int]:
        tile = read_staged_tile(plan.staging, tile_id, ["x", "refused"])
        return len(tile["x"]), int(tile["refused"][0])

    both = np.array([known[t] if t in known else staged(t) for t in map(int, tile_ids)],
                    dtype=np.int64).reshape(-1, 2)
    counts = both[:, 0]
    group = ingesting_slide(open_store(plan.store, mode="r+"), plan.slide_id)
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
    with phase_bar(sum(w for _, w, _, _ in submissions), f"{plan.slide_id} write",
                    bars) as bar:
        run_tasks(client, submissions, bar)
    return both


def ingest_slide(client, root, path: Path, store: Path, config: WsicellConfig, *,
                 mpp: float | None, overwrite: bool, tiles_bar: TileProgress,
                 phase_bars: bool, stain: dict | None = None) -> str:
    """Ingest one slide into an open store (the caller holds the store lock).

    ``client`` returns the Dask client; the segmented tiles count on ``tiles_bar``, and
    ``phase_bars`` adds bars of the stain and write phases.  ``stain``: stain parameters
    to use (a shared fit) instead of fitting the slide's own.
    """
    clock = PhaseClock()
    with clock("plan"):
        plan, attrs, thumb, tissue, tiles = plan_slide(path, store, config, mpp)
    if slide_status(root, plan.slide_id) == STATUS_COMPLETE and not overwrite:
        existing = slide_attrs(root, plan.slide_id)
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
            earlier = {} if fresh else slide_attrs(root, plan.slide_id)
            stain = earlier.get("stain", stain)
            with clock("stain"):
                if stain is None:
                    stain = _stain_parameters(client(), [(plan, tiles)], str(plan.path),
                                              config, phase_bars)
            # look-up blocks an interrupted run claimed (a slide's stain never changes in
            # its staging)
            shutil.rmtree(local_dir(plan.staging) / LOOKUP_DIR, ignore_errors=True)
            calibration = earlier.get("calibration")
            with clock("calibration"):
                windows = None if calibration else _calibration_windows(
                    client(), plan, tiles, stain, config, phase_bars)
                # the workers build their colour look-up while the client calibrates
                colours = _prepare_colours(client(), plan, stain) if plan.stain_lookup else []
                calibration = calibration or _calibration(windows, config)
                if begun is not None:
                    begun.result()
    except WsicellError:  # a slide refused before any cell: take its new group away
        if fresh:
            discard_slide(root, plan.slide_id)
        raise
    group = ingesting_slide(root, plan.slide_id)
    if "stain" not in group.attrs:
        group.attrs.update({"stain": stain, "calibration": calibration})
    tile_ids = tiles["tile_id"]
    done = staged_tiles(plan.staging)
    todo = [(int(t), tuple(int(v) for v in region))
            for t, region in zip(tile_ids, tiles["region"]) if int(t) not in done]
    # Largest regions first (Dask runs tasks in submission order): the last tasks, which
    # decide how long workers wait for each other at the end, are the smallest.
    todo.sort(key=lambda tile: -_area(tile[1]))
    per_task = config.ingest.tiles_per_task
    submissions = [(f"segment-{plan.slide_id}-{todo[i][0]}", len(todo[i:i + per_task]),
                    segment_tiles, (plan, stain, calibration, config, todo[i:i + per_task]))
                   for i in range(0, len(todo), per_task)]
    tiles_bar.add(len(tile_ids), done=len(tile_ids) - len(todo))
    known = {}
    with clock("segmentation"):
        if submissions:
            for task_counts in run_tasks(client(), submissions, tiles_bar):
                known.update(task_counts)
    del colours  # the futures of _prepare_colours, held until the tiles are done
    with clock("writing"):
        counts = _consolidate(client(), plan, tile_ids, config, phase_bars, known)
        n_refused = int(counts[:, 1].sum())
        finish_slide(group, counts[:, 0], {"n_tiles": int(len(tile_ids)),
                                           "n_refused": n_refused})
        remove_staging(store, plan.slide_id)
    areas = slide_cells(root, plan.slide_id, ["area"])["area"].to_numpy()
    tiles_bar.message(ingest_summary(plan.slide_id, len(tile_ids), n_refused, areas))
    log.info("%s: %s", plan.slide_id, clock, extra={"phases": dict(clock)})
    return plan.slide_id


def ingest_summary(slide_id: str, n_tiles: int, n_refused: int, area_um2: np.ndarray) -> str:
    """The line ingest prints for a finished slide: cells, tiles, the nucleus-area
    distribution and the objects refused as too large to be a nucleus.

    Examples
    --------
    >>> ingest_summary("s", 1, 0, np.array([5.0, 20, 30, 40, 50]))
    's: 5 cells from 1 tissue tile; nucleus area median 30 um2 (quartiles 20-40), 20.0% under 10 um2'
    """
    line = (f"{slide_id}: {len(area_um2)} cells from {n_tiles} tissue "
            f"tile{'s' if n_tiles != 1 else ''}; {area_summary(area_um2)}")
    if n_refused:
        line += f"; {n_refused} object{'s' if n_refused != 1 else ''} refused as too large"
    return line


def ingest(store, paths, config: WsicellConfig | None = None, *, mpp=None, workers=2,
           threads_per_worker=1, memory_limit="4GB", scheduler=None, dashboard=DASHBOARD,
           overwrite=False, progress=True) -> list[str]:
    """Ingest slides (files or directories of them) into a cell store.

    Parameters
    ----------
    store : str or Path
        The ``*.zarr`` store, a path or an fsspec URL (``s3://bucket/cells.zarr``); created
        when missing.
    paths : str, Path or list of them
        Slide files (OpenSlide formats, other pyramids large_image reads, plain images)
        or directories searched for them.
    config : WsicellConfig, optional
        Default: ``WsicellConfig()`` (the ``adaptive`` segmentation).
    mpp : float, optional
        Level-0 microns per pixel of every slide, overriding the metadata.
    workers, threads_per_worker, memory_limit
        The LocalCluster started when no ``scheduler`` is given.
    scheduler : str, optional
        Address of an existing Dask scheduler (its workers must see the same paths).
    dashboard : str or None
        ``host:port`` of the embedded cluster's dashboard (default: 127.0.0.1, a free
        port); None starts none.
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

    Examples
    --------
    >>> import wsicell
    >>> wsicell.ingest("cells.zarr", "slides/", workers=2)  # doctest: +SKIP
    ['slide_a', 'slide_b']
    """
    config = config or WsicellConfig()
    mpp = None if mpp is None else check_mpp(mpp)
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    files = [p.resolve() for p in find_slide_files(paths)]
    ids = [slide_id_for(p) for p in files]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise WsicellError(f"{duplicates[0]}: two input slides share this id (file name); "
                           "ingest them into separate stores or rename one")
    store = store_location(store)  # a resolved path, or the URL of object storage
    # a run that refuses all its slides removes the local store it made
    created = not is_remote(store) and not store.exists()
    open_store(store, mode="a")  # refuse a file or foreign directory before locking
    one = len(files) == 1
    with store_lock(store), lazy_client(workers, threads_per_worker, memory_limit,
                                         scheduler, progress, dashboard) as client, \
            closing(TileProgress(files[0].stem if one else "tiles", progress)) as tiles_bar:
        root = open_store(store, mode="r+")
        bars = progress and one and sys.stderr.isatty()

        def run(path: Path) -> str:
            return ingest_slide(client, root, path, store, config, mpp=mpp,
                                overwrite=overwrite, tiles_bar=tiles_bar, phase_bars=bars,
                                stain=shared)

        try:
            shared = (_shared_stain(client(), files, store, config, mpp, bars)
                      if config.ingest.shared_stain and not one else None)
            if one:
                return [run(files[0])]
            done, failed = _ingest_concurrently(run, files)
        except WsicellError:
            if created:
                remove_empty_store(store)
            raise
        if created and not done:
            remove_empty_store(store)
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
