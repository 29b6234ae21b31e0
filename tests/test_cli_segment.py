"""``wsicell segment`` and ``wsicell evaluate detection`` through the real console script."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import TEST_DATA, shared_data_path
from PIL import Image

SAMPLE = TEST_DATA / "BM_GRAZ_HE_0001_01.png"
WSICELL = [sys.executable, "-m", "wsicell.cli.main"]


def run(*args, cwd=None):
    return subprocess.run(WSICELL + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def crop_png(tmp_path_factory):
    """A 300x300 real crop of the sample, small enough for quick CLI runs."""
    path = tmp_path_factory.mktemp("img") / "field.png"
    Image.open(SAMPLE).crop((300, 300, 600, 600)).save(path)
    return path


def test_segment_writes_crops_table_and_pictures(tmp_path, crop_png):
    result = run("segment", crop_png, "--out", tmp_path / "out", "--no-progress")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "out" / "field"
    table = pd.read_csv(folder / "cells.csv")
    crops = np.load(folder / "crops.npy")
    assert len(table) == len(crops) > 10
    assert crops.shape[1:] == (32, 32, 3)
    assert table["x"].between(0, 300).all() and table["y"].between(0, 300).all()
    overlay = np.asarray(Image.open(folder / "overlay.png"))
    assert overlay.shape == (300, 300, 3)
    assert ((overlay == [0, 200, 0]).all(axis=2)).sum() > 100  # outlines drawn
    run_info = json.loads((folder / "run.json").read_text())
    assert run_info["config"]["segmentation"]["preset"] == "adaptive"
    assert run_info["n_cells"] == len(table)
    labels = cv2.imread(str(folder / "labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (300, 300) and labels.dtype == np.uint16
    assert labels.max() == len(table)  # label i is the row of cell_id i - 1
    rows, cols = np.nonzero(labels == 1)
    assert abs(cols.mean() - table.x[0]) < 1 and abs(rows.mean() - table.y[0]) < 1


def test_segment_writes_labels_at_the_files_resolution(tmp_path, crop_png):
    result = run("segment", crop_png, "--out", tmp_path / "out", "--mpp", "0.25",
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "out" / "field"
    labels = cv2.imread(str(folder / "labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (300, 300)  # segmented at 0.25 um/px, crops on the 0.4 grid
    assert labels.max() == len(pd.read_csv(folder / "cells.csv")) > 10
    assert np.asarray(Image.open(folder / "overlay.png")).shape == (187, 187, 3)  # 0.4 um/px


def test_grayscale_and_rgba_are_handled(tmp_path, crop_png):
    rgb = np.asarray(Image.open(crop_png))
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:50, :50, 3] = 0  # transparent corner becomes white background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    for name in ("gray", "rgba"):
        result = run("segment", tmp_path / f"{name}.png", "--out", tmp_path / "out", "--no-progress")
        assert result.returncode == 0, result.stderr
        assert len(pd.read_csv(tmp_path / "out" / name / "cells.csv")) > 0
    rgba_table = pd.read_csv(tmp_path / "out" / "rgba" / "cells.csv")
    rgb_result = run("segment", crop_png, "--out", tmp_path / "out2", "--no-progress")
    assert rgb_result.returncode == 0
    assert abs(len(rgba_table) - len(pd.read_csv(tmp_path / "out2" / "field" / "cells.csv"))) <= 3


@pytest.mark.parametrize("case", ["missing", "not_an_image", "truncated", "blank"])
def test_bad_input_gives_one_line_error(tmp_path, case):
    path = tmp_path / f"{case}.png"
    if case == "not_an_image":
        path.write_text("this is not a PNG\n")
    elif case == "truncated":
        path.write_bytes(SAMPLE.read_bytes()[:20000])
    elif case == "blank":
        Image.fromarray(np.full((200, 200, 3), 250, np.uint8)).save(path)
    out = tmp_path / "out"
    result = run("segment", path, "--out", out, "--no-progress")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("wsicell: error")]
    assert len(lines) == 1 and str(path) in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / case).exists()  # nothing half-written


def test_output_path_that_is_a_file(tmp_path, crop_png):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = run("segment", crop_png, "--out", target, "--no-progress")
    assert result.returncode == 2 and "not a directory" in result.stderr


def test_evaluate_detection_json(tmp_path):
    images, dots = tmp_path / "images", tmp_path / "dots"
    images.mkdir()
    dots.mkdir()
    Image.open(SAMPLE).crop((0, 0, 400, 400)).save(images / "a.png")
    Image.open(SAMPLE).crop((0, 0, 200, 200)).save(images / "no_points.png")
    points = pd.read_csv(TEST_DATA / "bm_graz" / "dots" / "BM_GRAZ_HE_0001_01.csv")
    points[(points.x < 400) & (points.y < 400)].to_csv(dots / "a.csv", index=False)
    result = run("evaluate", "detection", images, "--points", dots, "--preset", "all", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for name in ("paper", "sensitive"):
        assert set(figures["presets"][name]) >= {"precision", "recall", "f1"}
        assert list(figures["presets"][name]["images"]) == ["a"]
        assert 0.5 < figures["presets"][name]["f1"] <= 1


@pytest.mark.slow
def test_evaluate_detection_on_all_bm_graz():
    images = shared_data_path("bm_graz", "images")
    result = run("evaluate", "detection", images, "--points", images.parent / "dots",
                 "--preset", "all", "--json")
    assert result.returncode == 0, result.stderr
    presets = json.loads(result.stdout)["presets"]
    assert len(presets["paper"]["images"]) == 8
    assert presets["sensitive"]["f1"] >= 0.80
    assert presets["sensitive"]["f1"] > presets["paper"]["f1"]
