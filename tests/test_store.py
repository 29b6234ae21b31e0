"""The cell store: opening, locking, staging, the writers, schemas and the read API."""

import numpy as np
import pytest
import zarr

from wsicell import __version__
from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.store import (
    CELL_COLUMNS, TILE_COLUMNS, begin_slide, complete_slides, create_cell_arrays,
    file_fingerprint, finish_slide, open_store, slide_cells, slide_crops, staged_tiles,
    staging_dir, store_fingerprint, store_lock, validate_store, write_staged_tile,
    read_staged_tile,
)

STAIN = {"source_lab_mean": [8.0, 0.1, 0.0], "source_lab_std": [0.5, 0.1, 0.03],
         "target_lab_mean": [8.98, 0.08, 0.02], "target_lab_std": [0.64, 0.11, 0.03],
         "stain_matrix": [[0.65, 0.07, 0.7], [0.7, 0.99, -0.7], [0.29, 0.1, 0.1]]}


def _attrs(tmp_path):
    source = tmp_path / "slide.svs"
    source.write_bytes(b"pixels" * 100)
    return {"source_path": str(source), "fingerprint": file_fingerprint(source), "width": 100,
            "height": 80, "mpp": 0.5, "mpp_source": "metadata", "backend": "openslide",
            "reference_mpp": 0.4, "thumbnail_mpp": 16.0, "tile_size": 64, "halo": 8,
            "grid_cols": 2, "grid_rows": 2, "config": WsicellConfig().to_json(),
            "wsicell_version": __version__}


def _write_slide(root, slide_id, attrs, n_cells, complete=True):
    tiles = {name: np.arange(2) for name in TILE_COLUMNS}
    group = begin_slide(root, slide_id, attrs, np.full((5, 6, 3), 255, np.uint8),
                        np.zeros((5, 6), bool), tiles)
    create_cell_arrays(group, n_cells, 32, crops_per_chunk=4, cells_per_chunk=8)
    group["cells/cell_id"][:] = np.arange(n_cells)
    group["crops"][:] = np.arange(n_cells, dtype=np.uint8)[:, None, None, None]
    group.attrs["stain"] = STAIN
    if complete:
        finish_slide(group, [n_cells - 2, 2], {"n_tiles": 2})
    return group


def test_a_new_store_is_valid_and_empty(tmp_path):
    root = open_store(tmp_path / "s.zarr", mode="a")
    assert root.attrs["wsicell_store_version"] == 1
    assert complete_slides(root) == [] and validate_store(tmp_path / "s.zarr") == []


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
    _write_slide(root, "b", _attrs(tmp_path), 10)
    _write_slide(root, "a", _attrs(tmp_path), 6, complete=False)
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
    _write_slide(root, "a", _attrs(tmp_path), 6)
    _write_slide(root, "b", _attrs(tmp_path), 6)
    first = store_fingerprint(root, ["a", "b"])
    assert first == store_fingerprint(root, ["b", "a"]) != store_fingerprint(root, ["a"])
    _write_slide(root, "b", _attrs(tmp_path), 7)
    assert store_fingerprint(root, ["a", "b"]) != first


def test_validation_reports_bad_attributes_and_arrays(tmp_path):
    root = open_store(tmp_path / "s.zarr", mode="a")
    group = _write_slide(root, "a", _attrs(tmp_path), 6)
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
