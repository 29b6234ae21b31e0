"""Benchmark of prediction: labelling throughput and the proportion step.

* ``cells_per_s``: cells labelled per second by ``label_slides`` (Q over every crop, labels
  written back into the store), on CPU through a LocalCluster of ``--workers`` single-thread
  workers, and on the GPU in this process when there is one (``cells_per_s_gpu``).  The
  store holds real crops (the vendored bone-marrow images segmented, repeated to
  ``--cells``); the model is an untrained network of the given width (throughput does not
  depend on the weights).  Cluster start-up is not timed; loading the model in the workers is.
* ``proportions_s_1m_cells``: whole-slide counts, a 500 um region grid and one annotated
  polygon region of a synthetic 10^6-cell slide (random positions and clusters).

Usage: python benchmarks/bench_predict.py [--cells 32768] [--width 128] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import VENDORED_DATA, headline
from shapely.geometry import Polygon


def build_store(path: Path, n_cells: int, config) -> str:
    """A store with one slide of ``n_cells`` real crops (segmented vendored images, repeated)."""
    from wsicell.io import store as st
    from wsicell.io.slide import read_rgb_image
    from wsicell.segmentation.nuclei import Nuclei, segment_image

    images = sorted((VENDORED_DATA / "bm_graz" / "images").glob("*.png"))
    nuclei = Nuclei.concatenate([segment_image(read_rgb_image(p), config)[0] for p in images])
    repeat = np.resize(np.arange(len(nuclei)), n_cells)
    root = st.open_store(path, mode="a")
    tiles = {"tile_id": [0], "x0": [0], "y0": [0], "x1": [1200], "y1": [1200],
             "tissue_fraction": [1.0], "n_cells": [n_cells], "cell_offset": [0]}
    # the slide attributes (stain fit and calibration included) of a real ingest of the first
    # image, so that the store passes its schema
    from wsicell.pipeline.ingest import ingest

    ingested = path.with_name("ingested.zarr")
    ingest(ingested, images[:1], config, mpp=0.4, workers=1, progress=False)
    attrs = {key: value for key, value in st.slide_attrs(st.open_store(ingested), images[0].stem)
             .items() if key not in ("status", "n_cells")}
    group = st.begin_slide(root, "bench", attrs, np.full((75, 75, 3), 200, np.uint8),
                           np.ones((75, 75), bool), tiles)
    st.create_cell_arrays(group, n_cells, 32, config.ingest.crops_per_chunk,
                          config.ingest.crops_per_chunk)
    st.write_crop_rows(path, "bench", 0, nuclei.crops[repeat], nuclei.masks[repeat])
    st.write_cell_rows(path, "bench", 0, {"cell_id": np.arange(n_cells),
                                          "x": nuclei.x[repeat], "y": nuclei.y[repeat]})
    st.finish_slide(group, np.array([n_cells]), {"n_tiles": 1})
    return "bench"


def save_model(path: Path, width: int, config):
    from wsicell.config import TrainConfig, WsicellConfig
    from wsicell.learning.model import model_for
    from wsicell.learning.saved_model import save_trained_model

    config = WsicellConfig.model_validate(
        {**config.to_json(), "train": TrainConfig(width=width).model_dump(mode="json")})
    path.mkdir()
    save_trained_model(path, model_for(config.train, seed=0), config, {})
    return path


def time_labelling(store: Path, model_dir: Path, config, device: str, workers: int) -> float:
    """Cells per second of one ``label_slides`` call (labels deleted first)."""
    from wsicell.io.store import discard_labels, open_store, slide_crops
    from wsicell.learning.saved_model import load_trained_model
    from wsicell.pipeline.cluster import dask_client
    from wsicell.pipeline.labelling import label_slides

    root = open_store(store, mode="r+")
    model = load_trained_model(model_dir, device=device)
    discard_labels(root, "bench", model.model_id)
    n = slide_crops(root, "bench").shape[0]
    if device == "cpu":
        with dask_client(workers, 1, "4GB", None, progress=False) as client:
            start = time.perf_counter()
            label_slides(store, ["bench"], model_dir, model, config, client=client, progress=False)
            return n / (time.perf_counter() - start)
    start = time.perf_counter()
    label_slides(store, ["bench"], model_dir, model, config, progress=False)
    return n / (time.perf_counter() - start)


def time_proportions(n_cells: int = 1_000_000, k: int = 5, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds of the proportion step of a synthetic slide."""
    from wsicell.analysis.proportions import (
        PolygonRegion,
        RegionGrid,
        cluster_counts,
        counts_to_proportions,
        grid_counts,
        polygon_counts,
    )

    rng = np.random.default_rng(0)
    width, height, mpp = 100_000, 80_000, 0.25  # a 25 x 20 mm slide at 40x
    x, y = rng.uniform(0, width, n_cells), rng.uniform(0, height, n_cells)
    clusters = rng.integers(0, k, n_cells)
    angle = np.linspace(0, 2 * np.pi, 200)
    outline = np.column_stack([50_000 + 20_000 * np.cos(angle), 40_000 + 15_000 * np.sin(angle)])
    region = PolygonRegion("tumour", Polygon(outline))
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        grid = RegionGrid.covering(width, height, mpp, 500)
        counts_to_proportions(cluster_counts(clusters, k))
        counts_to_proportions(grid_counts(x, y, clusters, k, grid))
        counts_to_proportions(polygon_counts(x, y, clusters, k, [region]))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    import torch

    from wsicell.config import WsicellConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=32768)
    parser.add_argument("--width", type=int, default=128, help="Channels of the networks.")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    config = WsicellConfig().with_options("paper")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        store, model_dir = Path(tmp) / "bench.zarr", save_model(Path(tmp) / "model", args.width,
                                                                 config)
        build_store(store, args.cells, config)
        cpu = time_labelling(store, model_dir, config, "cpu", args.workers)
        print(f"labelling on CPU ({args.workers} workers x 1 thread), {args.cells} cells, "
              f"width {args.width}: {cpu:.0f} cells/s")
        figures["cells_per_s"] = cpu
        if torch.cuda.is_available():
            gpu = time_labelling(store, model_dir, config, "cuda", args.workers)
            print(f"labelling on {torch.cuda.get_device_name()}: {gpu:.0f} cells/s")
            figures["cells_per_s_gpu"] = gpu
    seconds = time_proportions()
    print(f"proportions of a 10^6-cell slide (slide, 500 um grid, one polygon): {seconds:.3f} s")
    headline(**figures, proportions_s_1m_cells=seconds)


if __name__ == "__main__":
    main()
