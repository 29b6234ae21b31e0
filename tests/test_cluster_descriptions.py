"""Cluster descriptions ("small, round, dark") measured on a store with known masks, and the
confusion table of clusters against annotated types."""

import numpy as np
import pandas as pd
import pytest
from conftest import STAIN, _slide_attrs, write_test_labels

from wsicell.analysis.cluster_descriptions import (
    confusion_table,
    describe_clusters,
    axis_ratio,
    store_cluster_descriptions,
)
from wsicell.io.store import (
    TILE_COLUMNS,
    begin_slide,
    create_cell_arrays,
    finish_slide,
    open_store,
    write_cell_rows,
    write_crop_rows,
)
from wsicell.segmentation.measurements import inertia_axes, nucleus_measurements


def ellipse_mask(radius_rows: float, radius_cols: float) -> np.ndarray:
    rows, cols = np.mgrid[:32, :32] - 15.5
    return (rows / radius_rows) ** 2 + (cols / radius_cols) ** 2 <= 1


def write_slide(root, slide_id, tmp_path, masks, area, hematoxylin):
    """A complete slide of the given nucleus masks, areas (um2) and mean hematoxylin."""
    n = len(masks)
    group = begin_slide(root, slide_id, _slide_attrs(tmp_path), np.full((5, 6, 3), 255, np.uint8),
                        np.zeros((5, 6), bool), {name: np.arange(1) for name in TILE_COLUMNS})
    create_cell_arrays(group, n, 32, crops_per_chunk=4, cells_per_chunk=8)
    i = np.arange(n)
    write_cell_rows(root.store.root, slide_id, 0, {
        "cell_id": i, "x": 10.0 * i, "y": 5.0 * i, "bbox_x0": 10 * i, "bbox_y0": 5 * i,
        "bbox_x1": 10 * i + 4, "bbox_y1": 5 * i + 3, "area": area,
        "mean_hematoxylin": hematoxylin, "crop_x0": 10.0 * i - 16, "crop_y0": 5.0 * i - 16,
        "crop_px": np.ones(n), "tile_id": np.zeros(n, int)})
    crops = np.full((n, 32, 32, 3), 200, np.uint8)
    write_crop_rows(root.store.root, slide_id, 0, crops, np.asarray(masks))
    write_cell_rows(root.store.root, slide_id, 0, nucleus_measurements(
        np.asarray(masks), crops, STAIN["stain_matrix"], np.ones(n)))
    group.attrs["stain"] = STAIN
    finish_slide(group, [n], {"n_tiles": 1})


def test_descriptions_from_a_store_with_known_masks(tmp_path):
    """Slide a: cluster 0 holds small round dark nuclei (lymphocyte-like), cluster 1 large
    elongated pale ones (stroma-like), cluster 2 a mix. Slide b is the same cells scanned
    paler and scaled 1.5x in area: ranks within a slide give it the same words. Cluster 3
    holds no cell."""
    root = open_store(tmp_path / "cells.zarr", mode="a")
    rng = np.random.default_rng(0)
    small_round = [ellipse_mask(4, 4 + rng.uniform(0, 0.5)) for _ in range(10)]
    large_long = [ellipse_mask(4, 13 + rng.uniform(0, 1)) for _ in range(10)]
    mixed = [ellipse_mask(6, 6 + 3 * rng.uniform()) for _ in range(10)]
    masks = np.stack(small_round + large_long + mixed)
    area = np.r_[rng.uniform(15, 20, 10), rng.uniform(45, 60, 10), rng.uniform(15, 60, 10)]
    stain = np.r_[rng.uniform(40, 60, 10), rng.uniform(140, 170, 10), rng.uniform(40, 170, 10)]
    clusters = np.repeat([0, 1, 2], 10)
    for slide_id, scale, paler in (("a", 1.0, 0.0), ("b", 1.5, 50.0)):
        write_slide(root, slide_id, tmp_path, masks, area * scale, stain + paler)
        write_test_labels(root, slide_id, "m1", np.eye(4)[clusters])

    described = store_cluster_descriptions(root, ["a", "b"], "m1", 4)
    assert described.cells.tolist() == [20, 20, 20, 0]
    assert described.description[0] == "small, round, dark"
    assert described.description[1] == "large, elongated, pale"
    assert described.description[3] == ""
    roundness = axis_ratio(*inertia_axes(masks)[:2])
    assert described.roundness[0] == pytest.approx(np.median(roundness[:10]))
    assert described.roundness[0] > 0.9 and described.roundness[1] < 0.4
    assert described.area_um2[0] == pytest.approx(np.median(np.r_[area[:10], 1.5 * area[:10]]))
    # sampled: at most max_cells per slide, still the same words
    sampled = store_cluster_descriptions(root, ["a", "b"], "m1", 4, max_cells=24, seed=1)
    assert sampled.cells.sum() == 48
    assert sampled.description[0] == "small, round, dark"


