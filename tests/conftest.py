"""Shared test helpers: where the real data of ../shared/data lives."""

from pathlib import Path

import numpy as np
import pytest

from wsicell import __version__
from wsicell.config import WsicellConfig
from wsicell.io.store import (
    TILE_COLUMNS,
    begin_labels,
    begin_slide,
    create_cell_arrays,
    file_fingerprint,
    finish_labels,
    finish_slide,
    write_cell_rows,
    write_crop_rows,
    write_label_rows,
)
from wsicell.segmentation.measurements import nucleus_measurements

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_DATA = Path(__file__).resolve().parent / "data"


def shared_data_path(*parts: str) -> Path:
    """A path under ../shared/data; skips the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def htk_reference():
    """The HistomicsTK-composed reference recipe (benchmarks/htk_reference.py); skips the
    calling test when HistomicsTK is not importable."""
    pytest.importorskip("histomicstk")
    import sys

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import htk_reference

    return htk_reference


def bm_graz_images() -> list[Path]:
    """All bm_graz images of ../shared/data (skips when absent)."""
    return sorted(shared_data_path("bm_graz", "images").glob("*.png"))


STAIN = {"source_lab_mean": [8.0, 0.1, 0.0], "source_lab_std": [0.5, 0.1, 0.03],
         "target_lab_mean": [8.98, 0.08, 0.02], "target_lab_std": [0.64, 0.11, 0.03],
         "stain_matrix": [[0.65, 0.07, 0.7], [0.7, 0.99, -0.7], [0.29, 0.1, 0.1]]}


def _slide_attrs(tmp_path):
    source = tmp_path / "slide.svs"
    source.write_bytes(b"pixels" * 100)
    return {"source_path": str(source), "fingerprint": file_fingerprint(source), "width": 100,
            "height": 80, "mpp": 0.5, "mpp_source": "metadata", "backend": "openslide",
            "reference_mpp": 0.4, "thumbnail_mpp": 16.0, "tile_size": 64, "halo": 8,
            "grid_cols": 2, "grid_rows": 2, "config": WsicellConfig().to_json(),
            "wsicell_version": __version__}


def write_test_slide(root, slide_id, tmp_path, n_cells, complete=True):
    """A small slide written with the store's writers (no Dask): cells 0..n-1 in two tiles,
    crop i filled with value i, cell i at (10 i, 5 i), its nucleus the 7x5 px box around it
    (the mask, centred in the crop)."""
    attrs = _slide_attrs(tmp_path)
    tiles = {name: np.arange(2) for name in TILE_COLUMNS}
    group = begin_slide(root, slide_id, attrs, np.full((5, 6, 3), 255, np.uint8),
                        np.zeros((5, 6), bool), tiles)
    create_cell_arrays(group, n_cells, 32, crops_per_chunk=4, cells_per_chunk=8)
    i = np.arange(n_cells)
    store = root.store.root
    write_cell_rows(store, slide_id, 0, {
        "cell_id": i, "x": 10.0 * i, "y": 5.0 * i, "bbox_x0": 10 * i - 3, "bbox_y0": 5 * i - 2,
        "bbox_x1": 10 * i + 4, "bbox_y1": 5 * i + 3, "area": np.full(n_cells, 30.5),
        "mean_hematoxylin": np.full(n_cells, 0.5), "crop_x0": 10.0 * i - 3 - 12,
        "crop_y0": 5.0 * i - 2 - 13, "crop_px": np.ones(n_cells),
        "tile_id": (i >= n_cells - 2).astype(int)})
    masks = np.zeros((n_cells, 32, 32), bool)
    masks[:, 13:18, 12:19] = True
    crops = np.broadcast_to(i.astype(np.uint8)[:, None, None, None], (n_cells, 32, 32, 3))
    write_crop_rows(store, slide_id, 0, crops, masks)
    write_cell_rows(store, slide_id, 0, nucleus_measurements(
        masks, crops, STAIN["stain_matrix"], np.full(n_cells, attrs["mpp"])))
    group.attrs["stain"] = STAIN
    if complete:
        finish_slide(group, [n_cells - 2, 2], {"n_tiles": 2})
    return group


def write_test_labels(root, slide_id, model_id, proba, complete=True):
    """A model's labels of a test slide written with the store's writers: Q's probabilities
    ``proba`` (N, k) for the first N cells; marked complete unless ``complete`` is False."""
    proba = np.asarray(proba, dtype=np.float32)
    begin_labels(root, slide_id, model_id, proba.shape[1], {})
    write_label_rows(root, slide_id, model_id, 0, proba)
    if complete:
        finish_labels(root, slide_id, model_id)


TRAIN_SLIDE = "BM_GRAZ_HE_0001_01"


@pytest.fixture(scope="session")
def train_store(tmp_path_factory) -> Path:
    """A real cell store the trainer tests share: the vendored bone-marrow image ingested
    once per session (small tiles and chunks so that several chunks and streams exist)."""
    from wsicell.config import IngestConfig
    from wsicell.pipeline.ingest import ingest

    path = tmp_path_factory.mktemp("train_store") / "cells.zarr"
    config = WsicellConfig(ingest=IngestConfig(tile_size=512, crops_per_chunk=128))
    ids = ingest(path, [TEST_DATA / f"{TRAIN_SLIDE}.png"], config, mpp=0.4, workers=1,
                 progress=False)
    assert ids == [TRAIN_SLIDE]
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine more threads make tiny models slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
