"""The cell store: one Zarr v3 hierarchy holding the cells of many slides.

This module is the one owner of the store's format: every group, array, attribute name and
status constant below is defined, written and read here; the rest of wsicell calls these
functions.  Layout (validated against ``schemas/store*.schema.json``)::

    STORE.zarr/                     attrs {"wsicell_store_version": 3}
      slides/<slide_id>/            attrs: status, source_path, fingerprint, width, height, mpp,
                                    stain, config, wsicell_version, n_cells, ...
        crops                       (N, S, S, 3) uint8, chunks of ingest.crops_per_chunk crops
        masks                       (N, S, S) bool, each crop's nucleus pixels (same chunks)
        cells/<column>              (N,) one array per column of CELL_COLUMNS; crop pixel
                                    (r, c) of cell i covers the level-0 square of side
                                    crop_px[i] at (crop_x0[i], crop_y0[i]) + crop_px[i] * (c, r)
        tiles/<column>              (T,) the tile manifest, one entry per tissue tile
        thumbnail                   (h, w, 3) uint8;  tissue_mask (h, w) bool
        labels/<model_id>/          attrs: status, model_id, k, n_cells, slide_fingerprint,
                                    config, model_config, wsicell_version (written by predict)
          cluster                   (N,) int16, argmax of Q;  proba (N, k) float32, Q's softmax
          region_proportions        (rows, cols, k) float32 grid of proportions (NaN = no cell)

A slide is usable only when its ``status`` is ``"complete"``, which ingest sets last; labels
likewise, once their last chunk is written: incomplete ones are never read.
Ingest's own working files live *beside* the store, never inside it: ``STORE.zarr.lock``
(an advisory lock held by the running writer, :func:`store_lock`) and
``STORE.zarr.staging/<slide_id>/`` (:mod:`wsicell.io.staging`).

A store is a local directory or an fsspec URL (``s3://bucket/cells.zarr``, ``gs://``,
``az://``; ``file://`` is a local path), opened through zarr's own store classes
(``LocalStore``, ``FsspecStore``) with the credentials of each backend's usual environment
and configuration.  On object storage the writer's lock is a lease object
``STORE.zarr.lease`` (:func:`store_lock`).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from functools import lru_cache, wraps
from importlib.resources import files
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from wsicell.errors import WsicellError

STORE_VERSION = 3  # 2: nucleus masks and crop placement (crop_x0, crop_y0, crop_px)
#: What each store version added, for the message that asks to ingest an older store again.
_VERSION_ADDS = {2: "nucleus masks", 3: "nucleus measurements (perimeter, calipers, OD, ...)"}
STATUS_INGESTING = "ingesting"
STATUS_WRITING = "writing"  # labels whose chunks are being written
STATUS_COMPLETE = "complete"
SLIDES, CELLS, CROPS, MASKS, TILES, LABELS = "slides", "cells", "crops", "masks", "tiles", "labels"
THUMBNAIL, TISSUE_MASK, REGION_GRID = "thumbnail", "tissue_mask", "region_proportions"

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
    "crop_x0": "float64",
    "crop_y0": "float64",
    "crop_px": "float32",
    "tile_id": "int32",
    # version 3: nucleus measurements (wsicell.segmentation.measurements; um, OD)
    **{name: "float32" for name in (
        "perimeter_um", "circularity", "solidity", "eccentricity", "major_axis_um",
        "minor_axis_um", "max_caliper_um", "min_caliper_um", "hematoxylin_od_mean",
        "hematoxylin_od_std", "hematoxylin_od_min", "hematoxylin_od_max", "eosin_od_mean",
        "eosin_od_std")},
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
# zstd level 1: crops compress 3.80x (level 3: 3.93x) at twice the encoding speed; every
# chunk of every array carries a CRC-32C of its compressed bytes, checked on each read.
_COMPRESSOR = (ZstdCodec(level=1), Crc32cCodec())
# Every chunk is written, even one equal to the fill value, so that a missing chunk is
# always damage (the store's arrays are written whole), never a run of fill values.
_EVERY_CHUNK = {"write_empty_chunks": True}
_SLIDE_ID = re.compile(r"[A-Za-z0-9._-]+")


# --------------------------------------------------------------------------- reading


def damaged_metadata(path: str | Path) -> list[tuple[str, str]]:
    """Every node of a store whose metadata (``zarr.json``) zarr cannot read.

    Each group and array below ``path`` is opened on its own, so one damaged node does
    not hide the others.

    Returns
    -------
    list of (str, str)
        ``(node, reason)`` pairs in path order: the node relative to the store (``""`` for
        the root, ``slides/s1/cells/bbox_x0``), the first line of zarr's error.
    """
    path = Path(path)
    damaged = []
    for meta in sorted(path.rglob("zarr.json")):
        node = meta.parent.relative_to(path).as_posix()
        try:
            kind = json.loads(meta.read_bytes()).get("node_type")
            opener = zarr.open_array if kind == "array" else zarr.open_group
            if kind not in ("array", "group"):
                raise ValueError(f"node_type {kind!r} is neither array nor group")
            opener(meta.parent, mode="r", zarr_format=3)
        except Exception as err:  # noqa: BLE001 - any failure is damage to report
            damaged.append(("" if node == "." else node, _reason(err)))
    return damaged


def _metadata_problem(path: str | Path, node: str, reason: str) -> str:
    """One line naming the store, the slide and the array (or group) of a damaged node."""
    parts = node.split("/") if node else []
    if len(parts) >= 2 and parts[0] == SLIDES:
        where = f"{path}: slide {parts[1]!r}" + (f", {'/'.join(parts[2:])}" if parts[2:] else "")
    else:
        where = f"{path}: {node or 'the store root'}"
    return (f"{where}: unreadable metadata in {node + '/' if node else ''}zarr.json ({reason}); "
            "the store is damaged")


def _reads_metadata(function):
    """Decorate a reading function whose first argument is an open store: a failure that
    damaged metadata (a truncated or edited ``zarr.json``) caused becomes one
    :class:`WsicellError` naming the store, slide and array; other errors pass unchanged."""
    @wraps(function)
    def read(root, *args, **kwargs):
        try:
            return function(root, *args, **kwargs)
        except WsicellError:
            raise
        except Exception:
            path = store_path(root)
            damaged = damaged_metadata(path)
            if not damaged:
                raise
            raise WsicellError(_metadata_problem(path, *damaged[0])) from None
    return read


def _is_store(group: zarr.Group) -> bool:
    return group.attrs.get("wsicell_store_version") == STORE_VERSION


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open a cell store.

    Parameters
    ----------
    path : str or Path
        The store directory (``*.zarr``), or an fsspec URL of one (``s3://bucket/cells.zarr``).
    mode : {"r", "r+", "a"}
        ``"r"`` / ``"r+"`` need an existing store; ``"a"`` creates an empty one when the
        path does not exist yet.

    Returns
    -------
    zarr.Group
        The store's root group, for the reading functions of this module
        (:func:`complete_slides`, :func:`slide_cells`, :func:`slide_crops`, ...).

    Raises
    ------
    WsicellError
        The path is a file, is missing (``"r"``, ``"r+"``), or is not a wsicell store.

    Examples
    --------
    >>> import tempfile, wsicell
    >>> from wsicell.io.store import complete_slides
    >>> root = wsicell.open_store(tempfile.mkdtemp() + "/cells.zarr", mode="a")
    >>> complete_slides(root)
    []
    """
    location = store_location(path)
    if isinstance(location, str):
        return _open_remote_store(location, mode)
    path = location if str(path).startswith("file://") else Path(path)  # as given, for messages
    if path.exists() and not path.is_dir():
        raise WsicellError(f"{path}: is a file, not a cell store directory")
    if not path.exists() and mode != "a":
        raise WsicellError(f"{path}: no such cell store")
    if mode == "a" and not (path / "zarr.json").is_file():
        _create_store(path)
    if not (path / "zarr.json").is_file():
        raise WsicellError(f"{path}: not a wsicell cell store (no zarr.json)")
    try:
        root = zarr.open_group(path, mode="r" if mode == "r" else "r+", zarr_format=3)
    except Exception as err:
        raise WsicellError(f"{path}: not a readable Zarr v3 store ({err})") from None
    if not _is_store(root):
        version = root.attrs.get("wsicell_store_version")
        if isinstance(version, int) and version < STORE_VERSION:
            raise WsicellError(
                f"{path}: a cell store of version {version}, from an older wsicell (this one "
                f"reads version {STORE_VERSION}, which adds {_VERSION_ADDS[STORE_VERSION]}); "
                "ingest the slides again into a new store")
        raise WsicellError(f"{path}: not a wsicell cell store (no wsicell_store_version)")
    return root


