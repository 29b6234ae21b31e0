"""Ingest's working files beside a cell store: ``STORE.zarr.staging/<slide_id>/``.

While a slide is ingested, every finished tile is written there as one atomically written
``tile_<id>.npz`` (its cells' columns and crops), so that a killed run loses at most the
tiles in flight and a rerun skips what is staged; the directory is removed once the slide
is complete in the store.  Small helpers let worker processes share other files there
(claim a piece of work, publish an array, wait for another process's array).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from wsicell.files import write_atomically


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
