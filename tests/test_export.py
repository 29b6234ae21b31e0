"""Export of the cell table: CSV, Parquet and QuPath-style GeoJSON."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import shapely
from conftest import TRAIN_SLIDE, write_test_labels, write_test_slide

from wsicell.errors import WsicellError
from wsicell.io.export import export_cells, slide_table
from wsicell.io.store import open_store, slide_attrs

CLUSTERS = np.array([0, 1, 2, 0, 1, 2])


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "cells.zarr"
    root = open_store(path, mode="a")
    write_test_slide(root, "s1", tmp_path, 6)
    write_test_slide(root, "s2", tmp_path, 4)
    write_test_slide(root, "s3", tmp_path, 5, complete=False)
    write_test_labels(root, "s1", "m1", np.eye(3)[CLUSTERS])
    return path


@pytest.mark.parametrize("fmt, read", [("csv", pd.read_csv), ("parquet", pd.read_parquet)])
def test_tables_hold_every_cell_of_complete_slides(store, tmp_path, fmt, read):
    out = tmp_path / f"cells.{fmt}"
    with pytest.warns(UserWarning, match="'s3' is incomplete"):
        assert export_cells(store, out, fmt) == 10
    table = read(out)
    assert list(table.columns[:5]) == ["slide_id", "cell_id", "x", "y", "bbox_x0"]
    assert table.slide_id.tolist() == ["s1"] * 6 + ["s2"] * 4
    np.testing.assert_array_equal(table.cell_id, [0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    np.testing.assert_allclose(table.x[:3], [0, 10, 20])
    np.testing.assert_allclose(table.area_um2, 30.5)  # the store's `area`, with its unit
    assert "area" not in table.columns


def test_geojson_is_a_collection_of_qupath_detections(store, tmp_path):
    out = tmp_path / "s1.geojson"
    assert export_cells(store, out, "geojson", ["s1"], labels="m1") == 6
    collection = json.loads(out.read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 6
    feature = collection["features"][1]
    assert feature["type"] == "Feature"
    outline = shapely.geometry.shape(feature["geometry"])  # the 7x5 px mask of cell 1
    assert outline.is_valid and outline.geom_type == "Polygon"
    assert outline.bounds == (7, 3, 14, 8) and outline.area == pytest.approx(34.5)
    properties = feature["properties"]
    assert properties["objectType"] == "detection"
    assert properties["cell_id"] == 1 and properties["classification"]["name"] == "cluster 1"
    assert len(properties["classification"]["color"]) == 3
    assert properties["measurements"]["Nucleus: Area µm^2"] == 30.5
    assert set(properties["measurements"]) >= {f"Cluster {i} probability" for i in range(3)}
    export_cells(store, out, "geojson", ["s1"], geometry="box")
    assert json.loads(out.read_text())["features"][1]["geometry"] == {
        "type": "Polygon", "coordinates": [[[7, 3], [14, 3], [14, 8], [7, 8], [7, 3]]]}
    export_cells(store, out, "geojson", ["s2"], geometry="point")
    point = json.loads(out.read_text())["features"][2]["geometry"]
    assert point == {"type": "Point", "coordinates": [20.0, 10.0]}


def test_bad_requests_fail_before_writing(store, tmp_path):
    out = tmp_path / "x.geojson"
    with pytest.raises(WsicellError, match="one slide"):
        export_cells(store, out, "geojson", ["s1", "s2"])
    with pytest.raises(WsicellError, match="'s3' is incomplete"):
        export_cells(store, out, "csv", ["s3"])
    with pytest.raises(WsicellError, match="no labels 'm9'"):
        export_cells(store, out, "csv", ["s1"], labels="m9")
    assert list(tmp_path.glob("*.geojson")) == [] and list(tmp_path.glob(".*tmp")) == []


def test_labels_columns_are_the_stored_labels(store, tmp_path):
    out = tmp_path / "s1.csv"
    export_cells(store, out, "csv", ["s1"], labels="m1")
    table = pd.read_csv(out)
    np.testing.assert_array_equal(table.cluster, CLUSTERS)
    np.testing.assert_array_equal(table[["proba_0", "proba_1", "proba_2"]].to_numpy(),
                                  np.eye(3)[CLUSTERS])


def test_incomplete_labels_are_refused(store, tmp_path):
    """Labels an interrupted predict left unfinished (only their first rows written) are
    never exported: asked for, they are refused; by default, no cluster column appears."""
    root = open_store(store, mode="r+")
    write_test_labels(root, "s2", "m2", np.eye(3)[[0, 1]], complete=False)
    out = tmp_path / "s2.csv"
    with pytest.raises(WsicellError, match="no labels 'm2' that are complete"):
        export_cells(store, out, "csv", ["s2"], labels="m2")
    assert not out.exists()
    assert export_cells(store, out, "csv", ["s2"]) == 4
    assert "cluster" not in pd.read_csv(out).columns


def test_command_line(store, tmp_path):
    out = tmp_path / "s2.csv"
    result = subprocess.run([sys.executable, "-m", "wsicell.cli.main", "export", str(store),
                             "--format", "csv", "--out", str(out), "--slide", "s2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{out}: 4 cells" in result.stdout and len(pd.read_csv(out)) == 4


def test_geojson_outlines_trace_the_nuclei_of_a_real_slide(train_store, tmp_path):
    out = tmp_path / "cells.geojson"
    n = export_cells(train_store, out, "geojson")
    features = json.loads(out.read_text())["features"]
    assert len(features) == n > 100
    root = open_store(train_store)
    attrs = slide_attrs(root, TRAIN_SLIDE)
    slide = shapely.box(0, 0, attrs["width"], attrs["height"])
    cells = slide_table(root, TRAIN_SLIDE)
    outlines = [shapely.geometry.shape(f["geometry"]) for f in features]
    assert all(o.geom_type in ("Polygon", "MultiPolygon") and o.is_valid and slide.covers(o)
               for o in outlines)
    assert np.mean([o.geom_type == "Polygon" for o in outlines]) > 0.95
    # each outline has its cell's centroid (pixel centres at integers, outlines on pixel
    # edges) and area (level-0 px = 0.4 um here)
    centres = np.array([o.centroid.coords[0] for o in outlines]) - 0.5
    offset = np.hypot(*(centres - cells[["x", "y"]].to_numpy()).T)
    assert np.median(offset) < 0.2 and (offset < 1 + cells.crop_px).all()
    area_px = np.array([o.area for o in outlines])
    ratio = area_px * attrs["mpp"] ** 2 / cells.area_um2.to_numpy()
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05) and (abs(ratio - 1) < 0.3).mean() > 0.95
