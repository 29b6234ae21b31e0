"""Ingest through a real LocalCluster (2 worker processes) into one store of two slides."""

import json
import multiprocessing
from pathlib import Path

import dask
import numpy as np
import pytest
from conftest import TEST_DATA, shared_data_path
from PIL import Image
from scipy.spatial import cKDTree

from wsicell.config import AdaptiveConfig, IngestConfig, WsicellConfig
from wsicell.io.slide import (
    ReferenceGrid,
    open_slide,
    read_reference_region,
    read_rgb_image,
)
from wsicell.io.store import (
    complete_slides,
    open_store,
    slide_cells,
    slide_crops,
    validate_store,
)
from wsicell.pipeline.cluster import LOCAL_CLUSTER_POLLING, local_cluster
from wsicell.pipeline.ingest import ingest
from wsicell.pipeline.tiles import (
    cell_blocks,
    plan_slide,
    segment_objects,
    shared_lookup_blocks,
)
from wsicell.segmentation.stain import (
    StainLookup,
    StainParameters,
    fit_stain_parameters,
)

TILED = WsicellConfig(ingest=IngestConfig(tile_size=512, crops_per_chunk=128,
                                          cells_per_chunk=512, stain_sample_tiles=6))
# The mesh test judges a component longer than the halo on the part a tile's window holds,
# the one exception to "tiles give the whole image's cells": off here, where that is tested
# exactly, and bounded with it on (test_meshes_cut_by_tiles_change_few_cells).
CONFIG = TILED.with_options(segmentation={"adaptive": AdaptiveConfig(
    mesh_area_rel=0).model_dump()})
PYRAMID = TEST_DATA / "bm_graz_pyramid.tif"
PLAIN = TEST_DATA / "BM_GRAZ_HE_0001_01.png"  # the pyramid's level 0, before JPEG


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    aperio = shared_data_path("slides", "CMU-1-Small-Region.svs")
    path = tmp_path_factory.mktemp("ingest") / "cells.zarr"
    eosin_only = path.parent / "eosin_only.png"  # tissue without a single nucleus
    pink = np.array([235, 150, 200]) + np.random.default_rng(0).normal(0, 8, (500, 600, 3))
    Image.fromarray(pink.clip(0, 255).astype(np.uint8)).save(eosin_only)
    with pytest.warns(UserWarning, match="no microns-per-pixel metadata"):
        ids = ingest(path, [aperio, PYRAMID, PLAIN, eosin_only], CONFIG, workers=2,
                     progress=False)
    assert ids == ["CMU-1-Small-Region", "bm_graz_pyramid", "BM_GRAZ_HE_0001_01", "eosin_only"]
    return path


def test_store_is_complete_and_valid(store):
    assert validate_store(store) == []
    root = open_store(store)
    assert complete_slides(root) == ["BM_GRAZ_HE_0001_01", "CMU-1-Small-Region",
                                     "bm_graz_pyramid", "eosin_only"]
    attrs = root["slides/CMU-1-Small-Region"].attrs
    assert attrs["mpp"] == pytest.approx(0.499) and attrs["mpp_source"] == "metadata"
    assert (attrs["width"], attrs["height"], attrs["backend"]) == (2220, 2967, "openslide")
    assert attrs["config"] == CONFIG.to_json()
    assert not store.with_name("cells.zarr.staging").exists()
    plain = root["slides/BM_GRAZ_HE_0001_01"].attrs
    assert (plain["backend"], plain["mpp_source"], plain["mpp"]) == ("image", "assumed", 0.4)
    # the same tissue as the pyramid's, without the JPEG tiles: about the same nuclei
    n_plain, n_pyramid = plain["n_cells"], root["slides/bm_graz_pyramid"].attrs["n_cells"]
    assert abs(n_plain - n_pyramid) <= 0.1 * n_pyramid
    # stain noise on tissue without a nucleus: a few specks (~2,000 objects without the
    # adaptive recipe's min_peak_contrast)
    assert len(slide_cells(root, "eosin_only")) <= 20
    assert slide_crops(root, "eosin_only").shape == (len(slide_cells(root, "eosin_only")),
                                                     32, 32, 3)


