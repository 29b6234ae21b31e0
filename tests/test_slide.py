"""Slide reading: backends, microns per pixel, reference-grid reads, bad files."""

import warnings

import numpy as np
import pytest
import tifffile
from conftest import TEST_DATA, shared_data_path

from wsicell.errors import WsicellError
from wsicell.io import slide as slide_module
from wsicell.io.slide import (
    DecodedTiles,
    LargeImageSlide,
    ReferenceGrid,
    TiledPageReader,
    find_slide_files,
    open_slide,
    read_reference_region,
    resolve_mpp,
)

PYRAMID = TEST_DATA / "bm_graz_pyramid.tif"


def _tiled_read(slide, grid, tile):
    """The reference grid assembled from separate tile reads."""
    out = np.zeros((grid.height, grid.width, 3), np.uint8)
    for y in range(0, grid.height, tile):
        for x in range(0, grid.width, tile):
            w, h = min(tile, grid.width - x), min(tile, grid.height - y)
            out[y:y + h, x:x + w] = read_reference_region(slide, grid, x, y, w, h)
    return out


def test_aperio_slide_has_its_metadata():
    slide = open_slide(shared_data_path("slides", "CMU-1-Small-Region.svs"))
    assert (slide.backend, slide.width, slide.height) == ("openslide", 2220, 2967)
    assert slide.mpp == pytest.approx(0.499)


def test_vendored_pyramid_is_read_by_openslide_with_mpp():
    slide = open_slide(PYRAMID)
    assert slide.backend == "openslide"
    assert slide.mpp == pytest.approx(0.4)
    assert slide.level_count == 3 and slide.level_downsamples == [1.0, 2.0, 4.0]


def test_large_image_reads_the_same_pixels_as_openslide():
    path = shared_data_path("slides", "CMU-1-Small-Region.svs")
    openslide_slide, fallback = open_slide(path), LargeImageSlide(path)
    assert fallback.mpp == pytest.approx(0.499)
    assert (fallback.width, fallback.height) == (2220, 2967)
    window = (0, 300, 200, 333, 250)
    np.testing.assert_array_equal(fallback.read_level_region(*window),
                                  openslide_slide.read_level_region(*window))


@pytest.mark.parametrize("path", [
    PYRAMID, pytest.param("CMU-1-Small-Region.svs", id="aperio"), pytest.param("lzw", id="lzw"),
])
def test_tiles_decoded_directly_equal_openslide_reads(path, tmp_path):
    import openslide

    if path == "lzw":
        path = tmp_path / "lzw.tif"
        image = np.random.default_rng(0).integers(0, 256, (700, 900, 3), dtype=np.uint8)
        tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="lzw")
    elif path != PYRAMID:
        path = shared_data_path("slides", path)
    reference = openslide.OpenSlide(str(path))
    slide = open_slide(path)
    assert sorted(slide._tiled_levels) == list(range(reference.level_count))
    pages = [p for p in tifffile.TiffFile(path).pages if TiledPageReader.supports(p)]
    rng = np.random.default_rng(1)
    for level, (width, height) in enumerate(reference.level_dimensions):
        page = next(p for p in pages if (p.imagewidth, p.imagelength) == (width, height))
        reader = TiledPageReader(path, page)
        for _ in range(10):  # windows across tile borders and the page's ragged edge
            w, h = rng.integers(1, width + 1), rng.integers(1, height + 1)
            x, y = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            downsample = reference.level_downsamples[level]
            expected = np.asarray(reference.read_region(
                (round(x * downsample), round(y * downsample)), level, (w, h)).convert("RGB"))
            np.testing.assert_array_equal(reader.read(x, y, w, h), expected)
        reader.close()


def test_decoded_tiles_keep_the_most_recent_within_their_capacity():
    tiles = DecodedTiles(capacity=3 * 100)
    for key in "abc":
        tiles.put(key, np.zeros(100, np.uint8))
    assert tiles.get("a") is not None  # a is now the most recent
    tiles.put("d", np.zeros(100, np.uint8))
    assert tiles.get("b") is None and all(tiles.get(k) is not None for k in "acd")
    assert tiles.size == 300
    tiles.put("huge", np.zeros(301, np.uint8))  # larger than the whole cache: not kept
    assert tiles.get("huge") is None and tiles.size == 300


