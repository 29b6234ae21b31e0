"""``wsicell ingest`` on bad input: one line, exit code 2, no slide visible as complete."""

import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import TEST_DATA, shared_data_path
from PIL import Image

from wsicell.io.store import open_store, store_lock

SLIDE = "BM_GRAZ_HE_0001_01"


def run_ingest(*args):
    return subprocess.run(
        [sys.executable, "-m", "wsicell.cli.main", "ingest", *map(str, args), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("wsicell: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def assert_no_slide_left(store):
    """A refused slide leaves no slide group, complete or not."""
    if store.exists():
        assert not list(open_store(store)["slides"].group_keys())


def _pyramid_without_mpp(path):
    image = np.asarray(Image.open(TEST_DATA / "bm_graz_pyramid.tif"))  # level 0 via Pillow
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), photometric="rgb", compression="jpeg")
        tif.write(image[::2, ::2], tile=(256, 256), photometric="rgb", compression="jpeg",
                  subfiletype=1)


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "no_tissue", "unstained",
                                  "no_mpp"])
def test_bad_slides(tmp_path, case):
    store = tmp_path / "cells.zarr"
    if case == "missing":
        slide, expect = tmp_path / "absent.svs", ["absent.svs", "no such file"]
    elif case == "truncated":
        data = shared_data_path("slides", "CMU-1-Small-Region.svs").read_bytes()
        slide, expect = tmp_path / "cut.svs", ["cut.svs", "not a readable slide"]
        slide.write_bytes(data[: len(data) // 2])
    elif case == "text":
        slide, expect = tmp_path / "notes.svs", ["notes.svs", "not a readable slide"]
        slide.write_text("patient list\n")
    elif case == "no_tissue":
        slide, expect = tmp_path / "glass.png", ["glass.png", "no tissue found"]
        Image.fromarray(np.full((900, 700, 3), 243, np.uint8)).save(slide)
    elif case == "unstained":  # tissue on the thumbnail, too pale to estimate a stain from
        slide, expect = tmp_path / "pale.png", ["pale.png", "too few stained pixels"]
        image = np.full((900, 700, 3), 243, np.uint8)
        image[150:750, 100:600] = (245, 215, 235)
        Image.fromarray(image).save(slide)
    else:
        slide, expect = tmp_path / "nompp.tif", ["nompp.tif", "without microns-per-pixel", "--mpp"]
        _pyramid_without_mpp(slide)
    assert_one_line_error(run_ingest(slide, "--store", store), *expect)
    assert_no_slide_left(store)


def test_store_path_that_is_a_file(tmp_path):
    store = tmp_path / "cells.zarr"
    store.write_text("not a store")
    assert_one_line_error(run_ingest(TEST_DATA / "bm_graz_pyramid.tif", "--store", store),
                          "cells.zarr", "is a file")
    assert store.read_text() == "not a store"


def test_a_second_ingest_into_a_locked_store_is_refused(tmp_path):
    store = tmp_path / "cells.zarr"
    open_store(store, mode="a")
    with store_lock(store):
        result = run_ingest(TEST_DATA / "bm_graz_pyramid.tif", "--store", store)
    assert_one_line_error(result, "another ingest is writing to this store")
    assert_no_slide_left(store)


def test_invalid_configuration_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"ingest": {"tile_size": -5}}')
    result = run_ingest(TEST_DATA / "bm_graz_pyramid.tif", "--store", tmp_path / "s.zarr",
                        "--config", config)
    assert_one_line_error(result, "config.json: invalid configuration", "tile_size")


def test_progress_in_a_log_has_no_cursor_escapes_and_counts_tiles_in_words(tmp_path):
    """stderr redirected to a file (a log): one bar, no cursor-up escapes from nested bars,
    '1 tissue tile' in the singular, the nucleus areas, the dashboard on this machine only."""
    result = subprocess.run(
        [sys.executable, "-m", "wsicell.cli.main", "ingest", str(TEST_DATA / f"{SLIDE}.png"),
         "--store", str(tmp_path / "s.zarr"), "--mpp", "0.4", "--workers", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "\x1b[A" not in result.stderr
    assert f"{SLIDE}: " in result.stderr and " cells from 1 tissue tile; " in result.stderr
    assert "nucleus area median" in result.stderr and "% under 10 um2" in result.stderr
    assert "Dask dashboard: http://127.0.0.1:" in result.stderr


def test_help_names_options_as_options():
    result = subprocess.run([sys.executable, "-m", "wsicell.cli.main", "ingest", "--help"],
                            capture_output=True, text=True, timeout=60)
    text = " ".join(result.stdout.split())
    assert "into the cell store --store" in text and "cell store STORE" not in text
