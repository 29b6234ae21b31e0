"""The one configuration object: validation, presets, and its JSON Schema file."""

import json
import subprocess
import sys
from importlib.resources import files

import jsonschema
import pytest

from wsicell.config import WsicellConfig, config_schema, load_config
from wsicell.errors import WsicellError


def test_schema_file_is_up_to_date():
    on_disk = json.loads(files("wsicell.schemas").joinpath("config.schema.json").read_text())
    assert on_disk == config_schema(), "run: python -m wsicell.config"


def test_defaults_validate_against_schema():
    jsonschema.validate(WsicellConfig().to_json(), config_schema())


def test_paper_defaults():
    config = WsicellConfig()
    assert config.stain.target_lab_mean == (8.98, 0.08, 0.02)
    assert config.segmentation.hematoxylin_threshold == 120
    assert config.segmentation.min_area_px == 200
    assert config.segmentation.opening_size_px == 7
    assert config.train.categories == 5 and config.train.noise_dim == 32


def test_partial_file_takes_defaults_and_preset_applies(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"segmentation": {"hematoxylin_threshold": 100}}))
    assert load_config(path).segmentation.hematoxylin_threshold == 100
    assert load_config(path, "sensitive").segmentation.min_area_px == 100


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON configuration"),
    ('{"segmentation": {"hematoxylin_threshold": 999}}', "segmentation.hematoxylin_threshold"),
    ('{"segmentation": {"unknown_field": 1}}', "segmentation.unknown_field"),
])
def test_bad_config_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(WsicellError, match=message):
        load_config(path)


def test_unknown_preset_and_missing_file():
    with pytest.raises(WsicellError, match="unknown segmentation preset"):
        load_config(preset="nope")
    with pytest.raises(WsicellError, match="no such file"):
        load_config("/nonexistent/config.json")


def test_cli_reports_bad_config_without_traceback(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[1, 2")
    result = subprocess.run([sys.executable, "-m", "wsicell.cli.main", "segment", "x.png",
                             "--out", str(tmp_path), "--config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("wsicell: error:") and "Traceback" not in result.stderr
