"""The cell store: one Zarr v3 hierarchy holding the cells of many slides.

Layout (validated against ``schemas/store*.schema.json``)::

    STORE.zarr/                     attrs {"wsicell_store_version": 1}
      slides/<slide_id>/            attrs: status, source_path, fingerprint, width, height, mpp,
                                    stain, config, wsicell_version, n_cells, ...
        crops                       (N, S, S, 3) uint8, chunks of ingest.crops_per_chunk crops
        cells/<column>              (N,) one array per column of CELL_COLUMNS
        tiles/<column>              (T,) the tile manifest, one entry per tissue tile
        thumbnail                   (h, w, 3) uint8;  tissue_mask (h, w) bool
      labels/<model_id>/ (inside a slide group, written by predict): cluster, proba

A slide is usable only when its ``status`` is ``"complete"``, which ingest sets last.
Ingest's own working files live *beside* the store, never inside it: ``STORE.zarr.lock``
(an advisory lock held by the running ingest) and ``STORE.zarr.staging/<slide_id>/``
(one atomically written file per finished tile, removed when the slide is complete).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import ZstdCodec

from wsicell.errors import WsicellError
from wsicell.files import write_atomically

STORE_VERSION = 1
STATUS_INGESTING = "ingesting"
STATUS_COMPLETE = "complete"

CELL_COLUMNS: dict[str, str] = {
    "cell_id": "int64",
    "x": "float64",
    "y": "float64",
    "bbox_x0": "int32",
    "bbox_y0": "int32",
    "bbox_x1": "int32",
    "bbox_y1": "int32",
    "area": "float32",
    "mean_hematoxylin": "float32",
    "tile_id": "int32",
}
TILE_COLUMNS: dict[str, str] = {
    "tile_id": "int32",
    "x0": "int32",
    "y0": "int32",
    "x1": "int32",
    "y1": "int32",
    "tissue_fraction": "float32",
    "n_cells": "int32",
    "cell_offset": "int64",
}
# zstd level 1: crops compress 3.80x (level 3: 3.93x) at twice the encoding speed
_COMPRESSOR = ZstdCodec(level=1)


# --------------------------------------------------------------------------- reading


def _is_store(group: zarr.Group) -> bool:
    return group.attrs.get("wsicell_store_version") == STORE_VERSION


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open a cell store.

    Parameters
    ----------
    path : str or Path
        The store directory (``*.zarr``).
    mode : {"r", "r+", "a"}
        ``"r"`` / ``"r+"`` need an existing store; ``"a"`` creates an empty one when the
        path does not exist yet.

    Raises
    ------
    WsicellError
        The path is a file, is missing (``"r"``, ``"r+"``), or is not a wsicell store.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WsicellError(f"{path}: is a file, not a cell store directory")
    if not path.exists():
        if mode != "a":
            raise WsicellError(f"{path}: no such cell store")
        root = zarr.open_group(path, mode="w", zarr_format=3)
        root.attrs["wsicell_store_version"] = STORE_VERSION
        root.create_group("slides")
        return root
    if not (path / "zarr.json").is_file():
        if mode == "a" and not any(path.iterdir()):
            path.rmdir()
            return open_store(path, mode)
        raise WsicellError(f"{path}: not a wsicell cell store (no zarr.json)")
    try:
        root = zarr.open_group(path, mode="r" if mode == "r" else "r+", zarr_format=3)
    except Exception as err:
        raise WsicellError(f"{path}: not a readable Zarr v3 store ({err})") from None
    if not _is_store(root):
        raise WsicellError(f"{path}: not a wsicell cell store (no wsicell_store_version)")
    return root


def _slides(root: zarr.Group) -> zarr.Group:
    return root["slides"]


def _slide_ids(root: zarr.Group) -> list[str]:
    return sorted(_slides(root).group_keys())


def slide_status(root: zarr.Group, slide_id: str) -> str | None:
    """``"complete"``, ``"ingesting"``, or None when the store has no such slide."""
    slides = _slides(root)
    if slide_id not in slides:
        return None
    return slides[slide_id].attrs.get("status")


def complete_slides(root: zarr.Group) -> list[str]:
    """Ids of the complete slides, sorted; warns about (and skips) incomplete ones."""
    complete = []
    for slide_id in _slide_ids(root):
        if slide_status(root, slide_id) == STATUS_COMPLETE:
            complete.append(slide_id)
        else:
            warnings.warn(f"{root.store}: slide {slide_id!r} is incomplete and is skipped "
                          "(rerun ingest to finish it)", stacklevel=2)
    return complete


def slide_group(root: zarr.Group, slide_id: str) -> zarr.Group:
    """The group of a complete slide."""
    status = slide_status(root, slide_id)
    if status is None:
        raise WsicellError(f"{root.store}: no slide {slide_id!r} in the store")
    if status != STATUS_COMPLETE:
        raise WsicellError(f"{root.store}: slide {slide_id!r} is incomplete (status {status!r})")
    return _slides(root)[slide_id]


def slide_crops(root: zarr.Group, slide_id: str) -> zarr.Array:
    """Cell images of a complete slide, (N, S, S, 3) uint8, in cell_id order."""
    return slide_group(root, slide_id)["crops"]


def slide_cells(root: zarr.Group, slide_id: str) -> pd.DataFrame:
    """Cell table of a complete slide, one row per cell in cell_id order."""
    cells = slide_group(root, slide_id)["cells"]
    return pd.DataFrame({name: cells[name][:] for name in CELL_COLUMNS})


def store_fingerprint(root: zarr.Group, slide_ids) -> str:
    """A hash identifying the cells of the given slides (content, config and stain).

    The slides are taken in sorted order, so the fingerprint is that of the set.
    """
    digest = hashlib.sha256()
    for slide_id in sorted(slide_ids):
        attrs = slide_group(root, slide_id).attrs
        record = {k: attrs.get(k) for k in ("fingerprint", "n_cells", "stain", "config", "mpp")}
        digest.update(json.dumps([slide_id, record], sort_keys=True).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def file_fingerprint(path: str | Path, block: int = 1 << 20) -> str:
    """Content fingerprint of a slide file: SHA-256 of its size, first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            digest.update(f.read(block))
    return digest.hexdigest()


