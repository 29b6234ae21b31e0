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
    from wsicell.learning.model import model_for
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
    save_trained_model(model, model_for(config.train), config, {})
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




# --------------------------------------------------------------------------- round two


def _refused(result, *names):
    """Exit 2, one ``wsicell: error:`` line naming ``names``, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("wsicell: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(name in errors[0] for name in names), errors[0]
    return errors[0]


def _left(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir())


METADATA_DAMAGE = {  # node below slides/s1 -> what is done to its zarr.json
    "cells/bbox_x0": lambda b: b[:40] + b"\n\x01",  # truncated, a control character
    "crops": lambda b: b.replace(b'"uint8"', b'"uint99"'),
    "tiles/n_cells": lambda b: b"",
    "masks": lambda b: b"[1, 2]",
    "": lambda b: b[:30],  # the slide's own group
}


def _damaged_store(base: Path, node: str) -> Path:
    store = base / "cells.zarr"
    for slide_id in ("s1", "s2"):
        write_test_slide(open_store(store, mode="a"), slide_id, base, 6)
    meta = store / "slides" / "s1" / node / "zarr.json"
    meta.write_bytes(METADATA_DAMAGE[node](meta.read_bytes()))
    return store


def test_damaged_array_metadata_is_one_line_naming_the_array(tmp_path):
    """Case 1: a truncated cells/bbox_x0/zarr.json made validate --deep and export end in
    a JSONDecodeError traceback."""
    store = _damaged_store(tmp_path, "cells/bbox_x0")
    result = _run("validate", store, "--deep")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"{store}: slide 's1', cells/bbox_x0: unreadable metadata in "
                               "slides/s1/cells/bbox_x0/zarr.json ("), lines
    assert lines[-1].endswith("damaged: s1; still good: s2"), lines
    result = _run("export", store, "--format", "csv", "--out", tmp_path / "cells.csv")
    _refused(result, str(store), "slide 's1', cells/bbox_x0: unreadable metadata")
    assert not (tmp_path / "cells.csv").exists()


@pytest.mark.parametrize("node", list(METADATA_DAMAGE))
def test_every_damaged_metadata_file_is_named(tmp_path, node):
    from wsicell.errors import WsicellError
    from wsicell.io.store import complete_slides, slide_cells, slide_crops, slide_masks, \
        validate_store

    store = _damaged_store(tmp_path, node)
    where = f"slide 's1', {node}: " if node else "slide 's1': "
    problems = validate_store(store, deep=True)
    assert len(problems) == 1 and where + "unreadable metadata" in problems[0], problems
    root = open_store(store)
    for read in (lambda: complete_slides(root), lambda: slide_cells(root, "s1"),
                 lambda: slide_crops(root, "s1")[:], lambda: slide_masks(root, "s1")[:]):
        try:
            read()
        except WsicellError as err:
            assert where + "unreadable metadata" in str(err), err
    assert slide_cells(root, "s2")["cell_id"].tolist() == list(range(6))


def test_a_damaged_cell_column_refuses_training_in_one_line(tmp_path):
    store = _damaged_store(tmp_path, "crops")
    result = _run("train", "--store", store, "--out", tmp_path / "model", "--slides", "s1",
                  "--width", 8, "--max-iters", 1, "--workers", 0, "--device", "cpu", "--quiet")
    _refused(result, "slide 's1', crops: unreadable metadata")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("mpp", ["100", "inf", "0", "-1", "nan", "1e-9"])
def test_a_nonsense_resolution_is_refused_before_anything_is_written(tmp_path, mpp):
    """Cases 2, 3 and 6: --mpp 100 ran on for 90 s growing to 2.4 GB; --mpp inf ended in a
    ZeroDivisionError; --mpp 0 / -1 were refused only after an empty store and its lock
    had been made."""
    result = _run("ingest", TEST_DATA / f"{SLIDE}.png", "--store", tmp_path / "s.zarr",
                  "--mpp", mpp, timeout=60)
    _refused(result, "--mpp", mpp)
    assert _left(tmp_path) == []


@pytest.mark.parametrize("mpp", [float("inf"), 0.0, -1.0, 100.0, float("nan")])
def test_the_library_refuses_a_nonsense_resolution_too(tmp_path, mpp):
    from wsicell.errors import WsicellError
    from wsicell.pipeline.ingest import ingest

    with pytest.raises(WsicellError, match=r"--mpp .* is outside 0\.02-20 um/px"):
        ingest(tmp_path / "s.zarr", [TEST_DATA / f"{SLIDE}.png"], mpp=mpp, progress=False)
    assert _left(tmp_path) == []


def test_the_coarsest_accepted_resolution_keeps_the_plan_small(tmp_path):
    """At 20 um/px (the largest accepted) the tissue thumbnail is never enlarged beyond the
    slide itself; before, a coarse --mpp made it grow with the resolution (2.4 GB)."""
    import tracemalloc

    from wsicell.pipeline.tiles import plan_slide

    tracemalloc.start()
    plan, attrs, thumb, tissue, tiles = plan_slide(TEST_DATA / f"{SLIDE}.png", tmp_path / "s",
                                                   WsicellConfig(), 20.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert thumb.shape[:2] == (1200, 1200) and attrs["thumbnail_mpp"] == 20.0
    assert plan.grid.width == 60000 and len(tiles["tile_id"]) > 0
    assert peak < 200e6, peak


def test_an_unreadable_slide_leaves_no_store_behind(tmp_path):
    """Case 6: an unreadable input into a new store left an empty store and its lock that
    validate called valid."""
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    result = _run("ingest", garbage, "--store", tmp_path / "s.zarr", "--no-progress")
    _refused(result, "garbage.png")
    assert _left(tmp_path) == ["garbage.png"]


def test_export_into_a_missing_directory_is_one_line(world):
    """Case 5: export --out missing_dir/cells.csv ended in a 41-line traceback (exit 1)."""
    out = world["base"] / "missing_dir" / "cells.csv"
    result = _run("export", world["full"], "--format", "csv", "--out", out)
    _refused(result, str(out), "parent directory", "does not exist")
    assert not out.parent.exists()


def test_a_pickled_model_is_refused_without_advice_to_turn_the_protection_off(world, tmp_path):
    """Case 7: the refusal quoted PyTorch's hint that weights_only=False "will likely
    succeed"."""
    import shutil

    import torch

    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    ran = tmp_path / "ran"
    torch.save({"format": "wsicell-model-v1", "state_dict": _Payload(str(ran))},
               model / "model.pt")
    result = _run("predict", "--slides", world["slides"], "--model", model, "--store",
                  tmp_path / "s.zarr", "--out", tmp_path / "out", "--no-progress")
    line = _refused(result, "model.pt: refused: it holds Python objects (getattr)")
    assert "weights_only" not in result.stderr and "succeed" not in result.stderr, line
    assert not ran.exists() and _left(tmp_path) == ["model"]