def test_overlapping_reads_decode_each_tile_once(monkeypatch):
    monkeypatch.setattr(slide_module, "DECODED_TILES", DecodedTiles(64 << 20))
    page = next(p for p in tifffile.TiffFile(PYRAMID).pages if TiledPageReader.supports(p))
    reader, fresh = TiledPageReader(PYRAMID, page), TiledPageReader(PYRAMID, page)
    decode, decoded = reader._decode, []

    def counting_decode(data, index, **kwargs):
        decoded.append(index)
        return decode(data, index, **kwargs)

    reader._decode = counting_decode
    side = reader.tile_width
    first = reader.read(side // 2, 0, side, side)  # two tiles
    second = reader.read(side // 2 + 7, 3, side, side - 3)  # the same two, from the cache
    assert sorted(decoded) == [0, 1]
    np.testing.assert_array_equal(second, fresh.read(side // 2 + 7, 3, side, side - 3))
    np.testing.assert_array_equal(first, fresh.read(side // 2, 0, side, side))
    with pytest.raises(ValueError):  # cached tiles cannot be changed through a read's result
        reader._tile(0)[0, 0] = 0
    reader.close()
    fresh.close()


def test_plain_image_without_mpp_is_taken_at_reference_with_warning():
    slide = open_slide(shared_data_path("bm_graz", "images", "BM_GRAZ_HE_0001_01.png"))
    assert slide.backend == "image" and slide.mpp is None
    with pytest.warns(UserWarning, match="reference resolution"):
        assert resolve_mpp(slide, None, 0.4) == 0.4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_mpp(slide, 0.5, 0.4) == 0.5


def test_pyramid_without_mpp_needs_override(tmp_path):
    path = tmp_path / "nompp.tif"
    image = np.full((512, 512, 3), 200, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), photometric="rgb", compression="jpeg")
        tif.write(image[::2, ::2], tile=(256, 256), photometric="rgb", compression="jpeg",
                  subfiletype=1)
    slide = open_slide(path)
    assert slide.level_count == 2 and slide.mpp is None
    with pytest.raises(WsicellError, match="pyramidal slide without microns-per-pixel"):
        resolve_mpp(slide, None, 0.4)
    assert resolve_mpp(slide, 0.25, 0.4) == 0.25


@pytest.mark.parametrize("slide_mpp", [0.4, 0.2, 0.13])
def test_tiles_of_the_reference_grid_equal_a_whole_read(slide_mpp):
    slide = open_slide(PYRAMID)
    grid = ReferenceGrid.of(slide, slide_mpp, 0.4)
    assert grid.width == int(2048 * slide_mpp / 0.4 + 1e-9)
    whole = read_reference_region(slide, grid, 0, 0, grid.width, grid.height)
    np.testing.assert_array_equal(_tiled_read(slide, grid, 160), whole)


def test_upsampled_aperio_tiles_equal_a_whole_read():
    slide = open_slide(shared_data_path("slides", "CMU-1-Small-Region.svs"))
    grid = ReferenceGrid.of(slide, slide.mpp, 0.4)
    assert (grid.width, grid.height) == (2769, 3701)
    region = (600, 900, 700, 500)
    whole = read_reference_region(slide, grid, *region)
    out = np.zeros_like(whole)
    for dy in range(0, 500, 128):
        for dx in range(0, 700, 128):
            w, h = min(128, 700 - dx), min(128, 500 - dy)
            out[dy:dy + h, dx:dx + w] = read_reference_region(slide, grid, 600 + dx, 900 + dy, w, h)
    np.testing.assert_array_equal(out, whole)
    # a reference pixel samples the level-0 pixel under its centre
    level0 = slide.read_level_region(0, 0, 0, slide.width, slide.height)
    x0, y0 = grid.to_level0(np.array([1000.0, 1200.0]))
    assert np.abs(read_reference_region(slide, grid, 1000, 1200, 1, 1)[0, 0].astype(int)
                  - level0[round(y0), round(x0)].astype(int)).max() < 40


def test_reads_outside_the_slide_are_white():
    slide = open_slide(PYRAMID)
    region = slide.read_level_region(0, 2000, -10, 100, 20)
    assert (region[:10] == 255).all() and (region[:, 48:] == 255).all()


def test_bad_files_raise_one_line_errors(tmp_path):
    with pytest.raises(WsicellError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    with pytest.raises(WsicellError, match="notes.svs: not a readable slide"):
        open_slide(text)
    with pytest.raises(WsicellError, match="not a file"):
        open_slide(tmp_path)


def test_truncated_slide_fails_at_open_or_read(tmp_path):
    source = shared_data_path("slides", "CMU-1-Small-Region.svs").read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(source[: len(source) // 2])
    with pytest.raises(WsicellError, match="truncated.svs"):
        slide = open_slide(truncated)
        slide.read_level_region(0, 0, 0, slide.width, slide.height)


def test_directories_expand_to_their_slides(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(b"x")
    (tmp_path / "readme.txt").write_text("x")
    assert find_slide_files([tmp_path]) == [tmp_path / "a.svs", tmp_path / "sub" / "b.png"]
    with pytest.raises(WsicellError, match="no such file or directory"):
        find_slide_files([tmp_path / "nope"])
