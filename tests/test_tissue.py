"""Tissue detection on thumbnails and per-tile tissue fractions."""

import numpy as np
from conftest import TEST_DATA

from wsicell.io.slide import open_slide
from wsicell.segmentation.tissue import (
    detect_tissue,
    stained_pixels,
    tile_tissue_fractions,
    tissue_boxes,
)


def test_tissue_is_found_on_the_stained_piece_only():
    slide = open_slide(TEST_DATA / "bm_graz_pyramid.tif")  # 1200x1200 H&E at (0,0) of 2048x1536
    mask = detect_tissue(slide.thumbnail(128, 96))
    piece = mask[:73, :73]
    assert piece.mean() > 0.5  # bone marrow with fat cells (white holes at the border)
    assert not mask[:, 78:].any() and not mask[78:, :].any()


def test_empty_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = (rng.normal(242, 3, size=(80, 120, 3))).clip(0, 255).astype(np.uint8)
    glass[10:20, 10:20] = 120  # a grey smudge is not stained tissue
    assert not detect_tissue(glass).any()


def test_dust_is_removed_and_holes_filled():
    image = np.full((100, 100, 3), 245, np.uint8)
    image[20:70, 20:70] = (180, 90, 160)  # stained tissue
    image[40:50, 40:50] = 245  # a hole inside it
    image[90:92, 90:92] = (180, 90, 160)  # 4-pixel speck
    mask = detect_tissue(image, min_object_px=16)
    assert mask[20:70, 20:70].all()
    assert mask.sum() == 50 * 50


def test_tile_fractions_use_the_mask_under_each_tile():
    mask = np.zeros((10, 20), bool)
    mask[:, :5] = True
    boxes = np.array([[0, 0, 100, 100], [100, 0, 200, 100], [0, 0, 200, 100]])
    fractions = tile_tissue_fractions(mask, boxes, tile_to_mask=0.1)  # 10 tile px per mask px
    np.testing.assert_allclose(fractions, [0.5, 0.0, 0.25])


def test_stained_pixels_exclude_glass_and_keep_pale_eosin():
    pixels = np.array([[242, 242, 240], [255, 255, 255], [225, 185, 215], [90, 60, 140]], np.uint8)
    np.testing.assert_array_equal(stained_pixels(pixels), [False, False, True, True])


def test_tissue_boxes_hug_the_tissue_of_each_tile():
    mask = np.zeros((8, 8), bool)
    mask[1:3, 2:4] = True  # tissue in the top-left tile only, mask px 2..3 x 1..2
    tiles = np.array([[0, 0, 40, 40], [40, 0, 80, 40], [0, 40, 80, 80]])
    boxes = tissue_boxes(mask, tiles, tile_to_mask=0.1)  # 10 tile px per mask px
    # grown by one mask pixel on each side, clipped to the tile
    np.testing.assert_array_equal(boxes[0], [10, 0, 40, 40])
    # tiles without tissue keep their whole box
    np.testing.assert_array_equal(boxes[1:], tiles[1:])
    assert tissue_boxes(mask, tiles[:0], 0.1).shape == (0, 4)


def test_a_small_field_is_all_tissue_candidates_unless_blank():
    from wsicell.segmentation.tissue import small_field_tissue

    field = np.full((328, 328, 3), 243, np.uint8)
    assert not small_field_tissue(field).any()
    field[100:200, 50:90] = (160, 80, 150)  # 4% stained
    assert small_field_tissue(field).all()