def _create_store(path: Path) -> None:
    """Create an empty store at ``path`` atomically, unless another process did first.

    The store is built in a temporary directory beside ``path`` and renamed onto it: the
    rename succeeds onto a missing or empty directory and fails when ``path`` already holds
    something, so two processes creating the same store never see (or delete) a half-made
    one; the one that loses the race opens the winner's.

    Raises
    ------
    WsicellError
        The parent directory does not exist, or ``path`` is a non-empty directory that is
        not a store.
    """
    if not path.parent.is_dir():
        raise WsicellError(f"{path}: parent directory {path.parent} does not exist")
    if path.is_dir() and any(path.iterdir()):
        return  # a store being created by another process, or not a store: open decides
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.creating"
    try:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        root.attrs["wsicell_store_version"] = STORE_VERSION
        root.create_group(SLIDES)
        try:
            os.rename(tmp, path)
        except OSError:  # ENOTEMPTY / EEXIST: another process created it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def store_path(root: zarr.Group) -> str:
    """The directory (or URL) of an open store, for messages."""
    store = root.store
    if isinstance(store, zarr.storage.FsspecStore):
        return store.fs.unstrip_protocol(store.path)
    return str(getattr(store, "root", store))


def store_location(store: str | Path) -> str | Path:
    """Where a store lives: a resolved local Path, or the URL of a remote one.

    ``file://`` URLs are local paths; any other ``protocol://`` is opened with fsspec.

    Examples
    --------
    >>> store_location("s3://bucket/cells.zarr/")
    's3://bucket/cells.zarr'
    >>> store_location("file:///tmp/cells.zarr")
    PosixPath('/tmp/cells.zarr')
    """
    text = str(store)
    if text.startswith("file://"):
        return Path(text[len("file://"):]).resolve()
    if "://" in text:
        return text.rstrip("/")
    return Path(store).resolve()


def is_remote(store: str | Path) -> bool:
    """Whether a store (path or URL) lives on object storage rather than a local disk."""
    return isinstance(store_location(store), str)