@contextmanager
def store_lock(path: str | Path):
    """Hold the store's writer lock (``STORE.zarr.lock``) for the duration.

    The lock is an advisory ``flock``: the operating system releases it when the process
    ends, however it ends, so a killed ingest never leaves a stale lock.

    Raises
    ------
    WsicellError
        Another process holds the lock (an ingest into the same store is running).
    """
    lock_path = Path(f"{Path(path)}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            raise WsicellError(
                f"{path}: another ingest is writing to this store (pid {holder or '?'}); "
                "wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def staging_dir(store_path: str | Path, slide_id: str) -> Path:
    """Where the finished tiles of a slide wait for consolidation."""
    return Path(f"{Path(store_path)}.staging") / slide_id


def _staged_name(tile_id: int) -> str:
    return f"tile_{tile_id:09d}.npz"


def write_array(path: Path, array: np.ndarray) -> None:
    """Write an array to a ``.npy`` file atomically."""
    write_atomically(path, lambda f: np.save(f, array))


def wait_for_array(path: Path, timeout_s: float) -> np.ndarray | None:
    """The array of a ``.npy`` file another process writes with :func:`write_array`, once
    it appears; None if it has not within ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)
    return np.load(path)


def claim(path: Path) -> bool:
    """Create the empty file ``path``; True only for the one process that creates it."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def write_staged_tile(directory: Path, tile_id: int, columns: dict[str, np.ndarray]) -> None:
    """Write one tile's cells atomically."""
    write_atomically(directory / _staged_name(tile_id), lambda f: np.savez(f, **columns))


def read_staged_tile(directory: Path, tile_id: int, names=None) -> dict[str, np.ndarray]:
    """The arrays of one staged tile (only ``names`` when given)."""
    with np.load(directory / _staged_name(tile_id)) as data:
        return {name: data[name] for name in (names or data.files)}


def staged_tiles(directory: Path) -> set[int]:
    """Ids of the tiles already staged (partial temporary files are not counted)."""
    if not directory.is_dir():
        return set()
    return {int(p.name[5:14]) for p in directory.glob("tile_*.npz")}


def remove_staging(store_path: str | Path, slide_id: str) -> None:
    """Delete a slide's staging directory (and the staging root once it is empty)."""
    directory = staging_dir(store_path, slide_id)
    shutil.rmtree(directory, ignore_errors=True)
    try:
        directory.parent.rmdir()
    except OSError:
        pass


def begin_slide(
    root: zarr.Group, slide_id: str, attrs: dict, thumbnail: np.ndarray,
    tissue_mask: np.ndarray, tiles: dict[str, np.ndarray],
) -> zarr.Group:
    """(Re)create a slide group with status ``"ingesting"``: attributes, pictures, tiles."""
    group = _slides(root).create_group(slide_id, overwrite=True)
    group.attrs.update({**attrs, "status": STATUS_INGESTING})
    group.create_array("thumbnail", data=thumbnail, chunks=thumbnail.shape,
                       compressors=_COMPRESSOR)
    group.create_array("tissue_mask", data=tissue_mask, chunks=tissue_mask.shape,
                       compressors=_COMPRESSOR)
    tile_group = group.create_group("tiles")
    for name, dtype in TILE_COLUMNS.items():
        values = np.asarray(tiles[name], dtype=dtype)
        tile_group.create_array(name, data=values, chunks=(max(1, len(values)),),
                                compressors=_COMPRESSOR)
    return group


def discard_slide(root: zarr.Group, slide_id: str) -> None:
    """Remove a slide group this run began but could not ingest (a refused slide leaves
    nothing behind, not an incomplete slide that every reader warns about)."""
    slides = _slides(root)
    if slide_id in slides:
        del slides[slide_id]


def create_cell_arrays(
    group: zarr.Group, n_cells: int, crop_size: int, crops_per_chunk: int, cells_per_chunk: int
) -> None:
    """Create empty ``crops`` and ``cells/*`` arrays of ``n_cells`` rows (overwriting)."""
    group.create_array(
        "crops", shape=(n_cells, crop_size, crop_size, 3), dtype="uint8",
        chunks=(crops_per_chunk, crop_size, crop_size, 3), compressors=_COMPRESSOR,
        fill_value=255, overwrite=True, dimension_names=("cell", "y", "x", "channel"),
    )
    cells = group.create_group("cells", overwrite=True)
    for name, dtype in CELL_COLUMNS.items():
        cells.create_array(name, shape=(n_cells,), dtype=dtype, chunks=(cells_per_chunk,),
                           compressors=_COMPRESSOR, fill_value=0, dimension_names=("cell",))


def finish_slide(group: zarr.Group, tile_counts: np.ndarray, attrs: dict) -> None:
    """Record per-tile counts and the final attributes, then mark the slide complete."""
    counts = np.asarray(tile_counts, dtype=np.int64)
    group["tiles/n_cells"][:] = counts.astype(np.int32)
    group["tiles/cell_offset"][:] = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    group.attrs.update({**attrs, "n_cells": int(counts.sum())})
    group.attrs["status"] = STATUS_COMPLETE


# --------------------------------------------------------------------------- validation


def load_schema(name: str) -> dict:
    """A JSON Schema shipped in ``wsicell.schemas``."""
    return json.loads(files("wsicell.schemas").joinpath(name).read_text())


def _check(instance, schema, where: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{where}: {'/'.join(map(str, e.absolute_path)) or '<attrs>'}: {e.message}"
            for e in validator.iter_errors(instance)]


def _check_arrays(group: zarr.Group, layout: dict, sizes: dict, where: str) -> list[str]:
    problems = []
    for name, spec in layout.items():
        if name not in group:
            problems.append(f"{where}: missing array {name}")
            continue
        array = group[name]
        expected = tuple(sizes.get(d, d) for d in spec["shape"])
        if str(array.dtype) != spec["dtype"] or tuple(array.shape) != expected:
            problems.append(f"{where}/{name}: {array.dtype}{tuple(array.shape)}, "
                            f"expected {spec['dtype']}{expected}")
    return problems


def validate_store(path: str | Path) -> list[str]:
    """Check a store against the schemas; returns the problems found (empty = valid).

    Root attributes against ``store.schema.json``; each slide's attributes against
    ``store_slide.schema.json`` and, for complete slides, its arrays against the layout
    in that schema's ``x-wsicell-arrays``; label groups against ``store_labels.schema.json``.
    """
    root = open_store(path)
    problems = _check(dict(root.attrs), load_schema("store.schema.json"), str(path))
    slide_schema = load_schema("store_slide.schema.json")
    label_schema = load_schema("store_labels.schema.json")
    for slide_id in _slide_ids(root):
        group = _slides(root)[slide_id]
        where = f"{path}/slides/{slide_id}"
        attrs = dict(group.attrs)
        problems += _check(attrs, slide_schema, where)
        if attrs.get("status") != STATUS_COMPLETE:
            continue
        crop = attrs.get("config", {}).get("segmentation", {}).get("crop_size", 32)
        n_tiles = group["tiles/tile_id"].shape[0] if "tiles/tile_id" in group else -1
        thumb_h, thumb_w = group["tissue_mask"].shape if "tissue_mask" in group else (-1, -1)
        sizes = {"N": attrs.get("n_cells"), "T": n_tiles, "S": crop, "h": thumb_h, "w": thumb_w}
        problems += _check_arrays(group, slide_schema["x-wsicell-arrays"], sizes, where)
        counts = group["tiles/n_cells"][:] if "tiles/n_cells" in group else None
        if counts is not None and int(counts.sum()) != attrs.get("n_cells"):
            problems.append(f"{where}: tiles/n_cells does not add up to n_cells")
        if "labels" in group:
            for model_id, labels in group["labels"].groups():
                lwhere = f"{where}/labels/{model_id}"
                lattrs = dict(labels.attrs)
                problems += _check(lattrs, label_schema, lwhere)
                lsizes = {**sizes, "k": lattrs.get("k")}
                problems += _check_arrays(labels, label_schema["x-wsicell-arrays"], lsizes, lwhere)
    return problems