def test_cells_lie_on_the_slide_and_in_their_tiles(store):
    root = open_store(store)
    cells = slide_cells(root, "CMU-1-Small-Region")
    assert len(cells) > 300
    np.testing.assert_array_equal(cells.cell_id, np.arange(len(cells)))
    assert cells.x.between(0, 2220).all() and cells.y.between(0, 2967).all()
    assert (cells.bbox_x0 <= cells.x).all() and (cells.x <= cells.bbox_x1).all()
    tiles = root["slides/CMU-1-Small-Region/tiles"]
    manifest = {int(t): (x0, y0, x1, y1) for t, x0, y0, x1, y1 in zip(
        *(tiles[c][:] for c in ("tile_id", "x0", "y0", "x1", "y1")))}
    x0, y0, x1, y1 = np.array([manifest[t] for t in cells.tile_id]).T
    # owner = tile holding the centroid (tile edges are rounded to level-0 pixels)
    assert ((cells.x >= x0 - 1) & (cells.x < x1 + 1)).all()
    assert ((cells.y >= y0 - 1) & (cells.y < y1 + 1)).all()
    assert np.all(np.diff(cells.tile_id) >= 0)
    crops = slide_crops(root, "CMU-1-Small-Region")
    assert crops.shape == (len(cells), 32, 32, 3) and crops.chunks[0] == 128
    sample = crops[:50]
    assert (sample[:, 16, 16] < 250).any(axis=-1).mean() > 0.8  # the nucleus is in the centre
    assert root["slides/CMU-1-Small-Region/tiles/n_cells"][:].sum() == len(cells)
    assert root["slides/CMU-1-Small-Region/tissue_mask"][:].any()


def _whole_image_nuclei(root, store, slide_id: str, path, config: WsicellConfig):
    """The nuclei of the whole image under a slide's recorded stain and calibration, those
    whose centroid lies in a processed tile's tissue region: level-0 centroids (M, 2) and
    areas (M,) in reference px."""
    attrs = root[f"slides/{slide_id}"].attrs
    slide = open_slide(path)
    grid = ReferenceGrid.of(slide, attrs["mpp"], config.segmentation.reference_mpp)
    whole = read_reference_region(slide, grid, 0, 0, grid.width, grid.height)
    stain = StainParameters.from_json(attrs["stain"])
    normalised = stain.normalise(whole)
    nuclei, _ = segment_objects(stain.hematoxylin(normalised), config, attrs["calibration"],
                                stain.eosin(normalised), attrs["mpp"])
    # the whole image has nuclei on glass too: keep those whose centroid is in the tissue
    # region of a processed tile (reference px, as ingest plans them)
    _, _, _, _, tiles = plan_slide(path, store, config, None)
    regions = tiles["region"]
    assert len(regions) == root[f"slides/{slide_id}/tiles/tile_id"].shape[0]
    x, y = nuclei.x[:, None], nuclei.y[:, None]
    inside = ((x >= regions[:, 0]) & (x < regions[:, 2])
              & (y >= regions[:, 1]) & (y < regions[:, 3])).any(axis=1)
    centroids = np.stack([grid.to_level0(nuclei.x), grid.to_level0(nuclei.y)], axis=1)
    return centroids[inside], nuclei.area[inside]


@pytest.mark.parametrize("slide_id, path", [
    ("bm_graz_pyramid", PYRAMID),
    ("CMU-1-Small-Region", None),
])
def test_tiled_ingest_equals_whole_image_segmentation(store, slide_id, path):
    path = path or shared_data_path("slides", "CMU-1-Small-Region.svs")
    root = open_store(store)
    expected, area = _whole_image_nuclei(root, store, slide_id, path, CONFIG)
    cells = slide_cells(root, slide_id)
    found = cells[["x", "y"]].to_numpy()
    assert len(found) == len(expected) > 100
    distance, _ = cKDTree(expected).query(found)
    assert distance.max() <= 1.0
    np.testing.assert_allclose(np.sort(cells.area), np.sort(
        area * CONFIG.segmentation.reference_mpp ** 2), rtol=1e-5)