def _filesystem(url: str):
    """The fsspec filesystem of a URL and the path on it (credentials: the backend's own
    environment and configuration)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise WsicellError(f"{url}: cannot open this URL ({_first_line(err)}; object "
                           "storage needs its fsspec backend: pip install 'wsicell[s3]' for "
                           "s3://)") from None


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _open_remote_store(url: str, mode: str) -> zarr.Group:
    """:func:`open_store` of a URL, through zarr's ``FsspecStore``."""
    fs, path = _filesystem(url)
    try:
        found = fs.exists(f"{path}/zarr.json")
        if not found and mode == "a":
            _create_remote_store(fs, path)
            found = True
        if not found:
            raise WsicellError(f"{url}: no such cell store" if not fs.exists(path)
                               else f"{url}: not a wsicell cell store (no zarr.json)")
        store = zarr.storage.FsspecStore.from_url(url, read_only=mode == "r")
        root = zarr.open_group(store, mode="r" if mode == "r" else "r+", zarr_format=3)
    except WsicellError:
        raise
    except Exception as err:  # noqa: BLE001 - credentials, network, bucket: one line
        raise WsicellError(f"{url}: cannot open the cell store ({_first_line(err)})") from None
    if not _is_store(root):
        raise WsicellError(f"{url}: not a wsicell cell store (no wsicell_store_version)")
    return root


def _create_remote_store(fs, path: str) -> None:
    """Create an empty store on object storage, atomically: the ``slides`` group first,
    the root's ``zarr.json`` last, with a conditional write where the backend has one, so
    that a store is visible only whole and only one of two racing creators writes it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = zarr.open_group(Path(tmp), mode="w", zarr_format=3)
        root.attrs["wsicell_store_version"] = STORE_VERSION
        root.create_group(SLIDES)
        fs.pipe_file(f"{path}/{SLIDES}/zarr.json", (Path(tmp) / SLIDES / "zarr.json").read_bytes())
        _put_if_absent(fs, f"{path}/zarr.json", (Path(tmp) / "zarr.json").read_bytes())


def _slides(root: zarr.Group) -> zarr.Group:
    return root[SLIDES]


def _slide_ids(root: zarr.Group) -> list[str]:
    return sorted(_slides(root).group_keys())


@_reads_metadata
def slide_status(root: zarr.Group, slide_id: str) -> str | None:
    """``"complete"``, ``"ingesting"``, or None when the store has no such slide (or the
    name could be no slide's: ``..``, ``a/b``)."""
    slides = _slides(root)
    if not _SLIDE_ID.fullmatch(slide_id) or set(slide_id) == {"."} or slide_id not in slides:
        return None
    return slides[slide_id].attrs.get("status")


@_reads_metadata
def complete_slides(root: zarr.Group) -> list[str]:
    """Ids of the complete slides, sorted; warns about (and skips) incomplete ones."""
    complete = []
    for slide_id in _slide_ids(root):
        if slide_status(root, slide_id) == STATUS_COMPLETE:
            complete.append(slide_id)
        else:
            warnings.warn(f"{store_path(root)}: slide {slide_id!r} is incomplete and is skipped "
                          "(rerun ingest to finish it)", stacklevel=2)
    return complete


@_reads_metadata
def slide_group(root: zarr.Group, slide_id: str) -> zarr.Group:
    """The group of a complete slide."""
    status = slide_status(root, slide_id)
    if status is None:
        raise WsicellError(f"{store_path(root)}: no slide {slide_id!r} in the store")
    if status != STATUS_COMPLETE:
        raise WsicellError(f"{store_path(root)}: slide {slide_id!r} is incomplete "
                           f"(status {status!r})")
    group = _slides(root)[slide_id]
    problem = _attrs_problem("store_slide.schema.json",
                             json.dumps(dict(group.attrs), sort_keys=True, default=str))
    if problem:
        raise WsicellError(f"{store_path(root)}: slide {slide_id!r}: damaged attributes "
                           f"({problem}; wsicell validate STORE lists what is damaged)")
    return group


@lru_cache(maxsize=256)
def _attrs_problem(schema: str, attrs_json: str) -> str | None:
    """The first way attributes (as JSON text) break a schema of ``wsicell.schemas``, or
    None (cached: readers ask for a slide's group once per array)."""
    validator = jsonschema.Draft202012Validator(load_schema(schema))
    error = next(validator.iter_errors(json.loads(attrs_json)), None)
    if error is None:
        return None
    where = "/".join(map(str, error.absolute_path)) or "<attrs>"
    return f"{where}: {error.message[:200]}"


class StoredArray:
    """An array of the store read with its damage reported, never hidden.

    Reads like a zarr array (``a[start:stop]``, ``a.oindex[rows]``, ``shape``, ``chunks``,
    ``dtype``); a chunk that is missing, fails its CRC-32C checksum or does not decode
    raises one :class:`WsicellError` naming the store, slide, array and chunk, where zarr
    would return fill values or raise a codec error naming none of them.
    """

    def __init__(self, array: zarr.Array, where: str):
        self._array, self.where = array, where
        self.shape, self.chunks, self.dtype = array.shape, array.chunks, array.dtype
        self._listed: set[str] | None = None  # object storage: chunk keys, listed once

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, selection):
        return self._read(selection, lambda: self._array[selection])

    @property
    def oindex(self):
        """Orthogonal (integer-array) indexing, as zarr's ``oindex``."""
        return _OrthogonalIndex(self)

    def _read(self, selection, read):
        chunks = _chunks_of(self._array, selection)
        missing = [c for c in chunks if not self._exists(c)]
        if missing:
            raise WsicellError(f"{self.where}: chunk {missing[0]} is missing (the store is "
                               "damaged: wsicell validate --deep STORE lists what is)")
        try:
            return read()
        except Exception as err:  # noqa: BLE001 - any codec failure is damage to report
            bad = next((c for c in chunks if _chunk_problem(self._array, c)), chunks[:1])
            raise WsicellError(f"{self.where}: chunk {bad} is damaged ({_reason(err)}; "
                               "wsicell validate --deep STORE lists what is)") from None


    def _exists(self, coords: tuple[int, ...]) -> bool:
        """Whether a chunk is stored: a file test on a local disk; on object storage a
        look-up in the array's chunk keys, listed on the first read (a complete slide's
        arrays never change), asking the store itself only for a key not listed."""
        store = self._array.store_path.store
        if isinstance(store, zarr.storage.LocalStore) or 0 in self.shape:
            return _chunk_exists(self._array, coords)
        if self._listed is None:
            from zarr.core.sync import collect_aiterator

            prefix = f"{self._array.store_path.path}/"
            self._listed = {key[len(prefix):] for key in
                            collect_aiterator(store.list_prefix(prefix))}
        return (self._array.metadata.encode_chunk_key(coords) in self._listed
                or _chunk_exists(self._array, coords))