def test_words_are_relative_to_each_slide():
    """The same nucleus is 'large' on a slide of small ones and 'small' on one of large ones."""
    area = np.array([10.0, 11, 12, 30, 30, 60, 61, 62])
    slides = np.array(["a"] * 4 + ["b"] * 4)
    clusters = np.array([0, 0, 0, 1, 1, 0, 0, 0])  # the 30 um2 nuclei are cluster 1 on both
    d = describe_clusters(clusters, slides, area, np.full(8, 0.8), np.full(8, 100.0), 2)
    assert d.area_rank[1] == pytest.approx(0.5)  # largest of a, smallest of b
    words = describe_clusters(clusters[:4], slides[:4], area[:4], np.full(4, 0.8),
                              np.full(4, 100.0), 2).description[1]
    assert words.startswith("large")


def test_confusion_table_counts_clusters_against_types():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array(["tumor", "tumor", "stromal", "lymphocyte", "lymphocyte", "tumor"])
    table = confusion_table(clusters, labels, 4)
    assert list(table.columns[:3]) == ["lymphocyte", "stromal", "tumor"]
    assert table.loc[0, ["lymphocyte", "stromal", "tumor"]].tolist() == [0, 1, 2]
    assert table.cells.tolist() == [3, 2, 1, 0]
    assert table.majority.tolist() == ["tumor", "lymphocyte", "tumor", ""]
    assert table.share[0] == pytest.approx(2 / 3)
    assert table.to_numpy()[:, :3].sum() == len(labels)
    assert isinstance(table, pd.DataFrame)


def test_report_cluster_table_shows_the_descriptions(tmp_path):
    from wsicell.viz.report import cluster_table_html

    root = open_store(tmp_path / "cells.zarr", mode="a")
    masks = np.stack([ellipse_mask(4, 4)] * 4 + [ellipse_mask(4, 13)] * 4)
    write_slide(root, "a", tmp_path, masks, np.r_[np.full(4, 15.0), np.full(4, 50.0)],
                np.r_[np.full(4, 50.0), np.full(4, 150.0)])
    write_test_labels(root, "a", "m1", np.eye(2)[np.repeat([0, 1], 4)])
    page = cluster_table_html(root, ["a"], "m1", 2, store_cluster_descriptions(root, ["a"], "m1", 2))
    assert "typical nucleus" in page
    assert page.index("small, round, dark") < page.index("large, elongated, pale")


def test_evaluate_clustering_prints_the_confusion_table(train_store, tmp_path, capsys,
                                                        one_torch_thread):
    """``wsicell evaluate clustering`` on the vendored bone marrow, its dots labelled by the
    image half they lie in: each method's table counts every matched cell once, by cluster
    and type, and the GAN's rows carry their nuclei's description."""
    import json

    from conftest import TEST_DATA, TRAIN_SLIDE

    from wsicell.cli.main import main
    from wsicell.config import TrainConfig, WsicellConfig
    from wsicell.pipeline.training import train

    model = tmp_path / "model"
    train(train_store, model, WsicellConfig(train=TrainConfig(width=8, batch_size=16,
                                                              critic_steps=1)),
          device="cpu", max_iters=1, progress=False)
    dots = pd.read_csv(TEST_DATA / "bm_graz" / "dots" / f"{TRAIN_SLIDE}.csv")
    points = tmp_path / "points"
    points.mkdir()
    dots.assign(label=np.where(dots.y < 600, "top", "bottom")).to_csv(
        points / f"{TRAIN_SLIDE}.csv", index=False)
    args = ["evaluate", "clustering", "--store", str(train_store), "--model", str(model),
            "--points", str(points), "--radius", "12"]
    main(args + ["--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["types"] == ["bottom", "top"] and len(result["descriptions"]) == 5
    for method in ("gan", "baseline"):
        table = pd.DataFrame(result["confusion"][method])
        assert table.cluster.tolist() == [0, 1, 2, 3, 4]
        assert table[["bottom", "top"]].to_numpy().sum() == result["matched"]
        assert (table.cells == table.bottom + table.top).all()
    main(args)
    text = capsys.readouterr().out
    assert "matched cells per cluster (rows) and annotated type (columns)" in text
    used = [d for d in result["descriptions"] if d]
    assert used and used[0] in text
