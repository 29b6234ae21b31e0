"""A slide's ingest plan and the Dask tasks that run on its tiles (worker side).

The client plans a slide (:func:`plan_slide`: tissue on a thumbnail, the reference grid cut
into tiles, tiles with enough tissue kept); workers then sample its stain
(:func:`sample_stain_pixels`; and its hematoxylin for a per-slide calibration,
:func:`sample_hematoxylin`), segment its tiles into the staging directory
(:func:`segment_tiles`) and write the final arrays in blocks of whole chunks
(:func:`write_cell_columns`, :func:`write_crops`).  The workers of one slide build its
stain look-up table together (:func:`shared_lookup_blocks`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsicell import __version__
from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.io.slide import (
    ReferenceGrid,
    open_slide,
    read_reference_region,
    resolve_mpp,
)
from wsicell.io.staging import (
    claim,
    local_dir,
    make_staging,
    read_staged_tile,
    staging_dir,
    wait_for_array,
    write_array,
    write_staged_tile,
)
from wsicell.io.store import (
    CELL_COLUMNS,
    file_fingerprint,
    write_cell_rows,
    write_crop_rows,
)
from wsicell.pipeline.cluster import prepare_worker
from wsicell.segmentation.adaptive import (
    Calibration,
    background_block,
    hematoxylin_od,
    segment_hematoxylin_od,
)
from wsicell.segmentation.measurements import nucleus_measurements
from wsicell.segmentation.nuclei import (
    Objects,
    crop_placement,
    measure_nuclei,
    segment_hematoxylin,
)
from wsicell.segmentation.stain import StainLookup, StainParameters
from wsicell.segmentation.tissue import (
    SMALL_FIELD_PX,
    detect_tissue,
    small_field_tissue,
    stained_pixels,
    tile_tissue_fractions,
    tissue_boxes,
)

STAIN_PIXELS_PER_TILE = 1 << 16
#: Tissue pixels (reference grid) from which a slide's colours go through a StainLookup:
#: building the table costs about as much as computing ~40 MP directly, per worker.
LOOKUP_MIN_PIXELS = 64_000_000
STAIN_WINDOW = 1024  # reference px read per sampled tile in pass 1
#: Seconds a worker waits for a look-up block another worker claimed (one takes ~0.04 s)
#: before building it itself.
LOOKUP_BLOCK_WAIT_S = 10.0
LOOKUP_DIR = "lookup"  # in a slide's staging directory: the blocks its workers share
_STAGED_COLUMNS = [c for c in CELL_COLUMNS if c not in ("cell_id", "tile_id")]


@dataclass(frozen=True)
class SlidePlan:
    """Everything a worker needs to process a slide's tiles (small and picklable).

    Coordinates of tiles are reference-grid pixels; ``tile_id = row * grid_cols + col``.
    A tile's *region* is the part of it that holds tissue (:func:`wsicell.segmentation.tissue.tissue_boxes`):
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
    max_plain_pixels: int
    stain_lookup: bool = True
    align: int = 1  #: windows start on multiples of this (reference px; see :meth:`window`)

    def core(self, tile_id: int) -> tuple[int, int, int, int]:
        """``[x0, y0, x1, y1)`` of the tile itself (reference px)."""
        row, col = divmod(int(tile_id), self.grid_cols)
        x0, y0 = col * self.tile_size, row * self.tile_size
        return x0, y0, min(x0 + self.tile_size, self.grid.width), min(y0 + self.tile_size,
                                                                      self.grid.height)

    def window(self, region) -> tuple[int, int, int, int]:
        """A region ``[x0, y0, x1, y1)`` grown by the halo, its start moved down to a
        multiple of ``align`` (the block of the ``adaptive`` recipe's background, so that
        a tile sees the background the whole slide would), clipped to the slide
        (reference px)."""
        x0, y0, x1, y1 = region
        a = self.align
        return (max((x0 - self.halo) // a * a, 0), max((y0 - self.halo) // a * a, 0),
                min(x1 + self.halo, self.grid.width), min(y1 + self.halo, self.grid.height))

    @property
    def staging(self) -> Path | str:
        return staging_dir(self.store, self.slide_id)


def slide_id_for(path: Path) -> str:
    """Store id of a slide: its file name without suffix, reduced to ``[A-Za-z0-9._-]``."""
    name = path.name[: -len(".ome.tif")] if path.name.lower().endswith(".ome.tif") else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "slide"


@functools.lru_cache(maxsize=2)
def _worker_slide(path: str, fingerprint: str, max_plain_pixels: int):
    """The opened slide, cached per worker (the fingerprint keys out a replaced file)."""
    return open_slide(path, max_plain_pixels)


@functools.lru_cache(maxsize=1)
def _worker_lookup(staging: Path, stain_json: str) -> StainLookup:
    """The slide's StainLookup, its blocks built once per slide by the workers together."""
    params = StainParameters.from_json(json.loads(stain_json))
    return StainLookup.from_blocks(shared_lookup_blocks(staging / LOOKUP_DIR, params))


def shared_lookup_blocks(directory: Path, params: StainParameters,
                         wait_s: float = LOOKUP_BLOCK_WAIT_S):
    """Yield ``(index, colours, stains)`` for every block of the StainLookup of
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
        colours, stains = StainLookup.build_block(params, index)
        # one (BLOCK, 6) array per block: the 4-byte colour words, then hematoxylin and eosin
        write_array(directory / f"{index:02d}.npy", np.column_stack([colours, stains]))
        yield index, colours, stains
    for index in claimed_elsewhere:
        block = wait_for_array(directory / f"{index:02d}.npy", wait_s)
        # a block of an older layout (staged by an earlier version) is rebuilt, not misread
        usable = block is not None and block.shape == (StainLookup.BLOCK, 6)
        yield (index, block[:, :4], block[:, 4:]) if usable else (
            index, *StainLookup.build_block(params, index))


def read_tile(plan: SlidePlan, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels of a reference-grid box ``[x0, y0, x1, y1)``: (h, w, 3) uint8."""
    x0, y0, x1, y1 = box
    slide = _worker_slide(plan.path, plan.fingerprint, plan.max_plain_pixels)
    return read_reference_region(slide, plan.grid, x0, y0, x1 - x0, y1 - y0)


def _sample_window(plan: SlidePlan, region) -> np.ndarray:
    """Pixels of the central ``STAIN_WINDOW`` square of a tile's region, (h, w, 3) uint8."""
    x0, y0, x1, y1 = region
    cx, cy, half = (x0 + x1) // 2, (y0 + y1) // 2, STAIN_WINDOW // 2
    return read_tile(plan, (max(x0, cx - half), max(y0, cy - half),
                            min(x1, cx + half), min(y1, cy + half)))


def sample_stain_pixels(plan: SlidePlan, region) -> np.ndarray:
    """The stained pixels among a regular subsample (at most ``STAIN_PIXELS_PER_TILE``) of
    the central ``STAIN_WINDOW`` square of a tile's region, (n, 3) uint8: glass would bias
    the slide's Reinhard statistics by how much of it the sampled windows happen to hold."""
    prepare_worker()
    rgb = _sample_window(plan, region)
    stride = max(1, math.ceil(math.sqrt(rgb.shape[0] * rgb.shape[1] / STAIN_PIXELS_PER_TILE)))
    pixels = rgb[::stride, ::stride].reshape(-1, 3)
    return pixels[stained_pixels(pixels)]


def sample_hematoxylin(plan: SlidePlan, stain: dict, region) -> np.ndarray:
    """Dask task: the hematoxylin intensity (h, w) uint8 of the window
    :func:`sample_stain_pixels` read, under the slide's fitted stain, for the per-slide
    calibration of the ``adaptive`` recipe."""
    prepare_worker()
    return StainParameters.from_json(stain).hematoxylin_of(_sample_window(plan, region))


def needs_eosin(config: WsicellConfig) -> bool:
    """Whether the configured recipe tests eosin inside its objects (``adaptive`` with a
    ``max_eosin_ratio``)."""
    seg = config.segmentation
    return seg.method == "adaptive" and seg.adaptive.max_eosin_ratio > 0


def segment_objects(hematoxylin: np.ndarray, config: WsicellConfig,
                    calibration: dict | None, eosin: np.ndarray | None = None,
                    slide_mpp: float | None = None) -> tuple[Objects, np.ndarray]:
    """The nuclei of a tile's hematoxylin (H, W) uint8 at the reference resolution by the
    configured recipe, and the centroids (K, 2) of the objects refused as too large
    (``adaptive``, with the slide's ``calibration``, a :class:`Calibration` as a dict;
    ``eosin``, the tile's eosin intensity (H, W) uint8, where :func:`needs_eosin`;
    ``slide_mpp``, the slide's level-0 um/px, for the recipe's ``min_source_px``)."""
    seg = config.segmentation
    if seg.method == "adaptive":
        labels, refused = segment_hematoxylin_od(
            hematoxylin_od(hematoxylin), seg.reference_mpp, seg.adaptive,
            Calibration(**calibration), None if eosin is None else hematoxylin_od(eosin),
            slide_mpp)
        return Objects.from_labels(labels), refused
    return segment_hematoxylin(hematoxylin, seg), np.zeros((0, 2))


def segment_tile(plan: SlidePlan, colours: StainLookup | StainParameters, config: WsicellConfig,
                 calibration: dict | None, region) -> dict[str, np.ndarray]:
    """The nuclei owned by one tile region ``[x0, y0, x1, y1)`` (reference px), in level-0
    pixels, as staged columns plus ``crops``, ``masks`` and ``refused`` (one value: the
    objects refused as too large whose centroid lies in the region).  The eosin of the
    normalised tile comes with its hematoxylin where :func:`needs_eosin`."""
    wx0, wy0, wx1, wy1 = window = plan.window(region)
    rgb = read_tile(plan, window)
    if needs_eosin(config):
        hematoxylin, eosin = colours.stains_of(rgb)
    else:
        hematoxylin, eosin = colours.hematoxylin_of(rgb), None
    objects, refused = segment_objects(hematoxylin, config, calibration, eosin, plan.mpp)
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
    rx, ry = refused[:, 0] + wx0, refused[:, 1] + wy0
    n_refused = int(((rx >= x0) & (rx < x1) & (ry >= y0) & (ry < y1)).sum())
    scale = plan.grid.scale
    bbox = owned.bbox.astype(np.float64) + [wx0, wy0, wx0, wy0]
    origin, crop_px = crop_placement(owned.bbox, config.segmentation.crop_size)
    return {
        "x": plan.grid.to_level0(owned.x + wx0),
        "y": plan.grid.to_level0(owned.y + wy0),
        "bbox_x0": np.floor(bbox[:, 0] * scale).astype(np.int32),
        "bbox_y0": np.floor(bbox[:, 1] * scale).astype(np.int32),
        "bbox_x1": np.ceil(bbox[:, 2] * scale).astype(np.int32),
        "bbox_y1": np.ceil(bbox[:, 3] * scale).astype(np.int32),
        "area": (owned.area * plan.reference_mpp ** 2).astype(np.float32),
        "mean_hematoxylin": owned.mean_hematoxylin.astype(np.float32),
        "crop_x0": (origin[:, 0] + wx0) * scale,
        "crop_y0": (origin[:, 1] + wy0) * scale,
        "crop_px": (crop_px * scale).astype(np.float32),
        "crops": owned.crops,
        "masks": owned.masks,
        "refused": np.array([n_refused]),
    }


def _slide_colours(plan: SlidePlan, stain: dict) -> StainLookup | StainParameters:
    """The colour standardisation of a slide's tiles in a worker: its StainLookup, built
    once per worker process (its blocks shared with the host's other workers), where
    ``plan.stain_lookup``; else its parameters."""
    prepare_worker()
    make_staging(plan.staging)
    if plan.stain_lookup:
        return _worker_lookup(local_dir(plan.staging), json.dumps(stain, sort_keys=True))
    return StainParameters.from_json(stain)


def prepare_colours(plan: SlidePlan, stain: dict) -> None:
    """Dask task: build the worker's StainLookup of a slide ahead of its first tile (ingest
    runs it on every worker while the client calibrates the segmentation)."""
    _slide_colours(plan, stain)


def segment_tiles(plan: SlidePlan, stain: dict, calibration: dict | None,
                  config: WsicellConfig, tiles: list[tuple[int, tuple[int, int, int, int]]]
                  ) -> dict[int, tuple[int, int]]:
    """Dask task: segment ``(tile_id, region)`` tiles and stage each one atomically; returns
    the numbers of cells and of refused objects of each tile."""
    colours = _slide_colours(plan, stain)
    counts = {}
    for tile_id, region in tiles:
        cells = segment_tile(plan, colours, config, calibration, region)
        # QuPath's nucleus measurements, on the crops' masks at their scale (um per crop px)
        cells.update(nucleus_measurements(cells["masks"], cells["crops"], stain["stain_matrix"],
                                          cells["crop_px"] * plan.mpp))
        write_staged_tile(plan.staging, tile_id, cells)
        counts[tile_id] = len(cells["x"]), int(cells["refused"][0])
    return counts


def _staged_rows(plan: SlidePlan, pieces: list[tuple[int, int, int]],
                 names: list[str]) -> dict[str, np.ndarray]:
    """Rows ``first:stop`` of the staged arrays ``names`` of each piece's tile (one read per
    tile), concatenated per name."""
    parts = [(read_staged_tile(plan.staging, tile_id, names), first, stop)
             for tile_id, first, stop in pieces]
    return {name: np.concatenate([staged[name][first:stop] for staged, first, stop in parts])
            for name in names}


def write_cell_columns(plan: SlidePlan, start: int, pieces: list[tuple[int, int, int]]) -> int:
    """Dask task: write the cell table rows ``start..`` of ``pieces`` (see :func:`cell_blocks`);
    ``start`` and the end of the block fall on chunk boundaries of the columns (or the end)."""
    prepare_worker()
    stop = start + sum(b - a for _, a, b in pieces)
    columns = {
        "cell_id": np.arange(start, stop, dtype=np.int64),
        "tile_id": np.concatenate([np.full(b - a, tile_id, dtype=np.int32)
                                   for tile_id, a, b in pieces]),
        **_staged_rows(plan, pieces, _STAGED_COLUMNS),
    }
    write_cell_rows(plan.store, plan.slide_id, start, columns)
    return stop - start


def write_crops(plan: SlidePlan, start: int, pieces: list[tuple[int, int, int]]) -> int:
    """Dask task: write the crops and masks rows ``start..`` of ``pieces``, a block of whole
    chunks."""
    prepare_worker()
    block = _staged_rows(plan, pieces, ["crops", "masks"])
    write_crop_rows(plan.store, plan.slide_id, start, block["crops"], block["masks"])
    return len(block["crops"])


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


#: Largest side of a slide, millimetres: a glass slide is 75 mm long; a larger extent is a
#: wrong resolution, refused before the reference grid and its tiles are made.
MAX_SLIDE_MM = 200.0


def _check_extent(slide, mpp: float) -> None:
    width_mm, height_mm = slide.width * mpp / 1000, slide.height * mpp / 1000
    if max(width_mm, height_mm) > MAX_SLIDE_MM:
        raise WsicellError(
            f"{slide.path}: {slide.width} x {slide.height} px at {mpp:g} um/px would be "
            f"{width_mm:.0f} x {height_mm:.0f} mm, larger than any glass slide "
            f"({MAX_SLIDE_MM:g} mm); check --mpp")


def _thumbnail_and_tissue(slide, mpp: float, config: WsicellConfig):
    if max(slide.width, slide.height) < SMALL_FIELD_PX:  # a field: tissue at full resolution
        thumb = slide.thumbnail(slide.width, slide.height)
        return thumb, small_field_tissue(thumb, config.ingest.min_tissue_fraction), mpp
    # never above level 0: a coarse slide is not enlarged to the thumbnail's resolution
    shrink = min(1.0, mpp / config.ingest.tissue_mpp)
    thumb = slide.thumbnail(round(slide.width * shrink), round(slide.height * shrink))
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
    seg = config.segmentation
    slide = open_slide(path, config.ingest.max_plain_image_pixels)
    try:
        slide_mpp = resolve_mpp(slide, mpp, config.segmentation.reference_mpp)
        _check_extent(slide, slide_mpp)
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
        max_plain_pixels=config.ingest.max_plain_image_pixels,
        align=background_block(seg.adaptive.tophat_radius_um / seg.reference_mpp)
        if seg.method == "adaptive" else 1,
    )
    all_ids = np.arange(plan.grid_cols * plan.grid_rows)
    rows, cols = np.divmod(all_ids, plan.grid_cols)
    x0, y0 = cols * size, rows * size
    cores = np.stack([x0, y0, np.minimum(x0 + size, grid.width),
                      np.minimum(y0 + size, grid.height)], axis=1).reshape(-1, 4)
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
