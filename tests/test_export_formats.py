"""The scverse export: an .h5ad that anndata itself reads back, equal to the store."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import write_test_labels, write_test_slide

from wsicell.errors import WsicellError
from wsicell.io.export import export_cells
from wsicell.io.store import (
    open_store,
    read_labels,
    slide_attrs,
    slide_cells,
)

anndata = pytest.importorskip("anndata")

SLIDES = {"s1": 6, "s2": 4}


def softened(clusters, k=3):
    """Q-like probabilities: 0.9 on each cell's cluster, the rest shared by the others."""
    proba = np.full((len(clusters), k), 0.1 / (k - 1), np.float32)
    proba[np.arange(len(clusters)), clusters] = 0.9
    return proba


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "cells.zarr"
    root = open_store(path, mode="a")
    for slide_id, n in SLIDES.items():
        write_test_slide(root, slide_id, tmp_path, n)
        write_test_labels(root, slide_id, "m1", softened(np.arange(n) % 3))
    return path


def test_anndata_holds_every_cell_with_the_stored_labels(store, tmp_path):
    out = tmp_path / "cells.h5ad"
    assert export_cells(store, out, "anndata") == sum(SLIDES.values())
    adata = anndata.read_h5ad(out)
    root = open_store(store)
    assert adata.n_obs == sum(SLIDES.values()) and adata.obs_names.is_unique
    assert adata.obs.slide_id.tolist() == [s for s, n in SLIDES.items() for _ in range(n)]
    assert adata.obs.slide_id.dtype == "category" and adata.obs.cluster.dtype == "category"
    assert list(adata.obs.cluster.cat.categories) == ["0", "1", "2"]
    assert len(adata.uns["cluster_colors"]) == 3
    for slide_id in SLIDES:
        chosen = (adata.obs.slide_id == slide_id).to_numpy()
        obs = adata.obs[chosen]
        cells = slide_cells(root, slide_id)
        cluster, proba = read_labels(root, slide_id, "m1")
        np.testing.assert_array_equal(obs.cell_id, cells.cell_id)
        np.testing.assert_array_equal(obs.cluster.astype(int), cluster)
        np.testing.assert_allclose(obs[["proba_0", "proba_1", "proba_2"]], proba)
        x = adata[chosen].X
        np.testing.assert_allclose(x[:, list(adata.var_names).index("area_um2")], cells.area)
        np.testing.assert_allclose(x[:, list(adata.var_names).index("mean_hematoxylin")],
                                   cells.mean_hematoxylin)
        attrs = slide_attrs(root, slide_id)
        xy = adata.obsm["spatial"][chosen]
        np.testing.assert_allclose(xy, cells[["x", "y"]].to_numpy())
        assert (xy >= 0).all() and (xy[:, 0] < attrs["width"]).all()
        assert (xy[:, 1] < attrs["height"]).all()
        np.testing.assert_allclose(adata.obsm["spatial_um"][chosen], xy * attrs["mpp"])
        library = adata.uns["spatial"][slide_id]
        assert library["images"]["hires"].shape[2] == 3
        assert library["metadata"]["mpp"] == attrs["mpp"]
    provenance = adata.uns["wsicell"]
    assert provenance["model_id"] == "m1" and list(provenance["slides"]) == list(SLIDES)
    assert provenance["store"] == str(store.resolve()) and provenance["wsicell_version"]
    assert list(tmp_path.glob(".*tmp")) == []


def test_anndata_without_labels_has_no_cluster(store, tmp_path):
    root = open_store(store, mode="r+")
    write_test_slide(root, "s3", tmp_path, 5)
    out = tmp_path / "s3.h5ad"
    assert export_cells(store, out, "anndata", ["s3"]) == 5
    adata = anndata.read_h5ad(out)
    assert "cluster" not in adata.obs and adata.uns["wsicell"]["model_id"] == ""
    np.testing.assert_allclose(adata.obsm["spatial"][:, 1], 5.0 * np.arange(5))


def test_missing_anndata_is_one_clear_error(store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "anndata", None)  # import anndata raises ImportError
    with pytest.raises(WsicellError, match=r"needs the anndata package: pip install"):
        export_cells(store, tmp_path / "x.h5ad", "anndata")
    assert list(tmp_path.glob("*.h5ad")) == []


def test_command_line(store, tmp_path):
    out = tmp_path / "s2.h5ad"
    result = subprocess.run([sys.executable, "-m", "wsicell.cli.main", "export", str(store),
                             "--format", "anndata", "--out", str(out), "--slide", "s2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{out}: 4 cells" in result.stdout and anndata.read_h5ad(out).n_obs == 4
