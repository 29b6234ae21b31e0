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
