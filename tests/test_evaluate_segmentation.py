"""``wsicell evaluate segmentation`` against instance masks, and images without nuclei in
both evaluations (they score zero and the run goes on)."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import TEST_DATA, shared_data_path
from PIL import Image

from wsicell.config import load_config
from wsicell.errors import WsicellError
from wsicell.pipeline.fields import evaluate_detection, evaluate_segmentation, preset_configs
from wsicell.segmentation.fov import segment_file

SAMPLE = TEST_DATA / "BM_GRAZ_HE_0001_01.png"
WSICELL = [sys.executable, "-m", "wsicell.cli.main"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """images/: a 240x200 real crop (at 0.4 um/px) and a blank white field; masks/: the
    crop's own `paper` segmentation as a 16-bit instance PNG, and one square nucleus on
    the blank field (8-bit)."""
    root = tmp_path_factory.mktemp("seg")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    Image.open(SAMPLE).crop((300, 300, 540, 500)).save(images / "field.png")
    Image.fromarray(np.full((64, 80, 3), 255, np.uint8)).save(images / "blank.png")
    labels = segment_file(images / "field.png", load_config(None, "paper"), 0.4).file_labels()
    assert labels.max() > 10
    cv2.imwrite(str(masks / "field.png"), (labels * 7).astype(np.uint16))  # ids not contiguous
    square = np.zeros((64, 80), np.uint8)
    square[20:30, 30:40] = 1
    cv2.imwrite(str(masks / "blank.png"), square)
    return root


def test_own_segmentation_scores_one_and_blank_image_zero(dataset):
    result = evaluate_segmentation(dataset / "images", dataset / "masks", ["paper"], 0.4,
                                   progress=False)
    assert result["radius_px"] == pytest.approx(7.5)  # 3 um at 0.4 um/px
    paper = result["presets"]["paper"]
    field, blank = paper["images"]["field"], paper["images"]["blank"]
    for key in ("iou", "f1", "aji", "dq", "sq", "pq"):
        assert field[key] == pytest.approx(1.0)
        assert blank[key] == 0.0
        assert paper[key] == pytest.approx(0.5)  # mean over the two images
    assert field["detection"]["f1"] == pytest.approx(1.0)
    assert blank["detection"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                  "true_positives": 0, "n_predicted": 0, "n_reference": 1}
    pooled = paper["detection"]
    assert pooled["n_reference"] == pooled["true_positives"] + 1


def test_cli_all_presets_json_and_table(dataset):
    args = ["evaluate", "segmentation", dataset / "images", "--masks", dataset / "masks",
            "--mpp", "0.4"]
    result = subprocess.run(WSICELL + [str(a) for a in args] + ["--preset", "all", "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    presets = json.loads(result.stdout)["presets"]
    assert {"paper", "sensitive", "tissue", "adaptive"} <= set(presets)
    assert all(0 <= p["aji"] <= 1 and p["images"]["blank"]["aji"] == 0 for p in presets.values())
    table = subprocess.run(WSICELL + [str(a) for a in args], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "AJI" in table.stdout and "overall" in table.stdout and "det F1" in table.stdout



def test_cli_evaluates_the_configurations_preset_by_default(dataset, tmp_path):
    """Without --preset, the default configuration's preset (adaptive), or a configuration
    file's."""
    args = [str(a) for a in ["evaluate", "segmentation", dataset / "images", "--masks",
                             dataset / "masks", "--mpp", "0.4", "--json"]]
    result = subprocess.run(WSICELL + args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)["presets"]) == ["adaptive"]
    config = tmp_path / "paper.json"
    config.write_text(json.dumps(load_config(None, "paper").to_json()))
    result = subprocess.run(WSICELL + args + ["--config", str(config)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)["presets"]) == ["paper"]


def test_the_default_preset_keeps_the_files_own_values(tmp_path):
    """Without a preset the file's segmentation section is evaluated as written; a named
    preset replaces it."""
    config = load_config(None, "paper").to_json()
    config["segmentation"]["hematoxylin_threshold"] = 99
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(config))
    own = preset_configs([None], path)
    assert own["paper"].segmentation.hematoxylin_threshold == 99
    assert preset_configs(["paper"], path)["paper"].segmentation.hematoxylin_threshold != 99


def _one_line_error(images, masks, match):
    with pytest.raises(WsicellError, match=match) as err:
        evaluate_segmentation(images, masks, ["paper"], 0.4, progress=False)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_masks_are_one_line_errors(dataset, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    (images / "field.png").write_bytes((dataset / "images" / "field.png").read_bytes())
    # a mask of another shape
    cv2.imwrite(str(masks / "field.png"), np.zeros((100, 100), np.uint16))
    message = _one_line_error(images, masks, "mask is 100x100 px, its image 240x200")
    assert str(masks / "field.png") in message
    # a colour mask is not an 8/16-bit integer instance map
    cv2.imwrite(str(masks / "field.png"), np.zeros((200, 240, 3), np.uint8))
    assert str(masks / "field.png") in _one_line_error(images, masks, "8- or 16-bit")
    # an image without a mask
    cv2.imwrite(str(masks / "field.png"), np.zeros((200, 240), np.uint8))
    Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(images / "other.png")
    assert str(images / "other.png") in _one_line_error(images, masks, "no instance mask")


def test_cli_bad_mask_without_traceback(dataset, tmp_path):
    cv2.imwrite(str(tmp_path / "field.png"), np.zeros((5, 5), np.uint16))
    cv2.imwrite(str(tmp_path / "blank.png"), np.zeros((64, 80), np.uint8))
    result = subprocess.run(WSICELL + ["evaluate", "segmentation", str(dataset / "images"),
                                       "--masks", str(tmp_path), "--mpp", "0.4"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "mask is 5x5 px" in result.stderr


def test_evaluate_detection_goes_on_past_an_image_without_nuclei(dataset, tmp_path):
    points = tmp_path / "points"
    points.mkdir()
    (points / "blank.csv").write_text("x,y\n35,25\n")
    (points / "field.csv").write_text("x,y\n10,10\n")
    result = evaluate_detection(dataset / "images", points, ["paper"], mpp=0.4,
                                progress=False)
    images = result["presets"]["paper"]["images"]
    assert images["blank"]["f1"] == 0.0 and images["blank"]["n_predicted"] == 0
    assert images["field"]["n_predicted"] > 10


@pytest.mark.slow
def test_adaptive_on_monuseg():
    root = shared_data_path("monuseg_train")
    presets = evaluate_segmentation(root / "images", root / "instances", ["paper", "adaptive"],
                                    0.25, progress=False)["presets"]
    assert len(presets["adaptive"]["images"]) == 13
    assert presets["adaptive"]["aji"] > 0.44 and presets["adaptive"]["pq"] > 0.38  # 0.452 / 0.396
    assert presets["adaptive"]["aji"] > presets["paper"]["aji"] + 0.1
    assert presets["adaptive"]["detection"]["f1"] > 0.75
