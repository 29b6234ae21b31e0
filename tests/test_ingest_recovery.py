"""Crash safety and external clusters: a killed ingest, a killed worker, `dask scheduler`.

Every run must end with the same store as one uninterrupted LocalCluster run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import zarr
from conftest import TEST_DATA

from wsicell.config import IngestConfig, WsicellConfig
from wsicell.io.staging import staging_dir
from wsicell.io.store import validate_store
from wsicell.pipeline.ingest import ingest

CONFIG = WsicellConfig(ingest=IngestConfig(tile_size=128, tiles_per_task=1, crops_per_chunk=64,
                                           cells_per_chunk=256, stain_sample_tiles=4))
SLIDE_ID = "bm_graz_pyramid"
DASK = [sys.executable, "-m", "distributed.cli.dask_worker"]


@pytest.fixture(scope="module")
def slide():
    return TEST_DATA / "bm_graz_pyramid.tif"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(CONFIG.to_json()))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slide):
    store = tmp_path_factory.mktemp("reference") / "cells.zarr"
    ingest(store, [slide], CONFIG, workers=2, progress=False)
    return store


def store_contents(store) -> dict:
    """Every attribute and array of the slide group, by path."""
    group = zarr.open_group(store / "slides" / SLIDE_ID, mode="r")
    contents = {"attrs": dict(group.attrs)}
    for name, array in group.arrays():
        contents[name] = array[:]
    for sub in ("cells", "tiles"):
        for name, array in group[sub].arrays():
            contents[f"{sub}/{name}"] = array[:]
    return contents


def assert_same_store(store, reference):
    got, expected = store_contents(store), store_contents(reference)
    assert got.keys() == expected.keys()
    assert got.pop("attrs") == expected.pop("attrs")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert validate_store(store) == []


def ingest_command(slide, store, config_file, *extra):
    return [sys.executable, "-m", "wsicell.cli.main", "ingest", str(slide), "--store", str(store),
            "--config", str(config_file), "--no-progress", *extra]


def wait_for_staged_tiles(store, process, at_least, timeout=240):
    """Wait until the run has staged some tiles (and is still running)."""
    directory = staging_dir(store, SLIDE_ID)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if directory.is_dir() and len(list(directory.glob("tile_*.npz"))) >= at_least:
            return
        assert process.poll() is None, "ingest ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no tiles were staged in time")


def kill_tree(process):
    """SIGKILL a process we started, then the processes it had started."""
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)


def test_resume_after_sigkill_gives_the_same_store(tmp_path, slide, config_file, reference):
    store = tmp_path / "cells.zarr"
    run = subprocess.Popen(ingest_command(slide, store, config_file), stderr=subprocess.PIPE)
    wait_for_staged_tiles(store, run, at_least=4)
    kill_tree(run)
    root = zarr.open_group(store, mode="r")
    assert root["slides"][SLIDE_ID].attrs["status"] == "ingesting"
    staged_before = len(list(staging_dir(store, SLIDE_ID).glob("tile_*.npz")))
    n_tiles = zarr.open_group(reference / "slides" / SLIDE_ID)["tiles/tile_id"].shape[0]
    assert 0 < staged_before < n_tiles

    rerun = subprocess.run(ingest_command(slide, store, config_file), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(store, reference)
    assert not staging_dir(store, SLIDE_ID).exists()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def external_cluster():
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", str(port), "--no-dashboard"], env=env, stderr=subprocess.DEVNULL)
    workers = [subprocess.Popen(
        [*DASK, address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
         "--memory-limit", "3GB", "--host", "127.0.0.1"], env=env, stderr=subprocess.DEVNULL)
        for _ in range(2)]
    try:
        yield address, workers
    finally:
        for process in [*workers, scheduler]:
            if process.poll() is None:
                process.terminate()
        for process in [*workers, scheduler]:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_external_scheduler_survives_a_killed_worker(tmp_path, slide, config_file, reference,
                                                    external_cluster):
    address, workers = external_cluster
    store = tmp_path / "cells.zarr"
    run = subprocess.Popen(ingest_command(slide, store, config_file, "--scheduler", address),
                           stderr=subprocess.PIPE, text=True)
    wait_for_staged_tiles(store, run, at_least=4)
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert_same_store(store, reference)