class _Payload:
    """Unpickling this would create a file: the code a malicious model.pt would run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


#: A Dask preload run by each worker process as it starts: the worker exits at once (as if
#: the OOM killer took it), every time, or only the first time when WSICELL_TEST_DIE_ONCE
#: names a directory that does not exist yet.
DIE_AT_START = """
import os
marker = os.environ.get("WSICELL_TEST_DIE_ONCE")
try:
    if marker:
        os.mkdir(marker)
except FileExistsError:
    pass
else:
    os._exit(1)
"""


def test_workers_dying_at_every_start_are_one_line_after_three_attempts(tmp_path):
    """Case 4: both workers of the embedded cluster killed while it starts gave an 80-line
    traceback ending "RuntimeError: Nanny failed to start." (a rerun then succeeded)."""
    import os

    preload = tmp_path / "die.py"
    preload.write_text(DIE_AT_START)
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(preload)])}
    result = subprocess.run(
        [sys.executable, "-m", "wsicell.cli.main", "ingest", str(TEST_DATA / f"{SLIDE}.png"),
         "--store", str(tmp_path / "s.zarr"), "--mpp", "0.4", "--workers", "2",
         "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    _refused(result, "the local Dask cluster of 2 worker(s) failed to start 3 times",
             "Nanny failed to start")
    assert result.stderr.count("retrying (") == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 3, result.stderr
    assert _left(tmp_path) == ["die.py"]


def test_a_worker_dying_at_the_first_start_is_retried(tmp_path, monkeypatch):
    import dask
    from distributed import Client

    from wsicell.pipeline.cluster import start_local_cluster

    preload = tmp_path / "die.py"
    preload.write_text(DIE_AT_START)
    monkeypatch.setenv("WSICELL_TEST_DIE_ONCE", str(tmp_path / "died"))
    with dask.config.set({"distributed.worker.preload": [str(preload)]}), \
            pytest.warns(UserWarning, match=r"failed to start .*retrying \(2/3\)"):
        cluster, client = start_local_cluster(1, 1, "1GB", dashboard=None)
    with cluster, client:
        assert isinstance(client, Client) and client.submit(sum, [1, 2]).result() == 3
    assert (tmp_path / "died").is_dir()


@pytest.mark.parametrize(("name", "value"), [("mpp", "x"), ("n_cells", -3), ("config", "x"),
                                             ("stain", None), ("width", 1.5)])
def test_damaged_slide_attributes_are_one_line(tmp_path, name, value):
    """Attributes a reader relies on (resolution, counts, configuration) that break the
    store's schema are refused naming the slide and the attribute, not used."""
    from wsicell.errors import WsicellError
    from wsicell.io.store import ingesting_slide, slide_cells, validate_store

    store = tmp_path / "cells.zarr"
    for slide_id in ("s1", "s2"):
        write_test_slide(open_store(store, mode="a"), slide_id, tmp_path, 6)
    ingesting_slide(open_store(store, mode="r+"), "s1").attrs[name] = value
    root = open_store(store)
    with pytest.raises(WsicellError, match=rf"slide 's1': damaged attributes \({name}: "):
        slide_cells(root, "s1")
    assert len(slide_cells(root, "s2")) == 6
    assert any(f"slides/s1: {name}: " in p for p in validate_store(store)), \
        validate_store(store)


def test_an_image_enlarged_past_the_plain_image_limit_is_refused(tmp_path):
    """segment / evaluate read a field of view whole on the reference grid: at 20 um/px a
    1200 px image would be 60000 x 60000 px (10.8 GB); it is refused, nothing written."""
    result = _run("segment", TEST_DATA / f"{SLIDE}.png", "--out", tmp_path / "out", "--mpp",
                  "20", "--no-progress", timeout=120)
    _refused(result, f"{SLIDE}.png", "60000 x 60000 px", "max_plain_image_pixels")
    assert _left(tmp_path) == []
