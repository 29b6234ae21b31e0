import numpy as np
import pandas as pd
import pytest

from wsicell.palette import cluster_colours
from wsicell.viz.figures import (
    crop_mosaic,
    draw_cluster_gallery,
    draw_generator_grid,
    draw_pca_scatter,
    draw_proportion_bars,
    draw_slide_overview,
    image_is_blank,
)
from wsicell.viz.report import Section, write_html_report


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def test_cluster_colours_are_distinct():
    colours = cluster_colours(5)
    assert colours.shape == (5, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 5


def test_crop_mosaic_layout(rng):
    crops = rng.integers(0, 255, (7, 4, 4, 3), dtype=np.uint8)
    mosaic = crop_mosaic(crops, columns=3, gap=1)
    assert mosaic.shape == (3 * 5 - 1, 3 * 5 - 1, 3)
    np.testing.assert_array_equal(mosaic[5:9, 5:9], crops[4])
    assert (mosaic[10:, 5:] == 255).all()  # unused cells are white


def test_drawings_are_not_blank(tmp_path, rng):
    crops = rng.integers(0, 255, (60, 32, 32, 3), dtype=np.uint8)
    paths = [
        draw_cluster_gallery(crops, 0, 600, 0.3, tmp_path / "gallery.png"),
        draw_cluster_gallery(crops[:0], 1, 0, 0.0, tmp_path / "gallery_empty.png"),
        draw_generator_grid(rng.integers(0, 255, (4, 5, 32, 32, 3), dtype=np.uint8),
                            tmp_path / "grid.png"),
    ]
    thumbnail = np.full((60, 80, 3), 230, np.uint8)
    thumbnail[10:50, 10:60] = (180, 90, 160)
    mask = np.zeros((15, 20), bool)
    mask[3:12, 3:15] = True
    density = rng.uniform(0, 500, (3, 4, 5))
    density[0, 0] = np.nan
    paths.append(draw_slide_overview(thumbnail, mask, density, (4000, 3000), 1000.0, "slide a",
                                     tmp_path / "overview.png"))
    proportions = rng.dirichlet(np.ones(5), 6)
    ids = [f"s{i}" for i in range(6)]
    paths.append(draw_pca_scatter(proportions, ids, ["0", "1"] * 3,
                                  ["normal", "", "abnormal"] * 2, tmp_path / "pca.png"))
    paths.append(draw_pca_scatter(proportions[:1], ids[:1], None, None, tmp_path / "pca1.png"))
    paths.append(draw_proportion_bars(proportions, ids, tmp_path / "bars.png"))
    for path in paths:
        assert path.exists() and not image_is_blank(path), path


def test_blank_image_is_detected(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(tmp_path / "white.png")
    assert image_is_blank(tmp_path / "white.png")


def test_html_report_embeds_and_links_images(tmp_path, rng):
    png = draw_proportion_bars(rng.dirichlet(np.ones(3), 2), ["a", "b"], tmp_path / "bars.png")
    table = pd.DataFrame({"slide_id": ["a", "b"], "p_0": [0.25, 0.5]})
    path = write_html_report(tmp_path / "report.html", "demo <report>",
                             [Section("Proportions", "text & more", [table], [png])],
                             {"wsicell_version": "x"})
    text = path.read_text()
    assert 'href="bars.png"' in text and "data:image/png;base64," in text
    assert "demo &lt;report&gt;" in text and "<table" in text and "wsicell_version" in text
    assert not (tmp_path / "report.html.tmp").exists()


def _summary_numbers(page: str) -> dict:
    """The summary's numbers as the page shows them (``data-*`` attributes of the summary)."""
    import re

    cards = {key: int(value.replace(",", "")) for key, value in
             re.findall(r"data-summary='([\w-]+)'>([\d,]+)<", page)}
    slides = {s: int(n) for s, n in re.findall(r"data-slide='([^']+)' data-cells='(\d+)'", page)}
    clusters = {int(c): int(n) for c, n in
                re.findall(r"data-cluster='(\d+)' data-cells='(\d+)'", page)}
    return {"cards": cards, "slides": slides, "clusters": clusters}


class _Model:
    """What the report reads of a TrainedModel, without torch or training."""

    def __init__(self, k):
        from wsicell.config import TrainConfig, WsicellConfig

        self.k, self.model_id = k, "m1"
        self.config = WsicellConfig(train=TrainConfig(categories=k, width=16))

    def generate_grid(self, rows, seed=0):
        return np.random.default_rng(seed).integers(0, 255, (rows, self.k, 32, 32, 3), np.uint8)


def test_report_summary_numbers_are_the_stores(tmp_path):
    """A report rendered from a small store (2 slides, k=4, cluster 3 empty): the summary's
    cells per slide, cells per cluster and cluster counts are the store's; proportions show
    as percentages; no PCA for 2 slides; the loss curves of the model directory are in."""
    import json
    import re

    from conftest import write_test_labels, write_test_slide

    from wsicell.analysis.proportions import proportion_tables, slide_proportions
    from wsicell.analysis.slide_classes import predict_slides
    from wsicell.io.store import (
        open_store,
        read_labels,
        slide_attrs,
        slide_cells,
    )
    from wsicell.viz.report import write_prediction_report

    k = 4
    root = open_store(tmp_path / "cells.zarr", mode="a")
    slides = {"s1": np.array([0, 0, 1, 2, 0, 1, 0]), "s2": np.array([2, 2, 1, 0, 2])}
    for slide_id, clusters in slides.items():
        write_test_slide(root, slide_id, tmp_path, len(clusters))
        write_test_labels(root, slide_id, "m1", np.eye(k)[clusters])
    model, config = _Model(k), _Model(k).config
    results = []
    for slide_id in slides:
        cells, attrs = slide_cells(root, slide_id), slide_attrs(root, slide_id)
        results.append(slide_proportions(slide_id, cells.x.to_numpy(), cells.y.to_numpy(),
                                         read_labels(root, slide_id, "m1")[0], k,
                                         (attrs["width"], attrs["height"]), attrs["mpp"], 20.0))
    predictions, summary, _ = predict_slides(proportion_tables(results)["slides"], k,
                                             config.predict, 0, None, None)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "log.jsonl").write_text("".join(json.dumps(
        {"iteration": i, "V": 1.0 / (i + 1), "L_D": -i, "L_G": i % 3, "L_Q": 2.0 / (i + 1),
         "time": i}) + "\n" for i in range(20)))
    out = tmp_path / "out"
    report = write_prediction_report(out, root, model, results, predictions, summary,
                                     {"store": "cells.zarr"}, per_cluster=20,
                                     model_dir=model_dir)
    page = report.read_text()
    shown = _summary_numbers(page)
    stored = {s: slide_attrs(root, s)["n_cells"] for s in slides}
    assert shown["slides"] == stored == {"s1": 7, "s2": 5}
    every = np.concatenate([read_labels(root, s, "m1")[0] for s in slides])
    assert shown["clusters"] == dict(enumerate(np.bincount(every, minlength=k).tolist()))
    assert shown["cards"] == {"slides": 2, "cells": 12, "clusters": k, "clusters-used": 3}
    assert "Cluster 3 holds no cell" in page
    assert "2 slides (s1, s2) have fewer than 100 cells (7, 5)" in page  # in plain words
    # percentages, not raw fractions: s1 has 4 of 7 cells in cluster 0
    assert f"{100 * 4 / 7:.1f}%" in page and "0.571428" not in page
    assert not (out / "report" / "slides_pca.png").exists() and "at least 3 slides" in page
    assert "distance to group centre" not in page  # 2 slides, 2 slide groups: hidden
    assert (out / "report" / "losses.png").exists() and 'alt="losses.png"' in page
    assert len(re.findall(r"<figure>", page)) == k and "no cell of these slides" in page
    assert 'alt="nucleus_areas.png"' in page and "refused as too large" in page
    for picture in (out / "report").glob("*.png"):
        assert not image_is_blank(picture), picture


def test_nuclei_table_gives_the_area_distribution_and_warns_of_tiny_objects(tmp_path):
    from conftest import write_test_slide

    from wsicell.io.store import open_store, write_cell_rows
    from wsicell.viz.report import nuclei_html

    root = open_store(tmp_path / "cells.zarr", mode="a")
    write_test_slide(root, "fine", tmp_path, 6)  # every nucleus 30.5 um2
    write_test_slide(root, "specks", tmp_path, 6)
    write_cell_rows(root.store.root, "specks", 0, {"area": np.array([4.0, 6, 8, 25, 30, 40])})
    table, areas, notes = nuclei_html(root, ["fine", "specks"])
    assert areas["specks"].tolist() == [4, 6, 8, 25, 30, 40]
    assert "<td>fine</td>" in table and "50.0%" in table  # half of the specks under 10 um2
    assert len(notes) == 1 and notes[0].startswith("50.0% of the nuclei of specks are smaller")
