"""Whole-slide ingest with the self-calibrating ``adaptive`` recipe: one calibration per
slide, recorded in the store; tiles give the cells the whole image gives."""

import numpy as np
import pytest
from conftest import TEST_DATA, shared_data_path
from scipy.spatial import cKDTree

from wsicell.config import IngestConfig, WsicellConfig
from wsicell.io.slide import read_rgb_image
from wsicell.io.store import open_store, slide_attrs, slide_cells, validate_store
from wsicell.pipeline.ingest import ingest
from wsicell.pipeline.tiles import segment_objects
from wsicell.segmentation.stain import StainParameters

IMAGE = TEST_DATA / "BM_GRAZ_HE_0001_01.png"  # 1200 x 1200 px at 0.4 um/px


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    config = WsicellConfig(ingest=IngestConfig(tile_size=256, stain_sample_tiles=6,
                                               crops_per_chunk=128)).with_options("adaptive")
    path = tmp_path_factory.mktemp("adaptive") / "cells.zarr"
    assert ingest(path, [IMAGE], config, mpp=0.4, workers=2, progress=False) == [IMAGE.stem]
    return path, config


def test_the_slide_calibration_is_recorded_with_the_stain(tiled):
    path, _ = tiled
    assert validate_store(path) == []
    attrs = slide_attrs(open_store(path), IMAGE.stem)
    assert attrs["config"]["segmentation"]["preset"] == "adaptive"
    calibration = attrs["calibration"]
    assert 0 < calibration["threshold"] < 1 and 1.0 <= calibration["radius_um"] <= 4.0
    assert calibration["core_threshold"] == 0  # tissue: the slide has a hematoxylin mode
    assert attrs["n_refused"] >= 0 and attrs["n_tiles"] >= 20  # tissue tiles of the 5 x 5


def test_tiles_give_the_cells_of_the_whole_image(tiled):
    path, config = tiled
    root = open_store(path)
    attrs = slide_attrs(root, IMAGE.stem)
    rgb = read_rgb_image(IMAGE)
    stain = StainParameters.from_json(attrs["stain"])
    normalised = stain.normalise(rgb)
    whole, refused = segment_objects(stain.hematoxylin(normalised), config,
                                     attrs["calibration"], stain.eosin(normalised))
    cells = slide_cells(root, IMAGE.stem)
    tiles = root[f"slides/{IMAGE.stem}/tiles"]
    regions = np.column_stack([tiles[c][:] for c in ("x0", "y0", "x1", "y1")])
    # the whole image's nuclei in the tissue regions the tiles cover (reference = level 0)
    xy = np.column_stack([whole.x, whole.y])
    covered = ((xy[:, None, :] >= regions[None, :, :2])
               & (xy[:, None, :] < regions[None, :, 2:])).all(axis=2).any(axis=1)
    assert len(cells) > 500 and len(cells) == covered.sum()
    distance, nearest = cKDTree(xy[covered]).query(cells[["x", "y"]].to_numpy())
    assert distance.max() <= 1.0 and len(np.unique(nearest)) == len(cells)
    np.testing.assert_allclose(cells.area, whole.area[covered][nearest] * 0.16, rtol=1e-6)
    assert attrs["n_refused"] <= len(refused)


def test_a_small_patch_is_ingested(tmp_path):
    """A 328 x 328 px breast patch at 0.5 um/px is all tissue candidates (its 10 x 10 px
    thumbnail found no tissue)."""
    from PIL import Image

    source = shared_data_path("brca_m2c", "images",
                              "TCGA-A8-A0AD-01Z-00-DX1_23501_19001_1000_1000_0.93.png")
    patch = tmp_path / "patch.png"
    Image.fromarray(read_rgb_image(source)[:328, :328]).save(patch)
    path = tmp_path / "cells.zarr"
    assert ingest(path, [patch], WsicellConfig(), mpp=0.5, workers=1,
                  progress=False) == ["patch"]
    assert validate_store(path) == []
    assert len(slide_cells(open_store(path), "patch")) > 20


def test_cmu1_ingested_has_no_object_under_10_um2(tmp_path):
    # a 20x slide (0.499 um/px) segmented at 0.4 um/px: min_source_px (40 of its pixels)
    slide = shared_data_path("slides", "CMU-1-Small-Region.svs")
    config = WsicellConfig().with_options("adaptive")
    path = tmp_path / "cells.zarr"
    assert ingest(path, [slide], config, workers=1, progress=False) == [slide.stem]
    area = slide_cells(open_store(path), slide.stem).area.to_numpy()
    assert len(area) > 2000 and area.min() >= 10 - 1e-3
