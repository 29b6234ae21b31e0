"""Every export of a real store read back with its own library (pandas, json + shapely,
anndata) holds the store's cells, coordinates and nucleus measurements."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import shapely
from conftest import TRAIN_SLIDE

from wsicell.io.export import MEASUREMENTS, export_cells, slide_table
from wsicell.io.store import open_store
from wsicell.segmentation.measurements import MEASUREMENT_COLUMNS

anndata = pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def cells(train_store):
    return slide_table(open_store(train_store), TRAIN_SLIDE)


def test_the_exported_measurements_are_the_stored_ones(cells):
    assert set(MEASUREMENT_COLUMNS) <= set(MEASUREMENTS) <= set(cells.columns)
    assert len(MEASUREMENTS) >= 12
    assert all(name.startswith("Nucleus: ") for name, _ in MEASUREMENTS.values())


@pytest.mark.parametrize("fmt, read", [("csv", pd.read_csv), ("parquet", pd.read_parquet)])
def test_tables_hold_the_measurements(train_store, cells, tmp_path, fmt, read):
    out = tmp_path / f"cells.{fmt}"
    assert export_cells(train_store, out, fmt) == len(cells)
    table = read(out)
    np.testing.assert_array_equal(table.cell_id, cells.cell_id)
    np.testing.assert_allclose(table[["x", "y"]], cells[["x", "y"]])
    np.testing.assert_allclose(table[list(MEASUREMENTS)], cells[list(MEASUREMENTS)], rtol=1e-6)


def test_geojson_carries_qupath_measurements(train_store, cells, tmp_path):
    out = tmp_path / "cells.geojson"
    export_cells(train_store, out, "geojson")
    features = json.loads(out.read_text())["features"]
    assert [f["properties"]["cell_id"] for f in features] == cells.cell_id.tolist()
    for column, (name, _) in MEASUREMENTS.items():
        values = [f["properties"]["measurements"][name] for f in features]
        np.testing.assert_allclose(values, cells[column], rtol=1e-6, err_msg=name)
    centroids = np.array([shapely.geometry.shape(f["geometry"]).centroid.coords[0]
                          for f in features]) - 0.5
    assert np.median(np.hypot(*(centroids - cells[["x", "y"]].to_numpy()).T)) < 0.2


def test_anndata_x_holds_the_measurements(train_store, cells, tmp_path):
    out = tmp_path / "cells.h5ad"
    export_cells(train_store, out, "anndata")
    adata = anndata.read_h5ad(out)
    assert adata.n_vars == len(MEASUREMENTS) >= 12
    assert list(adata.var_names) == list(MEASUREMENTS)
    assert adata.var.qupath_name.tolist() == [name for name, _ in MEASUREMENTS.values()]
    assert adata.X.dtype == np.float32
    np.testing.assert_allclose(adata.X, cells[list(MEASUREMENTS)].to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(adata.obs.cell_id, cells.cell_id)
    np.testing.assert_allclose(adata.obsm["spatial"], cells[["x", "y"]])
    assert not set(MEASUREMENTS) & set(adata.obs.columns)  # in X, not repeated in obs


def test_features_are_the_models_discriminator_features(train_store, tmp_path):
    from wsicell.config import TrainConfig, WsicellConfig
    from wsicell.io.store import slide_crops
    from wsicell.learning.saved_model import load_trained_model
    from wsicell.pipeline.training import train

    config = WsicellConfig(train=TrainConfig(categories=3, width=16, batch_size=32,
                                             critic_steps=1, seed=0))
    train(train_store, tmp_path / "model", config, device="cpu", max_iters=2, progress=False)
    out = tmp_path / "cells.h5ad"
    result = subprocess.run([sys.executable, "-m", "wsicell.cli.main", "export",
                             str(train_store), "--format", "anndata", "--out", str(out),
                             "--features", str(tmp_path / "model")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    adata = anndata.read_h5ad(out)
    model = load_trained_model(tmp_path / "model")
    expected = model.features(slide_crops(open_store(train_store), TRAIN_SLIDE)[:])
    assert adata.obsm["X_wsicell_d"].shape == (adata.n_obs, 64 * 16)
    np.testing.assert_allclose(adata.obsm["X_wsicell_d"], expected, rtol=1e-4, atol=1e-5)
    refused = subprocess.run([sys.executable, "-m", "wsicell.cli.main", "export",
                              str(train_store), "--format", "csv", "--out",
                              str(tmp_path / "x.csv"), "--features", str(tmp_path / "model")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--features" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "x.csv").exists()
