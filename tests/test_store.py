"""The cell store: opening, locking, staging, the writers, schemas and the read API."""

import numpy as np
import pytest
import zarr
from conftest import write_test_slide

from wsicell.errors import WsicellError
from wsicell.io.staging import (
    read_staged_tile,
    staged_tiles,
    staging_dir,
    write_staged_tile,
)
from wsicell.io.store import (
    CELL_COLUMNS,
    STORE_VERSION,
    complete_slides,
    open_store,
    slide_cells,
    slide_crops,
    store_fingerprint,
    store_lock,
    validate_store,
)


def test_a_new_store_is_valid_and_empty(tmp_path):
    root = open_store(tmp_path / "s.zarr", mode="a")
    assert root.attrs["wsicell_store_version"] == STORE_VERSION == 3
    assert complete_slides(root) == [] and validate_store(tmp_path / "s.zarr") == []


def test_a_store_of_an_older_version_asks_for_a_new_ingest(tmp_path):
    zarr.open_group(tmp_path / "old.zarr", mode="w").attrs["wsicell_store_version"] = 1
    with pytest.raises(WsicellError, match="old.zarr: a cell store of version 1.*ingest the "
                       "slides again"):
        open_store(tmp_path / "old.zarr")


def test_opening_bad_paths_fails_with_one_line(tmp_path):
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(WsicellError, match="file.zarr: is a file"):
        open_store(tmp_path / "file.zarr", mode="a")
    with pytest.raises(WsicellError, match="no such cell store"):
        open_store(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(WsicellError, match="not a wsicell cell store"):
        open_store(tmp_path / "other.zarr")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("x")
    with pytest.raises(WsicellError, match="not a wsicell cell store"):
        open_store(tmp_path / "full", mode="a")


def test_read_api_returns_complete_slides_and_skips_incomplete(tmp_path):
    root = open_store(tmp_path / "s.zarr", mode="a")
    write_test_slide(root, "b", tmp_path, 10)
    write_test_slide(root, "a", tmp_path, 6, complete=False)
    root = open_store(tmp_path / "s.zarr")
    with pytest.warns(UserWarning, match="'a' is incomplete"):
        assert complete_slides(root) == ["b"]
    cells = slide_cells(root, "b")
    assert list(cells.columns) == list(CELL_COLUMNS) and len(cells) == 10
    assert [str(cells[c].dtype) for c in cells] == list(CELL_COLUMNS.values())
    crops = slide_crops(root, "b")
    assert crops.shape == (10, 32, 32, 3) and crops.dtype == np.uint8 and crops[7, 0, 0, 0] == 7
    assert root["slides/b"].attrs["n_cells"] == 10
    np.testing.assert_array_equal(root["slides/b/tiles/cell_offset"][:], [0, 8])
    with pytest.raises(WsicellError, match="'a' is incomplete"):
        slide_cells(root, "a")
    with pytest.raises(WsicellError, match="no slide 'zz'"):
        slide_crops(root, "zz")
    assert validate_store(tmp_path / "s.zarr") == []


def test_store_fingerprint_follows_content(tmp_path):
    root = open_store(tmp_path / "s.zarr", mode="a")
    write_test_slide(root, "a", tmp_path, 6)
    write_test_slide(root, "b", tmp_path, 6)
    first = store_fingerprint(root, ["a", "b"])
    assert first == store_fingerprint(root, ["b", "a"]) != store_fingerprint(root, ["a"])
    write_test_slide(root, "b", tmp_path, 7)
    assert store_fingerprint(root, ["a", "b"]) != first


def test_validation_reports_bad_attributes_and_arrays(tmp_path):
    root = open_store(tmp_path / "s.zarr", mode="a")
    group = write_test_slide(root, "a", tmp_path, 6)
    group.attrs["mpp"] = -1
    group["cells"].create_array("x", shape=(5,), dtype="float32", overwrite=True)
    problems = validate_store(tmp_path / "s.zarr")
    assert any("mpp" in p for p in problems)
    assert any("cells/x: float32(5,), expected float64(6,)" in p for p in problems)


def test_lock_refuses_a_second_writer(tmp_path):
    store = tmp_path / "s.zarr"
    with store_lock(store):
        with pytest.raises(WsicellError, match="another ingest is writing"):
            with store_lock(store):
                pass
    with store_lock(store):  # released
        pass


def test_staged_tiles_are_written_whole(tmp_path):
    directory = staging_dir(tmp_path / "s.zarr", "slide")
    assert directory == tmp_path / "s.zarr.staging" / "slide"
    directory.mkdir(parents=True)
    write_staged_tile(directory, 12, {"x": np.arange(3.0)})
    (directory / "tile_000000013.npz.99.tmp").write_bytes(b"partial")  # a killed writer
    assert staged_tiles(directory) == {12}
    np.testing.assert_array_equal(read_staged_tile(directory, 12)["x"], [0, 1, 2])


def test_staged_tiles_give_back_every_array_with_its_dtype(tmp_path):
    """The columns travel packed in one table; the crops and the one-value count apart."""
    tile = {"x": np.arange(3.0), "area": np.arange(3, dtype=np.float32),
            "bbox_x0": np.arange(3, dtype=np.int32), "crops": np.ones((3, 4, 4, 3), np.uint8),
            "masks": np.ones((3, 4, 4), bool), "refused": np.array([7])}
    write_staged_tile(tmp_path, 1, tile)
    staged = read_staged_tile(tmp_path, 1)
    assert list(staged) == list(tile)
    for name, values in tile.items():
        assert staged[name].dtype == values.dtype
        np.testing.assert_array_equal(staged[name], values)
    assert list(read_staged_tile(tmp_path, 1, ["refused", "x"])) == ["refused", "x"]
    # a tile staged by an earlier version, every array a member of the .npz
    np.savez(tmp_path / "tile_000000002.npz", x=np.arange(2.0), refused=np.array([1]))
    np.testing.assert_array_equal(read_staged_tile(tmp_path, 2, ["x"])["x"], [0, 1])


def test_arrays_are_plain_zarr_readable_by_dask(tmp_path):
    import dask.array as da

    root = open_store(tmp_path / "s.zarr", mode="a")
    write_test_slide(root, "a", tmp_path, 10)
    crops = da.from_zarr(str(tmp_path / "s.zarr"), component="slides/a/crops")
    assert crops.chunksize == (4, 32, 32, 3)
    np.testing.assert_array_equal(crops[:, 0, 0, 0].compute(), np.arange(10))
    plain = zarr.open_array(tmp_path / "s.zarr" / "slides" / "a" / "cells" / "x", mode="r")
    np.testing.assert_array_equal(plain[:], 10.0 * np.arange(10))