def test_meshes_cut_by_tiles_change_few_cells(tmp_path):
    """With the default mesh test, small tiles (512 px) keep the whole image's cells but
    for pieces of keratin meshes longer than the halo, judged on what each window holds."""
    path = shared_data_path("slides", "CMU-1-Small-Region.svs")
    store = tmp_path / "mesh.zarr"
    (slide_id,) = ingest(store, [path], TILED, workers=2, progress=False)
    root = open_store(store)
    expected, _ = _whole_image_nuclei(root, store, slide_id, path, TILED)
    found = slide_cells(root, slide_id)[["x", "y"]].to_numpy()
    assert abs(len(found) - len(expected)) <= 0.02 * len(expected)
    distance, _ = cKDTree(expected).query(found)
    assert (distance <= 1.0).mean() >= 0.98


def test_rerun_skips_complete_slides(store):
    before = open_store(store)["slides/bm_graz_pyramid/cells/x"][:]
    assert ingest(store, [PYRAMID], CONFIG, progress=False) == ["bm_graz_pyramid"]
    np.testing.assert_array_equal(open_store(store)["slides/bm_graz_pyramid/cells/x"][:], before)


def test_cell_blocks_cover_every_cell_once_in_chunk_aligned_blocks():
    counts, tile_ids = np.array([3, 0, 7, 2, 9]), np.array([4, 5, 9, 10, 11])
    blocks = list(cell_blocks(counts, tile_ids, block=4))
    assert [start for start, _ in blocks] == [0, 4, 8, 12, 16, 20]
    rows = [(t, r) for _, pieces in blocks for t, a, b in pieces for r in range(a, b)]
    assert rows == [(t, r) for t, n in zip(tile_ids, counts) for r in range(n)]
    assert all(sum(b - a for _, a, b in pieces) == 4 for _, pieces in blocks[:-1])



@pytest.fixture(scope="module")
def stain_json():
    rgb = read_rgb_image(TEST_DATA / "BM_GRAZ_HE_0001_01.png")[:400, :400]
    return json.dumps(fit_stain_parameters(rgb).to_json(), sort_keys=True)


def _shared_lookup(directory, stain_json, wait_s=10.0):
    params = StainParameters.from_json(json.loads(stain_json))
    lookup = StainLookup.from_blocks(shared_lookup_blocks(Path(directory), params, wait_s))
    return lookup.colour_table, lookup.stain_table


def test_a_slide_through_the_lookup_gives_the_cells_computed_directly(tmp_path, monkeypatch,
                                                                      caplog):
    """Slides with much tissue go through a StainLookup that every worker builds while the
    client calibrates; the cells and crops are those of the colours computed directly.
    Each slide's ingest logs the wall time of its phases."""
    from wsicell.pipeline import tiles

    stores = {}
    for lookup in (True, False):
        monkeypatch.setattr(tiles, "LOOKUP_MIN_PIXELS", 0 if lookup else 1 << 62)
        stores[lookup] = tmp_path / f"lookup_{lookup}.zarr"
        with pytest.warns(UserWarning, match="no microns-per-pixel metadata"), \
                caplog.at_level("INFO", logger="wsicell.pipeline.ingest"):
            ingest(stores[lookup], [PLAIN], CONFIG, workers=2, progress=False)
    logged = [r.phases for r in caplog.records if hasattr(r, "phases")]
    assert len(logged) == 2
    for phases in logged:
        assert list(phases) == ["plan", "stain", "calibration", "segmentation", "writing"]
        assert all(seconds >= 0 for seconds in phases.values())
    with_lookup, direct = (open_store(stores[k]) for k in (True, False))
    cells = slide_cells(with_lookup, PLAIN.stem)
    assert len(cells) > 100
    assert cells.equals(slide_cells(direct, PLAIN.stem))
    crops = (np.asarray(root[f"slides/{PLAIN.stem}/crops"][:]) for root in (with_lookup, direct))
    np.testing.assert_array_equal(*crops)


