"""Every bad input is refused the same way: exit code 2, one line on stderr naming the file
and the problem, no traceback, and nothing written (the store unchanged, byte for byte)."""

import hashlib
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_DATA, shared_data_path, write_test_slide
from PIL import Image

from wsicell.config import TrainConfig, WsicellConfig
from wsicell.io.store import open_store

SLIDE = "BM_GRAZ_HE_0001_01"


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "wsicell.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _digest(path: Path) -> str:
    """A hash of every file (name and bytes) below a directory."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def _bomb_png(path: Path, width=100_000, height=100_000) -> Path:
    """A small PNG whose header claims ``width x height`` pixels."""
    Image.new("RGB", (8, 8), "white").save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


def _geojson(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _polygon(coordinates, kind="Polygon", **properties):
    return {"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": properties,
        "geometry": {"type": kind, "coordinates": coordinates}}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An empty store, a store with one slide, a directory of one slide and a model."""
    from wsicell.learning.model import build_model
    from wsicell.learning.saved_model import save_trained_model

    base = tmp_path_factory.mktemp("hostile")
    empty = base / "empty.zarr"
    open_store(empty, mode="a")
    full = base / "full.zarr"
    write_test_slide(open_store(full, mode="a"), "s1", base, 6)
    slides = base / "slides"
    slides.mkdir()
    (slides / f"{SLIDE}.png").symlink_to(TEST_DATA / f"{SLIDE}.png")
    config = WsicellConfig(train=TrainConfig(width=8))
    model = base / "model"
    model.mkdir()
    save_trained_model(model, build_model(5, 32, 8, 0), config, {})
    return {"base": base, "empty": empty, "full": full, "slides": slides, "model": model}


def _truncated_svs(base: Path) -> Path:
    source = shared_data_path("slides", "CMU-1-Small-Region.svs")
    path = base / "truncated.svs"
    path.write_bytes(source.read_bytes()[:1_400_000])
    return path


def _deep_nesting(base: Path) -> Path:
    return _geojson(base / f"{SLIDE}.geojson", "[" * 100_000 + "]" * 100_000)


SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
BOWTIE = [[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]
REGIONS = {
    "self-intersecting": (_polygon([BOWTIE]), "not a valid polygon (Self-intersection"),
    "nan": (_polygon([[[0, 0], [float("nan"), 0], [1, 1], [0, 0]]]), "not finite numbers"),
    "null multipolygon": (_polygon([[None]], "MultiPolygon"), "has an empty polygon"),
    "feature string": ({"type": "FeatureCollection", "features": ["x"]},
                       "feature 0 is not a GeoJSON object"),
    "properties list": (_polygon([SQUARE]) | {"features": [{
        "type": "Feature", "properties": [1, 2],
        "geometry": {"type": "Polygon", "coordinates": [SQUARE]}}]},
        "properties that are not an object"),
    "point": (_polygon([1, 2], "Point"), "Point geometry"),
}

CASES = {
    "decompression bomb": lambda w: (
        ["ingest", _bomb_png(w["base"] / "bomb.png"), "--store", w["empty"], "--mpp", "0.4"],
        "bomb.png", "exceeds the limit of"),
    "truncated svs": lambda w: (
        ["ingest", _truncated_svs(w["base"]), "--store", w["empty"]],
        "truncated.svs", "truncated or corrupt file"),
    "store under a missing directory": lambda w: (
        ["ingest", w["slides"], "--store", w["base"] / "no" / "s.zarr"],
        "s.zarr", "parent directory"),
    "slide id ..": lambda w: (
        ["export", w["full"], "--format", "csv", "--out", w["base"] / "x.csv", "--slide", ".."],
        "full.zarr", "no slide '..'"),
    "unknown slide": lambda w: (
        ["export", w["full"], "--format", "csv", "--out", w["base"] / "x.csv", "--slide", "NO"],
        "full.zarr", "no slide 'NO' in the store"),
    "missing store": lambda w: (["validate", w["base"] / "nope.zarr"], "nope.zarr",
                                "no such cell store"),
    "deep GeoJSON": lambda w: (
        ["predict", "--slides", w["slides"], "--model", w["model"], "--store", w["empty"],
         "--out", w["base"] / "out", "--regions", _deep_nesting(w["base"])],
        f"{SLIDE}.geojson", "nested too deeply"),
    "bad labels before ingest": lambda w: (
        ["predict", "--slides", w["slides"], "--model", w["model"], "--store", w["empty"],
         "--out", w["base"] / "out", "--labels",
         _geojson(w["base"] / "labels.csv", "slide_id,label\nNOPE,a\n")],
        "labels.csv", "NOPE"),
    **{f"region: {name}": (lambda w, data=data, message=message: (
        ["predict", "--slides", w["slides"], "--model", w["model"], "--store", w["empty"],
         "--out", w["base"] / "out", "--regions",
         _geojson(w["base"] / f"{SLIDE}.geojson", data)],
        f"{SLIDE}.geojson", message)) for name, (data, message) in REGIONS.items()},
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(world, case):
    args, names, problem = CASES[case](world)
    stores = {s: _digest(world[s]) for s in ("empty", "full")}
    result = _run(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("wsicell: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert names in errors[0] and problem in errors[0], errors[0]
    assert {s: _digest(world[s]) for s in stores} == stores
    assert not (world["base"] / "out").exists() and not (world["base"] / "no").exists()


def test_invalid_regions_can_be_repaired(tmp_path):
    from wsicell.analysis.proportions import read_geojson_regions

    path = _geojson(tmp_path / "r.geojson", _polygon([BOWTIE], name="bowtie"))
    (region,) = read_geojson_regions(path, fix=True)
    assert region.geometry.is_valid and region.geometry.area == pytest.approx(5000)
    assert region.contains(np.array([20.0, 50.0]), np.array([50.0, 20.0])).tolist() == \
        [True, False]


def test_region_outside_the_slide_or_without_cells_is_warned():
    from shapely.geometry import box

    from wsicell.analysis.proportions import PolygonRegion, region_warnings

    regions = [PolygonRegion("far", box(5000, 5000, 6000, 6000)),
               PolygonRegion("empty", box(0, 0, 10, 10)), PolygonRegion("ok", box(0, 0, 99, 99))]
    warnings = region_warnings("s", regions, np.array([[0, 0], [0, 0], [3, 1]]), (100, 100))
    assert warnings == ["slide s: region 'far' lies outside the slide (100 x 100 px): check the "
                        "GeoJSON is this slide's", "slide s: region 'empty' covers no cell"]


def test_a_damaged_training_log_is_one_line_on_resume(train_store, tmp_path):
    from wsicell.pipeline.training import train

    config = WsicellConfig(train=TrainConfig(width=8, batch_size=16, critic_steps=1,
                                             shuffle_buffer=64))
    out = tmp_path / "model"
    train(train_store, out, config, device="cpu", max_iters=2, workers=0, progress=False)
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(["{not json", *lines[1:]]) + "\n")
    result = _run("train", "--store", train_store, "--out", out, "--width", 8,
                  "--batch-size", 16, "--critic-steps", 1, "--shuffle-buffer", 64,
                  "--max-iters", 3, "--resume", "--workers", 0, "--device", "cpu", "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "log.jsonl: line 1 is not a training log entry" in result.stderr


def test_no_live_worker_is_an_error_not_a_hang(tmp_path, monkeypatch):
    from distributed import LocalCluster

    from wsicell.errors import WsicellError
    from wsicell.pipeline import cluster
    from wsicell.pipeline.ingest import ingest

    monkeypatch.setattr(cluster, "NO_WORKER_TIMEOUT_S", 3.0)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as empty:
        with pytest.raises(WsicellError, match="no Dask worker alive for 3 s"):
            ingest(tmp_path / "s.zarr", [TEST_DATA / f"{SLIDE}.png"], mpp=0.4,
                   scheduler=empty.scheduler_address, progress=False)


def _die():
    import os

    os._exit(1)


def test_a_worker_killed_by_its_task_is_explained():
    import dask
    from distributed import Client, LocalCluster

    from wsicell.errors import WsicellError
    from wsicell.pipeline.cluster import run_tasks

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="500MB",
                         processes=True, dashboard_address=None) as local, Client(local) as client:
        with pytest.raises(WsicellError, match=r"a Dask worker died running .*\(out of memory\? "
                                               r"limit 476\.84 MiB per worker\): raise "
                                               r"--memory-limit"):
            run_tasks(client, [("die", 1, _die, ())], bar=type("B", (), {"update": print})())


def test_the_dashboard_listens_on_this_machine_only():
    from distributed import Client

    from wsicell.pipeline.cluster import local_cluster

    with local_cluster(1, 1, "1GB") as local, Client(local) as client:
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        assert local.scheduler_address.startswith("tcp://127.0.0.1:")


