import json
import time

import numpy as np
import pytest
from shapely.geometry import MultiPolygon, Polygon

from wsicell.analysis.proportions import (
    PolygonRegion,
    RegionGrid,
    cluster_counts,
    counts_to_proportions,
    grid_counts,
    polygon_counts,
    read_geojson_regions,
)
from wsicell.errors import WsicellError


def test_counts_and_proportions_sum_to_one():
    clusters = np.array([0, 2, 2, 1, 2, 0])
    counts = cluster_counts(clusters, k=4)
    assert counts.tolist() == [2, 1, 3, 0]
    p = counts_to_proportions(counts)
    np.testing.assert_allclose(p, [2 / 6, 1 / 6, 3 / 6, 0])
    assert p.sum() == pytest.approx(1.0)


def test_proportions_of_empty_region_are_nan():
    p = counts_to_proportions(np.array([[0, 0], [1, 3]]))
    assert np.isnan(p[0]).all()
    np.testing.assert_allclose(p[1], [0.25, 0.75])


def test_region_grid_covers_the_slide():
    grid = RegionGrid.covering(width=2220, height=2967, mpp=0.499, region_size_um=500)
    assert grid.region_px == pytest.approx(500 / 0.499)
    assert grid.shape == (3, 3)
    bounds = grid.bounds()
    assert bounds[-1, -1, 2] >= 2220 and bounds[-1, -1, 3] >= 2967


def test_grid_counts_match_a_loop():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1000, 500), rng.uniform(0, 700, 500)
    clusters = rng.integers(0, 3, 500)
    grid = RegionGrid.covering(1000, 700, mpp=0.5, region_size_um=100)  # 200 px regions
    counts = grid_counts(x, y, clusters, 3, grid)
    assert counts.shape == (4, 5, 3)
    expected = np.zeros_like(counts)
    for xi, yi, ci in zip(x, y, clusters):
        expected[int(yi // 200), int(xi // 200), ci] += 1
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == 500


def test_grid_counts_of_a_million_cells_is_fast():
    rng = np.random.default_rng(1)
    n = 1_000_000
    x, y = rng.uniform(0, 100_000, n), rng.uniform(0, 80_000, n)
    clusters = rng.integers(0, 5, n)
    grid = RegionGrid.covering(100_000, 80_000, mpp=0.25, region_size_um=500)
    start = time.perf_counter()
    counts = grid_counts(x, y, clusters, 5, grid)
    assert time.perf_counter() - start < 1.0
    assert counts.sum() == n


def test_polygon_with_hole_and_multipolygon():
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], float)
    hole = np.array([[4, 4], [6, 4], [6, 6], [4, 6], [4, 4]], float)
    far = square + 100
    region = PolygonRegion("r", MultiPolygon([Polygon(square, [hole]), Polygon(far)]))
    x = np.array([1, 5, 105, 50])
    y = np.array([1, 5, 105, 50])
    assert region.contains(x, y).tolist() == [True, False, True, False]
    counts = polygon_counts(x, y, np.array([0, 1, 1, 0]), 2, [region])
    assert counts.tolist() == [[1, 1]]


def _feature(geometry, **properties):
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def test_read_qupath_geojson(tmp_path):
    ring = [[0, 0], [100, 0], [100, 50], [0, 50], [0, 0]]
    shifted = [[x + 200, y] for x, y in ring]
    data = {"type": "FeatureCollection", "features": [
        _feature({"type": "Polygon", "coordinates": [ring]}, objectType="annotation",
                 classification={"name": "Tumor", "color": [200, 0, 0]}),
        _feature({"type": "MultiPolygon", "coordinates": [[ring], [shifted]]}, name="stroma"),
    ]}
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(data))
    regions = read_geojson_regions(path)
    assert [r.name for r in regions] == ["Tumor", "stroma"]
    assert regions[0].contains(np.array([50.0]), np.array([25.0])).tolist() == [True]
    # QuPath's "export as array" form
    path.write_text(json.dumps(data["features"]))
    assert len(read_geojson_regions(path)) == 2


@pytest.mark.parametrize("content, message", [
    (json.dumps({"type": "FeatureCollection", "features": [
        _feature({"type": "Point", "coordinates": [1, 2]})]}), "Point geometry"),
    (json.dumps({"type": "FeatureCollection", "features": []}), "no feature"),
    ("not json", "not a readable GeoJSON"),
    (json.dumps({"type": "Polygon", "coordinates": []}), "not a GeoJSON Feature"),
    (json.dumps([_feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]})]),
     "fewer than 3 points"),
])
def test_bad_geojson_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(WsicellError, match=message):
        read_geojson_regions(path)


def test_missing_geojson(tmp_path):
    with pytest.raises(WsicellError, match="no such file"):
        read_geojson_regions(tmp_path / "missing.geojson")