def test_workers_share_the_lookup_build(tmp_path, stain_json):
    expected = StainLookup.build(StainParameters.from_json(json.loads(stain_json)))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        tables = pool.starmap(_shared_lookup, [(tmp_path, stain_json)] * 2)
    for colours, stains in tables:
        np.testing.assert_array_equal(colours, expected.colour_table)
        np.testing.assert_array_equal(stains, expected.stain_table)
    assert len(list(tmp_path.glob("*.npy"))) == StainLookup.N_BLOCKS  # each block built once
    # a later worker only loads the published blocks
    colours, stains = _shared_lookup(tmp_path, stain_json)
    np.testing.assert_array_equal(stains, expected.stain_table)


def test_a_block_whose_claimer_died_is_built_by_the_waiting_worker(tmp_path, stain_json):
    (tmp_path / "03.claim").touch()  # claimed, never published
    colours, stains = _shared_lookup(tmp_path, stain_json, wait_s=0.05)
    expected = StainLookup.build(StainParameters.from_json(json.loads(stain_json)))
    np.testing.assert_array_equal(colours, expected.colour_table)
    np.testing.assert_array_equal(stains, expected.stain_table)
    assert not (tmp_path / "03.npy").exists()


def test_a_block_of_an_older_layout_is_rebuilt(tmp_path, stain_json):
    (tmp_path / "05.claim").touch()  # hematoxylin only: (BLOCK, 5), before eosin was tabulated
    np.save(tmp_path / "05.npy", np.zeros((StainLookup.BLOCK, 5), dtype=np.uint8))
    colours, stains = _shared_lookup(tmp_path, stain_json, wait_s=0.05)
    expected = StainLookup.build(StainParameters.from_json(json.loads(stain_json)))
    np.testing.assert_array_equal(colours, expected.colour_table)
    np.testing.assert_array_equal(stains, expected.stain_table)


def test_embedded_cluster_workers_poll_less():
    from distributed import Client

    with local_cluster(1, 1, "1GB") as cluster, Client(cluster) as client:
        seen = client.run(lambda: {key: dask.config.get(key) for key in LOCAL_CLUSTER_POLLING})
    assert list(seen.values()) == [LOCAL_CLUSTER_POLLING]


def test_shared_stain_fits_one_stain_for_all_the_images_of_a_run(tmp_path):
    """Two patches of different colour: ingested apart each gets its own stain fit; with
    ``ingest.shared_stain`` both get the same one, fitted on both, recorded with the
    configuration; a file that cannot be read is reported and the others still ingest."""
    from wsicell.io.store import slide_attrs

    rgb = read_rgb_image(PLAIN)
    bluish = rgb[:384, :384]
    reddish = (rgb[-384:, -384:] * np.array([1.0, 0.85, 0.9])).astype(np.uint8)
    paths = [tmp_path / "bluish.png", tmp_path / "reddish.png"]
    for path, image in zip(paths, (bluish, reddish)):
        Image.fromarray(image).save(path)
    (tmp_path / "broken.png").write_bytes(b"not an image")

    def stains(store, config, files):
        try:
            ingest(store, files, config, mpp=0.4, workers=1, progress=False)
        except Exception as err:  # the broken file: the run reports it at the end
            assert "1 of 3 slides failed" in str(err)
        root = open_store(store)
        return [slide_attrs(root, p.stem)["stain"] for p in paths], root

    own, _ = stains(tmp_path / "own.zarr", CONFIG, paths)
    shared_config = CONFIG.with_options(ingest={"shared_stain": True})
    with pytest.warns(UserWarning, match="broken.png"):
        shared, root = stains(tmp_path / "shared.zarr", shared_config,
                              [*paths, tmp_path / "broken.png"])
    assert own[0] != own[1]
    assert shared[0] == shared[1]
    assert shared[0] not in own
    # the shared fit lies between the two images' own: its source colour statistics
    means = [np.array(s["source_lab_mean"]) for s in (*own, shared[0])]
    assert np.all(np.minimum(means[0], means[1]) - 1e-6 <= means[2])
    assert np.all(means[2] <= np.maximum(means[0], means[1]) + 1e-6)
    assert complete_slides(root) == ["bluish", "reddish"]
    assert slide_attrs(root, "bluish")["config"]["ingest"]["shared_stain"] is True
