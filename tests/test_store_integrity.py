"""Damage to a store is reported, never read as data: checksums, missing and undecodable
chunks name the slide, array and chunk; store creation is atomic across processes."""

import multiprocessing
import subprocess
import sys

import numpy as np
import pytest
import zarr
from conftest import write_test_slide

from wsicell.errors import WsicellError
from wsicell.io.store import (
    check_store,
    open_store,
    slide_cells,
    slide_crops,
    validate_store,
)


@pytest.fixture
def store(tmp_path):
    """Two complete slides of 6 cells (crops in chunks of 4, cell columns in chunks of 8)."""
    path = tmp_path / "cells.zarr"
    root = open_store(path, mode="a")
    write_test_slide(root, "a", tmp_path, 6)
    write_test_slide(root, "b", tmp_path, 6)
    return path


def _chunk(store, slide, array, coords):
    return store / "slides" / slide / array / "c" / "/".join(map(str, coords))


def _flip(path, n=64):
    data = bytearray(path.read_bytes())
    for i in range(min(n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_array_is_checksummed(store):
    group = zarr.open_group(store / "slides" / "a", mode="r")
    arrays = [group["crops"], group["thumbnail"], group["tissue_mask"], group["cells/x"],
              group["tiles/n_cells"]]
    for array in arrays:
        assert "crc32c" in [c.to_dict()["name"] for c in array.metadata.codecs], array.path


def test_flipped_bytes_fail_the_checksum(store):
    _flip(_chunk(store, "a", "crops", (1, 0, 0, 0)))
    root = open_store(store)
    with pytest.raises(WsicellError, match=r"slide 'a', array crops: chunk \(1, 0, 0, 0\) is "
                                           r"damaged \(checksum mismatch"):
        slide_crops(root, "a")[:]
    np.testing.assert_array_equal(slide_crops(root, "a")[:4, 0, 0, 0], [0, 1, 2, 3])  # chunk 0
    problems = validate_store(store, deep=True)
    assert problems == [f"{store}/slides/a/crops: chunk (1, 0, 0, 0): checksum mismatch"]
    assert validate_store(store) == []  # the layout alone is intact


def test_a_missing_chunk_is_an_error_not_fill_values(store):
    _chunk(store, "a", "crops", (0, 0, 0, 0)).unlink()
    with pytest.raises(WsicellError, match=r"array crops: chunk \(0, 0, 0, 0\) is missing"):
        slide_crops(open_store(store), "a").oindex[[0, 5]]
    assert check_store(store, deep=True)["a"] == [
        f"{store}/slides/a/crops: chunk (0, 0, 0, 0): missing"]


def test_damaged_cell_columns_and_truncated_chunks(store):
    _flip(_chunk(store, "b", "cells/x", (0,)), n=8)
    path = _chunk(store, "a", "cells/y", (0,))
    path.write_bytes(path.read_bytes()[:5])
    root = open_store(store)
    with pytest.raises(WsicellError, match=r"slide 'b', array cells/x: chunk \(0,\) is damaged"):
        slide_cells(root, "b")
    with pytest.raises(WsicellError, match=r"slide 'a', array cells/y: chunk \(0,\) is damaged"):
        slide_cells(root, "a")
    report = check_store(store, deep=True)
    assert len(report["a"]) == len(report["b"]) == 1 and report[""] == []


def test_validate_command_lists_damage_and_the_good_slides(store, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "wsicell.cli.main", "validate", *args],
                              capture_output=True, text=True, timeout=120)

    result = run(str(store), "--deep")
    assert result.returncode == 0 and "valid, 2 slide(s) (every chunk read)" in result.stdout
    _chunk(store, "b", "thumbnail", (0, 0, 0)).unlink()
    result = run(str(store), "--deep")
    assert result.returncode == 1, result.stderr
    assert "slides/b/thumbnail: chunk (0, 0, 0): missing" in result.stdout
    assert "damaged: b; still good: a" in result.stdout
    result = run(str(tmp_path / "nope.zarr"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no such cell store" in result.stderr and "Traceback" not in result.stderr


def _race(barrier, base, rounds, errors):
    from wsicell.io.store import complete_slides, open_store

    for i in range(rounds):
        barrier.wait()
        try:
            root = open_store(base / f"s{i}.zarr", mode="a")
            complete_slides(root)
        except Exception as err:  # noqa: BLE001 - any failure is what the test counts
            errors.put(f"{i}: {type(err).__name__}: {err}")


def test_creating_a_store_is_atomic_across_processes(tmp_path):
    """Two processes create the same 60 new stores at the same moments: no error, and every
    store is a valid, empty one (neither deletes what the other made)."""
    context = multiprocessing.get_context("fork")
    barrier, errors, rounds = context.Barrier(2), context.Queue(), 60
    workers = [context.Process(target=_race, args=(barrier, tmp_path, rounds, errors))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == [] and all(w.exitcode == 0 for w in workers)
    for i in range(rounds):
        assert validate_store(tmp_path / f"s{i}.zarr") == []
    assert not list(tmp_path.glob(".*creating"))


def test_a_store_under_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(WsicellError, match="parent directory .* does not exist"):
        open_store(tmp_path / "missing" / "cells.zarr", mode="a")
    assert not (tmp_path / "missing").exists()


def test_training_on_a_damaged_store_stops_with_one_line(train_store, tmp_path):
    import shutil

    store = tmp_path / "damaged.zarr"
    shutil.copytree(train_store, store)
    chunk = next((store / "slides").glob("*/crops/c/1/0/0/0"))
    _flip(chunk)
    result = subprocess.run([sys.executable, "-m", "wsicell.cli.main", "train", "--store",
                             str(store), "--out", str(tmp_path / "m"), "--width", "8",
                             "--batch-size", "16", "--max-iters", "20", "--workers", "0",
                             "--device", "cpu", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "array crops: chunk (1, 0, 0, 0) is damaged (checksum mismatch" in result.stderr
    assert not (tmp_path / "m" / "model.pt").exists()


def test_the_lock_names_its_holder(tmp_path):
    from wsicell.io.store import store_lock

    store = tmp_path / "s.zarr"
    open_store(store, mode="a")
    with store_lock(store, writer="prediction"):
        with pytest.raises(WsicellError, match=r"another prediction is writing to this store "
                                               r"\(pid \d+\)"):
            with store_lock(store):
                pass