class _OrthogonalIndex:
    def __init__(self, array: StoredArray):
        self._stored = array

    def __getitem__(self, selection):
        stored = self._stored
        return stored._read(selection, lambda: stored._array.oindex[selection])


def _reason(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return "checksum mismatch" if "checksum" in text.lower() else text


def _chunks_of(array: zarr.Array, selection) -> list[tuple[int, ...]]:
    """Coordinates of the chunks a read of ``selection`` touches (axis 0 selected, every
    chunk of the other axes)."""
    first = selection[0] if isinstance(selection, tuple) and selection else selection
    n, chunk = array.shape[0], array.chunks[0]
    if isinstance(first, slice):
        rows = range(*first.indices(n))
        ids = range(rows.start // chunk, (rows.stop - 1) // chunk + 1) if len(rows) else []
    elif first is Ellipsis:
        ids = range(-(-n // chunk))
    else:
        ids = np.unique(np.asarray(first, dtype=np.int64).reshape(-1) // chunk).tolist()
    rest = [range(-(-size // c)) for size, c in zip(array.shape[1:], array.chunks[1:])]
    return [(int(i), *others) for i in ids for others in itertools.product(*rest)]


def _chunk_exists(array: zarr.Array, coords: tuple[int, ...]) -> bool:
    if 0 in array.shape:
        return True
    key = array.metadata.encode_chunk_key(coords)
    store = array.store_path.store
    if isinstance(store, zarr.storage.LocalStore):
        return (Path(store.root) / array.store_path.path / key).is_file()
    from zarr.core.sync import sync

    return sync(store.exists(f"{array.store_path.path}/{key}"))


def _chunk_problem(array: zarr.Array, coords: tuple[int, ...]) -> str | None:
    """Why one chunk cannot be read (missing, checksum, undecodable), or None."""
    if not _chunk_exists(array, coords):
        return "missing"
    try:
        array.blocks[coords]
    except Exception as err:  # noqa: BLE001
        return _reason(err)
    return None


@_reads_metadata
def _stored(root: zarr.Group, slide_id: str, name: str) -> StoredArray:
    return StoredArray(slide_group(root, slide_id)[name],
                       f"{store_path(root)}: slide {slide_id!r}, array {name}")


def slide_crops(root: zarr.Group, slide_id: str) -> StoredArray:
    """Cell images of a complete slide, (N, S, S, 3) uint8, in cell_id order."""
    return _stored(root, slide_id, CROPS)


def slide_masks(root: zarr.Group, slide_id: str) -> StoredArray:
    """Nucleus masks of a complete slide's crops, (N, S, S) bool, in cell_id order; the
    cell columns ``crop_x0``, ``crop_y0``, ``crop_px`` place them on the slide."""
    return _stored(root, slide_id, MASKS)


@_reads_metadata
def slide_cells(root: zarr.Group, slide_id: str, columns=None) -> pd.DataFrame:
    """Cell table of a complete slide, one row per cell in cell_id order (only the named
    ``columns`` of :data:`CELL_COLUMNS` when given: each column is an array of its own)."""
    return pd.DataFrame({name: _stored(root, slide_id, f"{CELLS}/{name}")[:]
                         for name in (columns or CELL_COLUMNS)})


def slide_attrs(root: zarr.Group, slide_id: str) -> dict:
    """The attributes of a slide in any status (``{}`` when the store has no such slide or a
    crash left its metadata unreadable)."""
    try:
        return dict(_slides(root)[slide_id].attrs)
    except Exception:  # noqa: BLE001 - a group a killed writer left half-written
        return {}


@_reads_metadata
def slide_pictures(root: zarr.Group, slide_id: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Thumbnail (h, w, 3) uint8 and tissue mask (h', w') bool of a complete slide (None
    for one the store lacks)."""
    group = slide_group(root, slide_id)
    return tuple(_stored(root, slide_id, name)[:] if name in group else None
                 for name in (THUMBNAIL, TISSUE_MASK))


@_reads_metadata
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
def store_lock(path: str | Path, writer: str = "ingest"):
    """Hold the store's writer lock for the duration: one writer per store at a time.

    On a local disk the lock is an advisory ``flock`` of ``STORE.zarr.lock``: the operating
    system releases it when the process ends, however it ends, so a killed writer never
    leaves a stale lock; the file names its holder (``writer``: ``ingest`` or
    ``prediction``) and process id, and is removed when the writer finishes.  On object
    storage it is a lease (:class:`StoreLease`).

    Raises
    ------
    WsicellError
        Another process holds the lock (an ingest or a prediction into the same store).
    """
    location = store_location(path)
    if isinstance(location, str):
        with StoreLease(location, writer):
            yield
        return
    lock_path = Path(f"{location}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, holder = os.pread(fd, 64, 0).decode(errors="replace").strip().partition(" ")
            os.close(fd)
            raise WsicellError(
                f"{path}: another {holder or 'wsicell process'} is writing to this store "
                f"(pid {pid or '?'}); wait for it to finish"
            ) from None
        try:  # the file a finishing writer removed is no lock: take the new one
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {writer}\n".encode(), 0)
        yield
        lock_path.unlink(missing_ok=True)  # while still held: a clean run leaves no file
    finally:
        os.close(fd)


def remove_empty_store(path: str | Path) -> bool:
    """Delete a store that holds no slide, and its lock file: what a run that created the
    store leaves when it refuses every input (the caller holds the lock).  Returns whether
    it was removed (a store holding any slide, even an incomplete one, is kept)."""
    path = Path(path)
    slides = path / SLIDES
    if slides.is_dir() and any(child.is_dir() for child in slides.iterdir()):
        return False
    shutil.rmtree(path, ignore_errors=True)
    Path(f"{path}.lock").unlink(missing_ok=True)
    return True


LEASE_SECONDS = 60.0  # a lease not renewed for this long is expired (its writer died)


class StoreLease:
    """The writer lock of a store on object storage: the object ``STORE.zarr.lease``.

    The lease holds its owner (a random id, host, process id, ``writer``) and an expiry
    ``LEASE_SECONDS`` ahead; a thread renews it every third of that while the writer works.
    It is taken with a conditional write (S3 ``If-None-Match: *``; an expired lease is
    replaced with ``If-Match`` on its ETag), so of two writers exactly one gets it; a
    killed writer's lease expires and the next writer takes it over (at once when it runs
    on the same host and the holder's process is gone).  Backends without
    conditional writes fall back to read-then-write, which leaves a window of a request's
    duration.  Expiry compares wall clocks: the hosts' clocks must agree to within seconds
    (NTP).

    Raises
    ------
    WsicellError
        On entry, when another writer holds an unexpired lease; on exit, when this one
        lost its lease (not renewed in time), so its writes may have raced another's.
    """

    def __init__(self, url: str, writer: str = "ingest", seconds: float = LEASE_SECONDS):
        self.store, self.url, self.writer, self.seconds = url, f"{url}.lease", writer, seconds
        self.fs, self.path = _filesystem(self.url)
        self.owner = uuid.uuid4().hex
        self.tag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "writer": self.writer,
                           "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.seconds}).encode()

    def __enter__(self) -> StoreLease:
        tag = _put_if_absent(self.fs, self.path, self._record())
        if tag is None:
            held, old_tag = _read_with_tag(self.fs, self.path)
            if held is not None and held.get("expires", 0) > time.time() and not _dead(held):
                until = time.strftime("%H:%M:%S", time.localtime(held["expires"]))
                raise WsicellError(
                    f"{self.store}: another {held.get('writer', 'wsicell process')} is writing "
                    f"to this store (host {held.get('host', '?')}, pid {held.get('pid', '?')}, "
                    f"lease until {until}); wait for it to finish")
            tag = (_put_if_absent(self.fs, self.path, self._record()) if held is None
                   else _replace_if(self.fs, self.path, self._record(), old_tag))
            if tag is None:
                raise WsicellError(f"{self.store}: another wsicell process took this store's "
                                   "expired lease first; wait for it to finish")
        self.tag = tag
        self._thread = threading.Thread(target=self._renew, name="wsicell-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                tag = _replace_if(self.fs, self.path, self._record(), self.tag)
            except Exception as err:  # noqa: BLE001 - a network hiccup: try again
                warnings.warn(f"{self.url}: lease not renewed ({_first_line(err)})", stacklevel=1)
                continue
            if tag is None:
                self.lost = "another writer replaced it"
                return
            self.tag = tag

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held, _ = _read_with_tag(self.fs, self.path)
        if held is not None and held.get("owner") == self.owner:
            self.fs.rm_file(self.path)
        if self.lost and exc[0] is None:
            raise WsicellError(f"{self.url}: this writer lost the store's lease "
                               f"({self.lost}); check the store with wsicell validate --deep")


def _dead(held: dict) -> bool:
    """Whether a lease's holder is a process of this host that no longer runs (a killed
    writer rerun from the same machine need not wait for its lease to expire)."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _s3_call(fs, path: str, **conditions) -> str | None:
    """S3 ``PutObject`` with a condition; the new ETag, or None when the condition fails."""
    bucket, key, _ = fs.split_path(path)
    body = conditions.pop("Body")
    try:
        response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **conditions)
    except OSError as err:  # s3fs turns a failed condition (412, 409) into an OSError
        code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return None
        raise
    fs.invalidate_cache(path)
    return response.get("ETag", "")


def _is_s3(fs) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _put_if_absent(fs, path: str, data: bytes) -> str | None:
    """Create ``path`` only if it does not exist; its ETag (or ``""``), None if it did."""
    if _is_s3(fs):
        return _s3_call(fs, path, Body=data, IfNoneMatch="*")
    if fs.exists(path):
        return None
    fs.pipe_file(path, data)
    return ""


def _replace_if(fs, path: str, data: bytes, tag: str | None) -> str | None:
    """Overwrite ``path`` only if it still has the ETag ``tag``; the new ETag, or None."""
    if _is_s3(fs) and tag:
        return _s3_call(fs, path, Body=data, IfMatch=tag)
    fs.pipe_file(path, data)
    return ""


def _read_with_tag(fs, path: str) -> tuple[dict | None, str | None]:
    """The JSON record at ``path`` and its ETag (None, None when there is none)."""
    try:
        info = fs.info(path, refresh=True) if _is_s3(fs) else fs.info(path)
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    try:
        return json.loads(data), info.get("ETag")
    except ValueError:
        return {}, info.get("ETag")


def begin_slide(
    root: zarr.Group, slide_id: str, attrs: dict, thumbnail: np.ndarray,
    tissue_mask: np.ndarray, tiles: dict[str, np.ndarray],
) -> zarr.Group:
    """(Re)create a slide group with status ``"ingesting"``: attributes, pictures, tiles."""
    group = _slides(root).create_group(slide_id, overwrite=True)
    group.attrs.update({**attrs, "status": STATUS_INGESTING})
    group.create_array(THUMBNAIL, data=thumbnail, chunks=thumbnail.shape,
                       compressors=_COMPRESSOR, config=_EVERY_CHUNK)
    group.create_array(TISSUE_MASK, data=tissue_mask, chunks=tissue_mask.shape,
                       compressors=_COMPRESSOR, config=_EVERY_CHUNK)
    tile_group = group.create_group(TILES)
    for name, dtype in TILE_COLUMNS.items():
        values = np.asarray(tiles[name], dtype=dtype)
        tile_group.create_array(name, data=values, chunks=(max(1, len(values)),),
                                compressors=_COMPRESSOR, config=_EVERY_CHUNK)
    return group


def slide_begun(root: zarr.Group, slide_id: str) -> bool:
    """Whether :func:`begin_slide` finished writing this slide's group (its last array
    exists), so that an interrupted ingest of it can continue."""
    try:
        return f"{TILES}/cell_offset" in _slides(root)[slide_id]
    except Exception:  # noqa: BLE001 - a group whose metadata a crash left unreadable
        return False


def ingesting_slide(root: zarr.Group, slide_id: str) -> zarr.Group:
    """The group of a slide being ingested (any status), for :func:`create_cell_arrays`,
    :func:`finish_slide` and its attributes."""
    return _slides(root)[slide_id]


def discard_slide(root: zarr.Group, slide_id: str) -> None:
    """Remove a slide group this run began but could not ingest (a refused slide leaves
    nothing behind, not an incomplete slide that every reader warns about)."""
    slides = _slides(root)
    if slide_id in slides:
        del slides[slide_id]


def create_cell_arrays(
    group: zarr.Group, n_cells: int, crop_size: int, crops_per_chunk: int, cells_per_chunk: int
) -> None:
    """Create empty ``crops``, ``masks`` and ``cells/*`` arrays of ``n_cells`` rows
    (overwriting)."""
    group.create_array(
        CROPS, shape=(n_cells, crop_size, crop_size, 3), dtype="uint8",
        chunks=(crops_per_chunk, crop_size, crop_size, 3), compressors=_COMPRESSOR,
        fill_value=255, overwrite=True, dimension_names=("cell", "y", "x", "channel"),
    )
    group.create_array(
        MASKS, shape=(n_cells, crop_size, crop_size), dtype="bool",
        chunks=(crops_per_chunk, crop_size, crop_size), compressors=_COMPRESSOR,
        fill_value=False, overwrite=True, dimension_names=("cell", "y", "x"),
    )
    cells = group.create_group(CELLS, overwrite=True)
    for name, dtype in CELL_COLUMNS.items():
        cells.create_array(name, shape=(n_cells,), dtype=dtype, chunks=(cells_per_chunk,),
                           compressors=_COMPRESSOR, fill_value=0, dimension_names=("cell",))


def _every_chunk(array: zarr.Array) -> zarr.Array:
    """``array`` writing every chunk, skipping zarr's costly check for chunks that equal the
    fill value (measured: it doubled the time of writing crops)."""
    return array.with_config(_EVERY_CHUNK)


def write_cell_rows(store: str | Path, slide_id: str, start: int,
                    columns: dict[str, np.ndarray]) -> None:
    """Write rows ``start:start + n`` of the named cell columns of a slide being ingested
    (a block of whole chunks: called from worker processes, each on its own chunks)."""
    cells = zarr.open_group(_below(store, SLIDES, slide_id, CELLS), mode="r+")
    for name, values in columns.items():
        _every_chunk(cells[name])[start:start + len(values)] = values


def write_crop_rows(store: str | Path, slide_id: str, start: int, crops: np.ndarray,
                    masks: np.ndarray) -> None:
    """Write crops and masks ``start:start + n`` of a slide being ingested (whole chunks)."""
    for name, rows in ((CROPS, crops), (MASKS, masks)):
        array = zarr.open_array(_below(store, SLIDES, slide_id, name), mode="r+")
        _every_chunk(array)[start:start + len(rows)] = rows


def _below(store: str | Path, *parts: str):
    """A node of a store by its path (a local Path, or a URL zarr opens with fsspec)."""
    location = store_location(store) if "://" in str(store) else Path(store)
    if isinstance(location, str):
        return "/".join((location, *parts))
    return location.joinpath(*parts)


def finish_slide(group: zarr.Group, tile_counts: np.ndarray, attrs: dict) -> None:
    """Record per-tile counts and the final attributes, then mark the slide complete."""
    counts = np.asarray(tile_counts, dtype=np.int64)
    _every_chunk(group[f"{TILES}/n_cells"])[:] = counts.astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    _every_chunk(group[f"{TILES}/cell_offset"])[:] = offsets
    group.attrs.update({**attrs, "n_cells": int(counts.sum())})
    group.attrs["status"] = STATUS_COMPLETE


# --------------------------------------------------------------------------- labels


def _labels_path(slide_id: str, model_id: str) -> str:
    return f"{SLIDES}/{slide_id}/{LABELS}/{model_id}"


def _labels_group(root: zarr.Group, slide_id: str, model_id: str) -> zarr.Group | None:
    try:
        return root[_labels_path(slide_id, model_id)]
    except KeyError:
        return None


@_reads_metadata
def labels_complete(root: zarr.Group, slide_id: str, model_id: str) -> bool:
    """True when the slide holds complete labels of this model for its current content."""
    slide = slide_group(root, slide_id)
    labels = _labels_group(root, slide_id, model_id)
    if labels is None:
        return False
    attrs = labels.attrs
    return (attrs.get("status") == STATUS_COMPLETE
            and attrs.get("slide_fingerprint") == slide.attrs.get("fingerprint")
            and attrs.get("n_cells") == slide[CROPS].shape[0])


@_reads_metadata
def labelled_models(root: zarr.Group, slide_id: str) -> list[str]:
    """Ids of the models whose labels of this slide are complete (sorted)."""
    try:
        group = root[f"{SLIDES}/{slide_id}/{LABELS}"]
    except KeyError:
        return []
    return sorted(name for name, _ in group.groups() if labels_complete(root, slide_id, name))


@_reads_metadata
def labels_k(root: zarr.Group, slide_id: str, model_id: str) -> int | None:
    """The k of the labels a model wrote into a slide, complete or not (None when none)."""
    labels = _labels_group(root, slide_id, model_id)
    return None if labels is None else labels.attrs.get("k")


@_reads_metadata
def read_labels(root: zarr.Group, slide_id: str, model_id: str) -> tuple[np.ndarray, np.ndarray]:
    """A model's complete labels of one slide.

    Returns
    -------
    cluster : ndarray, shape (N,), int16
    proba : ndarray, shape (N, k), float32

    Raises
    ------
    WsicellError
        When the slide has no complete labels of this model (missing, or a run that was
        interrupted before its last chunk).
    """
    if not labels_complete(root, slide_id, model_id):
        why = ("an interrupted run left them unfinished"
               if _labels_group(root, slide_id, model_id) is not None else "none written")
        raise WsicellError(f"{store_path(root)}: slide {slide_id} has no complete labels of model "
                           f"{model_id} ({why}; run wsicell predict with that model)")
    where = f"{store_path(root)}: slide {slide_id!r}, labels {model_id}"
    labels = root[_labels_path(slide_id, model_id)]
    return (StoredArray(labels["cluster"], f"{where}/cluster")[:],
            StoredArray(labels["proba"], f"{where}/proba")[:])


def begin_labels(root: zarr.Group, slide_id: str, model_id: str, k: int, attrs: dict) -> None:
    """(Re)create an empty labels group of status ``"writing"``, chunked like the crops.

    ``attrs`` (configuration, model configuration, version) are recorded beside
    ``model_id``, ``k``, ``n_cells`` and the slide's fingerprint.
    """
    slide = slide_group(root, slide_id)
    crops = slide[CROPS]
    discard_labels(root, slide_id, model_id)
    group = slide.require_group(LABELS).create_group(model_id)
    group.attrs.update({**attrs, "status": STATUS_WRITING, "model_id": model_id, "k": k,
                        "n_cells": crops.shape[0],
                        "slide_fingerprint": slide.attrs.get("fingerprint")})
    n, chunk = crops.shape[0], crops.chunks[0]
    group.create_array("cluster", shape=(n,), chunks=(chunk,), dtype="int16", fill_value=-1,
                       compressors=_COMPRESSOR, dimension_names=("cell",))
    group.create_array("proba", shape=(n, k), chunks=(chunk, k), dtype="float32",
                       fill_value=np.nan, compressors=_COMPRESSOR,
                       dimension_names=("cell", "cluster"))


def discard_labels(root: zarr.Group, slide_id: str, model_id: str) -> None:
    """Remove a model's labels of a slide (and its region grid), complete or not."""
    labels = root[f"{SLIDES}/{slide_id}"].get(LABELS)
    if labels is not None and model_id in labels:
        del labels[model_id]


def write_label_rows(root: zarr.Group, slide_id: str, model_id: str, start: int,
                     proba: np.ndarray) -> None:
    """Write Q's probabilities (n, k) float32 of cells ``start:start + n`` and their argmax
    (one crop chunk: each writer its own chunks)."""
    labels = root[_labels_path(slide_id, model_id)]
    _every_chunk(labels["proba"])[start:start + len(proba)] = proba
    _every_chunk(labels["cluster"])[start:start + len(proba)] = \
        proba.argmax(axis=1).astype(np.int16)


def finish_labels(root: zarr.Group, slide_id: str, model_id: str) -> None:
    """Mark a model's labels of a slide complete (after every chunk is written)."""
    root[_labels_path(slide_id, model_id)].attrs["status"] = STATUS_COMPLETE


def write_region_grid(root: zarr.Group, slide_id: str, model_id: str, proportions: np.ndarray,
                      attrs: dict) -> None:
    """Store a grid of cell-type proportions beside the model's complete labels.

    Parameters
    ----------
    proportions : ndarray, shape (rows, cols, k), float32
        NaN where a region holds no cell.
    attrs : dict
        ``region_size_um`` (microns), ``region_px`` (level-0 px) and provenance.  The grid
        is rewritten only when its region size or shape changed, and marked complete last.
    """
    read_labels(root, slide_id, model_id)  # complete labels only
    group = root[_labels_path(slide_id, model_id)]
    if REGION_GRID in group:
        old = group[REGION_GRID]
        if old.attrs.get("status") == STATUS_COMPLETE and old.shape == proportions.shape \
                and old.attrs.get("region_size_um") == attrs.get("region_size_um"):
            return
        del group[REGION_GRID]
    array = group.create_array(REGION_GRID, shape=proportions.shape, dtype="float32",
                               chunks=proportions.shape, fill_value=np.nan,
                               compressors=_COMPRESSOR,
                               dimension_names=("row", "col", "cluster"))
    _every_chunk(array)[:] = proportions.astype(np.float32)
    array.attrs.update({**attrs, "dims": ["row", "col", "cluster"], "status": STATUS_COMPLETE})


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


def _damaged_chunks(group: zarr.Group, where: str) -> list[str]:
    """Every chunk of every array below ``group`` that is missing, fails its checksum or
    does not decode (groups still being written, like interrupted labels, are skipped)."""
    problems = []
    for name, array in sorted(group.arrays()):
        grid = [range(-(-size // chunk)) for size, chunk in zip(array.shape, array.chunks)]
        for coords in itertools.product(*grid):
            why = _chunk_problem(array, coords)
            if why:
                problems.append(f"{where}/{name}: chunk {coords}: {why}")
    for name, sub in sorted(group.groups()):
        if sub.attrs.get("status", STATUS_COMPLETE) == STATUS_COMPLETE:
            problems += _damaged_chunks(sub, f"{where}/{name}")
    return problems


def _listed_slides(root: zarr.Group, path: str | Path) -> list[str]:
    """The slide ids of a store, from its directories when zarr cannot list them (a slide
    group whose metadata is damaged)."""
    try:
        return _slide_ids(root)
    except Exception:  # noqa: BLE001 - damaged_metadata names the damage
        return sorted(p.name for p in (Path(path) / SLIDES).iterdir() if p.is_dir())


def _crop_size(attrs: dict) -> object:
    """The crop side a slide's recorded configuration names (32 when it names none; the
    schema check reports attributes of the wrong shape)."""
    config = attrs.get("config")
    segmentation = config.get("segmentation") if isinstance(config, dict) else None
    return segmentation.get("crop_size", 32) if isinstance(segmentation, dict) else 32


def check_store(path: str | Path, deep: bool = False) -> dict[str, list[str]]:
    """The problems of a store, per slide: ``{"": root problems, slide_id: problems}``.

    Root attributes against ``store.schema.json``; each slide's attributes against
    ``store_slide.schema.json`` and, for complete slides, its arrays against the layout
    in that schema's ``x-wsicell-arrays``; label groups against ``store_labels.schema.json``.
    With ``deep``, every chunk of every complete array is read as well: missing chunks,
    checksum failures and undecodable chunks are reported with their coordinates.
    """
    root = open_store(path)
    report = {"": _check(dict(root.attrs), load_schema("store.schema.json"), str(path))}
    damaged: dict[str, list[str]] = {}  # unreadable zarr.json, per slide ("" = the root's)
    for node, reason in damaged_metadata(path):
        parts = node.split("/")
        slide_id = parts[1] if len(parts) >= 2 and parts[0] == SLIDES else ""
        damaged.setdefault(slide_id, []).append(_metadata_problem(path, node, reason))
    if damaged.get(""):
        report[""] += damaged[""]
        return report
    slide_schema = load_schema("store_slide.schema.json")
    label_schema = load_schema("store_labels.schema.json")
    for slide_id in _listed_slides(root, path):
        if slide_id in damaged:  # nothing below a damaged node can be checked further
            report[slide_id] = damaged[slide_id]
            continue
        group = _slides(root)[slide_id]
        where = f"{path}/slides/{slide_id}"
        attrs = dict(group.attrs)
        problems = report[slide_id] = _check(attrs, slide_schema, where)
        if attrs.get("status") != STATUS_COMPLETE:
            continue
        crop = _crop_size(attrs)
        n_tiles = group["tiles/tile_id"].shape[0] if "tiles/tile_id" in group else -1
        thumb_h, thumb_w = group["tissue_mask"].shape if "tissue_mask" in group else (-1, -1)
        sizes = {"N": attrs.get("n_cells"), "T": n_tiles, "S": crop, "h": thumb_h, "w": thumb_w}
        problems += _check_arrays(group, slide_schema["x-wsicell-arrays"], sizes, where)
        if "tiles/n_cells" in group:
            try:
                counts = StoredArray(group["tiles/n_cells"], f"{where}/tiles/n_cells")[:]
            except WsicellError as err:
                problems.append(str(err))
            else:
                if int(counts.sum()) != attrs.get("n_cells"):
                    problems.append(f"{where}: tiles/n_cells does not add up to n_cells")
        if "labels" in group:
            for model_id, labels in group["labels"].groups():
                lwhere = f"{where}/labels/{model_id}"
                lattrs = dict(labels.attrs)
                problems += _check(lattrs, label_schema, lwhere)
                lsizes = {**sizes, "k": lattrs.get("k")}
                problems += _check_arrays(labels, label_schema["x-wsicell-arrays"], lsizes, lwhere)
        if deep:
            problems += _damaged_chunks(group, where)
    return report


def validate_store(path: str | Path, deep: bool = False) -> list[str]:
    """Check a store (see :func:`check_store`); returns the problems found (empty = valid)."""
    return [problem for problems in check_store(path, deep).values() for problem in problems]
