"""The scverse route of docs/interop.md, run in the Python 3.12 environment ``make test``
builds (``.venv/scverse``: spatialdata >= 0.8, scanpy, squidpy and wsicell without torch):
the SpatialData export read back by ``spatialdata`` itself, and the docs' example."""

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_SLIDE

from wsicell.io.export import MEASUREMENTS, export_cells, slide_table
from wsicell.io.store import open_store, slide_attrs

ROOT = Path(__file__).resolve().parents[1]
SCVERSE = ROOT / ".venv" / "scverse" / "bin" / "python"

#: Run in the scverse environment: read a SpatialData store, print what it holds as JSON.
READ_BACK = """
import json, sys
import numpy as np
import spatialdata
from spatialdata.transformations import get_transformation

sdata = spatialdata.read_zarr(sys.argv[1])
table = sdata.tables["cells"]
slide = sys.argv[2]
shapes = sdata.shapes[f"{slide}_nuclei"]
image = sdata.images[f"{slide}_thumbnail"]
print(json.dumps({
    "attrs": table.uns["spatialdata_attrs"],
    "region": table.obs["region"].astype(str).tolist(),
    "cell_id": table.obs["cell_id"].tolist(),
    "var_names": list(table.var_names),
    "X": np.asarray(table.X).tolist(),
    "spatial": table.obsm["spatial"].tolist(),
    "shape_ids": shapes.index.tolist(),
    "centroids": [[c.x, c.y] for c in shapes.geometry.centroid],
    "areas": shapes.geometry.area.tolist(),
    "image_shape": list(image.shape),
    "image_scale": get_transformation(image, to_coordinate_system=slide).scale.tolist(),
    "shape_transform": type(get_transformation(shapes, to_coordinate_system=slide)).__name__,
}))
"""


@pytest.fixture(scope="module")
def scverse():
    if not SCVERSE.exists():
        pytest.skip(f"{SCVERSE} missing (make .venv/scverse/.installed builds it)")
    return SCVERSE


def _run(python, *args, cwd=None):
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_spatialdata_export_is_read_back_by_spatialdata(scverse, train_store, tmp_path):
    out = tmp_path / "cells_sd.zarr"
    result = _run(scverse, "-m", "wsicell.cli.main", "export", str(train_store),
                  "--format", "spatialdata", "--out", str(out))
    assert result.stdout.strip().endswith("cells") and not result.stderr
    read = json.loads(_run(scverse, "-c", READ_BACK, str(out), TRAIN_SLIDE).stdout)
    root = open_store(train_store)
    cells, attrs = slide_table(root, TRAIN_SLIDE), slide_attrs(root, TRAIN_SLIDE)
    assert read["attrs"] == {"instance_key": "cell_id", "region_key": "region",
                             "region": [f"{TRAIN_SLIDE}_nuclei"]}
    assert set(read["region"]) == {f"{TRAIN_SLIDE}_nuclei"}
    assert read["cell_id"] == read["shape_ids"] == cells.cell_id.tolist()
    assert read["var_names"] == list(MEASUREMENTS)
    np.testing.assert_allclose(read["X"], cells[list(MEASUREMENTS)], rtol=1e-6)
    np.testing.assert_allclose(read["spatial"], cells[["x", "y"]])
    # the outlines: centroid on the cell's (pixel-edge coordinates), area the nucleus's
    offset = np.hypot(*(np.array(read["centroids"]) - 0.5 - cells[["x", "y"]].to_numpy()).T)
    assert np.median(offset) < 0.2
    ratio = np.array(read["areas"]) * attrs["mpp"] ** 2 / cells.area_um2.to_numpy()
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    assert read["shape_transform"] == "Identity"
    channels, height, width = read["image_shape"]
    assert channels == 3
    np.testing.assert_allclose(read["image_scale"][-2:], [attrs["height"] / height,
                                                          attrs["width"] / width])
    # exported again onto itself: replaced whole, no temporary left beside it
    _run(scverse, "-m", "wsicell.cli.main", "export", str(train_store),
         "--format", "spatialdata", "--out", str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells_sd.zarr"]


def test_spatialdata_without_the_package_is_one_clear_error(train_store, tmp_path):
    pytest.importorskip("anndata")
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "wsicell.cli.main",
                             "export", str(train_store), "--format", "spatialdata",
                             "--out", str(tmp_path / "x.zarr")],
                            capture_output=True, text=True, timeout=300)
    try:
        import spatialdata  # noqa: F401
    except ImportError:
        assert result.returncode != 0 and "needs the spatialdata package" in result.stderr
        assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
    else:
        pytest.skip("spatialdata is installed here")


def test_the_docs_scanpy_squidpy_example_runs(scverse, train_store, tmp_path):
    text = (ROOT / "docs" / "interop.md").read_text()
    example = re.search(r"<!-- tested: scverse-example -->\n```python\n(.*?)```", text,
                        re.S).group(1)
    export_cells(train_store, tmp_path / "cells.h5ad", "anndata")
    result = _run(scverse, "-c", example, cwd=tmp_path)
    assert (tmp_path / "measurements_by_cluster.png").stat().st_size > 1000
    zscores = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(zscores) >= 2  # a (clusters x clusters) matrix of z-scores
