"""Ingest on a Dask cluster started from the command line, as docs/cluster.md does it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_DATA

from wsicell.io.store import complete_slides, open_store, validate_store


def _start(*args, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(list(args), stdout=log, stderr=log, env=env,
                            start_new_session=True)


@pytest.fixture
def command_line_cluster(tmp_path):
    """A `dask scheduler` and one `dask worker` on 127.0.0.1, joined by a scheduler file."""
    scheduler_file = tmp_path / "scheduler.json"
    log = (tmp_path / "dask.log").open("w")
    dask = Path(sys.executable).with_name("dask")
    processes = [_start(dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--dashboard-address", "127.0.0.1:0", "--scheduler-file",
                        scheduler_file, log=log)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scheduler_file.exists(), (tmp_path / "dask.log").read_text()
    processes.append(_start(dask, "worker", "--scheduler-file", scheduler_file, "--nthreads",
                            "1", "--nworkers", "1", "--memory-limit", "2GB", "--host",
                            "127.0.0.1", "--no-dashboard", log=log))
    try:
        yield scheduler_file
    finally:
        for process in processes[::-1]:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(30)
        log.close()


def test_ingest_with_workers_of_the_dask_command_line(command_line_cluster, tmp_path):
    store = tmp_path / "cells.zarr"
    address = json.loads(command_line_cluster.read_text())["address"]
    assert address.startswith("tcp://127.0.0.1:")
    result = subprocess.run(
        [sys.executable, "-m", "wsicell.cli.main", "ingest", str(TEST_DATA / "bm_graz_pyramid.tif"),
         "--store", str(store), "--scheduler", str(command_line_cluster), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    root = open_store(store)
    assert complete_slides(root) == ["bm_graz_pyramid"]
    assert root["slides/bm_graz_pyramid"].attrs["n_cells"] > 100
    assert validate_store(store, deep=True) == []
