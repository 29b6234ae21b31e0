"""Ingest's working files beside a cell store: ``STORE.zarr.staging/<slide_id>/``.

While a slide is ingested, every finished tile is written there as one atomically written
``tile_<id>.npz`` (its cells' columns, packed as the fields of one table, and its crops),
so that a killed run loses at most the tiles in flight and a rerun skips what is staged;
the directory is removed once the slide is complete in the store.  Small helpers let worker processes share other files there
(claim a piece of work, publish an array, wait for another process's array).

For a store on object storage (an fsspec URL) the staging directory is the URL
``STORE.zarr.staging/<slide_id>`` beside it, so that workers without a shared disk stage
and consolidate through the object store; a staged tile is one PUT, which object stores
make visible whole.  Its :func:`local_dir` (the files a host's workers share) is a
directory under the system's temporary directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from wsicell.files import write_atomically


def staging_dir(store_path: str | Path, slide_id: str) -> Path | str:
    """Where the finished tiles of a slide wait for consolidation (a URL for a store on
    object storage)."""
    if _is_url(store_path):
        return f"{str(store_path).rstrip('/')}.staging/{slide_id}"
    return Path(f"{Path(store_path)}.staging") / slide_id


def _is_url(location) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def local_dir(directory: Path | str) -> Path:
    """A local directory for files the worker processes of one host share while staging
    ``directory``: itself on a local disk, else a folder of the temporary directory named
    after the staging URL."""
    if not _is_url(directory):
        return Path(directory)
    digest = hashlib.sha256(directory.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "wsicell-staging" / digest


def make_staging(directory: Path | str) -> None:
    """Create a staging directory (object stores need none)."""
    if not _is_url(directory):
        Path(directory).mkdir(parents=True, exist_ok=True)


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


#: The member of a staged tile that holds its one-dimensional arrays of one length, as the
#: fields of one structured array: read in one piece, not ~30 (each member of an ``.npz``
#: costs ~0.15 ms to open and parse, more than the bytes of a tile's columns).
_TABLE = "__table__"


def write_staged_tile(directory: Path, tile_id: int, columns: dict[str, np.ndarray]) -> None:
    """Write one tile's arrays atomically (the one-dimensional ones as long as the first of
    them packed into one table)."""
    arrays = _packed(columns)
    if _is_url(directory):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        fs, path = _fs(directory)
        fs.pipe_file(f"{path}/{_staged_name(tile_id)}", buffer.getvalue())
        return
    write_atomically(directory / _staged_name(tile_id), lambda f: np.savez(f, **arrays))


def _packed(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``columns`` with its one-dimensional arrays as long as the first of them replaced by
    one structured array, :data:`_TABLE`."""
    n = next((len(v) for v in columns.values() if v.ndim == 1), 0)
    packed = {k: v for k, v in columns.items() if v.ndim == 1 and len(v) == n}
    table = np.empty(n, dtype=[(k, v.dtype) for k, v in packed.items()])
    for name, values in packed.items():
        table[name] = values
    return {_TABLE: table, **{k: v for k, v in columns.items() if k not in packed}}


def read_staged_tile(directory: Path, tile_id: int, names=None) -> dict[str, np.ndarray]:
    """The arrays of one staged tile (only ``names`` when given)."""
    if _is_url(directory):
        fs, path = _fs(directory)
        source = io.BytesIO(fs.cat_file(f"{path}/{_staged_name(tile_id)}"))
    else:
        source = directory / _staged_name(tile_id)
    with np.load(source) as data:
        # a tile an earlier version staged (every array a member of its own) has no table
        table = data[_TABLE] if _TABLE in data.files else np.empty(0, dtype=[])
        fields = table.dtype.names or ()
        names = names or [*fields, *(n for n in data.files if n != _TABLE)]
        return {name: table[name] if name in fields else data[name] for name in names}


def staged_tiles(directory: Path) -> set[int]:
    """Ids of the tiles already staged (partial temporary files are not counted)."""
    if _is_url(directory):
        fs, path = _fs(directory)
        fs.invalidate_cache(path)
        names = [n.rsplit("/", 1)[-1] for n in fs.glob(f"{path}/tile_*.npz")]
        return {int(name[5:14]) for name in names}
    if not directory.is_dir():
        return set()
    return {int(p.name[5:14]) for p in directory.glob("tile_*.npz")}


def remove_staging(store_path: str | Path, slide_id: str) -> None:
    """Delete a slide's staging directory (and the staging root once it is empty)."""
    directory = staging_dir(store_path, slide_id)
    if _is_url(directory):
        fs, path = _fs(directory)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        shutil.rmtree(local_dir(directory), ignore_errors=True)
        return
    shutil.rmtree(directory, ignore_errors=True)
    try:
        directory.parent.rmdir()
    except OSError:
        pass
