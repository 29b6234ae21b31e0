"""The cell store on object storage: a real S3 server (moto's server mode) on 127.0.0.1.

The server is started by these tests and stopped after them; credentials and endpoint reach
s3fs (and the processes the tests start) through the usual AWS environment variables.
Ingest, a killed ingest resumed, two ingests at once, training, prediction and export all
run against ``s3://`` and must give what they give on a local disk.
"""

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
# test_ingest_recovery's fixtures: the sample slide, its configuration, a local store
from test_ingest_recovery import (  # noqa: F401
    CONFIG,
    SLIDE_ID,
    config_file,
    ingest_command,
    kill_tree,
    reference,
    slide,
)

from wsicell.config import TrainConfig
from wsicell.errors import WsicellError
from wsicell.io.export import export_cells
from wsicell.io.staging import staged_tiles, staging_dir
from wsicell.io.store import (
    StoreLease,
    complete_slides,
    labelled_models,
    open_store,
    store_lock,
    validate_store,
)
from wsicell.learning.data import CropStream
from wsicell.learning.saved_model import load_trained_model
from wsicell.pipeline.ingest import ingest
from wsicell.pipeline.predict import predict
from wsicell.pipeline.training import train

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
BUCKET = "wsicell-test"
DASK = {"workers": 2, "threads_per_worker": 1, "memory_limit": "2GB", "progress": False}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with an empty bucket; its environment set for this
    process and the processes it starts.  Yields the s3fs filesystem."""
    import s3fs

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    "the moto server did not start"
                time.sleep(0.1)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def local(reference):
    """The sample ingested into a local store (test_ingest_recovery's reference)."""
    return reference


@pytest.fixture(scope="module")
def remote(s3, slide):
    url = f"s3://{BUCKET}/cells.zarr"
    assert ingest(url, [slide], CONFIG, **DASK) == [SLIDE_ID]
    return url


def contents(store) -> dict:
    """Every attribute and array of the slide group, by path (a path or a URL)."""
    group = open_store(store)["slides"][SLIDE_ID]
    found = {"attrs": dict(group.attrs)}
    for sub in (group, group["cells"], group["tiles"]):
        prefix = "" if sub is group else sub.basename + "/"
        for name, array in sub.arrays():
            found[prefix + name] = array[:]
    return found


def assert_same(store, reference):
    got, expected = contents(store), contents(reference)
    assert got.keys() == expected.keys()
    attrs, expected_attrs = got.pop("attrs"), expected.pop("attrs")
    assert {k: v for k, v in attrs.items() if k != "source_path"} == \
        {k: v for k, v in expected_attrs.items() if k != "source_path"}
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_clean_local_run_leaves_no_lock_file(local):
    assert not Path(f"{local}.lock").exists()
    assert not Path(f"{local}.staging").exists()
    with store_lock(local):  # and the lock still excludes a second writer while held
        assert Path(f"{local}.lock").exists()
        with pytest.raises(WsicellError, match="another ingest is writing"):
            with store_lock(local, writer="prediction"):
                pass
    assert not Path(f"{local}.lock").exists()


def test_ingest_into_s3_gives_the_local_store(s3, remote, local, slide):
    assert_same(remote, local)
    assert validate_store(remote, deep=True) == []
    # nothing beside the store: no staging, no lease
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.ls(BUCKET, refresh=True)) == ["cells.zarr"]
    # a second run finds the slide complete and changes nothing
    assert ingest(remote, [slide], CONFIG, **DASK) == [SLIDE_ID]
    assert_same(remote, local)


def test_missing_bucket_and_missing_store_are_one_line(s3):
    with pytest.raises(WsicellError, match=r"^s3://wsicell-test/none\.zarr: no such cell store$"):
        open_store(f"s3://{BUCKET}/none.zarr")
    with pytest.raises(WsicellError, match=r"^s3://no-such-bucket/c\.zarr: cannot open"):
        open_store("s3://no-such-bucket/c.zarr", mode="a")


def test_lease_excludes_a_second_writer_and_expires(s3):
    url = f"s3://{BUCKET}/leased.zarr"
    with StoreLease(url, "ingest", seconds=30):
        record = json.loads(s3.cat_file(f"{BUCKET}/leased.zarr.lease"))
        assert record["writer"] == "ingest" and record["expires"] > time.time()
        with pytest.raises(WsicellError, match=r"another ingest is writing to this store "
                                               r"\(host .*, pid \d+, lease until"):
            with store_lock(url, writer="prediction"):
                pass
    assert not s3.exists(f"{BUCKET}/leased.zarr.lease")
    # a writer on another host that stopped renewing: its lease expires and is taken over
    s3.pipe_file(f"{BUCKET}/leased.zarr.lease", json.dumps(
        {"owner": "x", "writer": "ingest", "host": "elsewhere", "pid": 1,
         "expires": time.time() - 1}).encode())
    with store_lock(url):
        assert json.loads(s3.cat_file(f"{BUCKET}/leased.zarr.lease"))["pid"] == os.getpid()
    # a lease another writer replaced is lost: the writer is told when it finishes
    lease = StoreLease(url, "ingest", seconds=0.6)
    with pytest.raises(WsicellError, match="lost the store's lease"):
        with lease:
            s3.pipe_file(f"{BUCKET}/leased.zarr.lease", b'{"owner": "other"}')
            time.sleep(0.8)
    assert s3.exists(f"{BUCKET}/leased.zarr.lease")  # the other writer's lease stays


def test_two_ingests_at_once_one_is_refused(s3, slide, config_file, local):
    url = f"s3://{BUCKET}/twice.zarr"
    first = subprocess.Popen(ingest_command(slide, url, config_file), stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 240
    while not s3.exists(f"{BUCKET}/twice.zarr.lease"):
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline, "the first ingest took no lease in time"
        time.sleep(0.1)
        s3.invalidate_cache()
    second = subprocess.run(ingest_command(slide, url, config_file), capture_output=True,
                            text=True, timeout=240)
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"wsicell: error: {url}: another ingest is writing to this store (host "), lines
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_same(url, local)
    assert not s3.exists(f"{BUCKET}/twice.zarr.lease")


def test_a_killed_ingest_resumes_to_the_same_store(s3, slide, config_file, local):
    url = f"s3://{BUCKET}/killed.zarr"
    run = subprocess.Popen(ingest_command(slide, url, config_file), stderr=subprocess.PIPE)
    directory = staging_dir(url, SLIDE_ID)
    deadline = time.monotonic() + 240
    while len(staged_tiles(directory)) < 4:
        assert run.poll() is None, "ingest ended before it could be interrupted"
        assert time.monotonic() < deadline, "no tiles were staged in time"
        time.sleep(0.05)
    kill_tree(run)
    root = zarr.open_group(url, mode="r")
    assert root["slides"][SLIDE_ID].attrs["status"] == "ingesting"
    staged_before = len(staged_tiles(directory))
    n_tiles = open_store(local)["slides"][SLIDE_ID]["tiles/tile_id"].shape[0]
    assert 0 < staged_before < n_tiles
    # the killed run's lease names this host and a dead process: the rerun takes it over
    assert s3.exists(f"{BUCKET}/killed.zarr.lease")
    rerun = subprocess.run(ingest_command(slide, url, config_file), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert_same(url, local)
    assert validate_store(url) == []
    assert not s3.exists(directory.split("://", 1)[1])
    assert not s3.exists(f"{BUCKET}/killed.zarr.lease")


def test_crop_stream_from_s3_gives_the_local_batches(remote, local):
    slides = complete_slides(open_store(local))
    # units are whole chunks on object storage: the same units locally give the same batches
    streams = [CropStream(local, slides, 16, 64, seed=3, whole_chunks=True),
               CropStream(remote, slides, 16, 64, seed=3)]
    assert (streams[0].read_ahead, streams[1].read_ahead) == (1, 8)
    assert streams[0].units == streams[1].units
    n = 2 * streams[0].n_crops // 16  # two epochs
    batches = [np.stack([b.numpy() for _, b in zip(range(n), s)]) for s in streams]
    np.testing.assert_array_equal(batches[1], batches[0])


def test_train_predict_and_export_on_s3(s3, remote, slide, tmp_path):
    config = CONFIG.model_copy(update={"train": TrainConfig(width=16, batch_size=16,
                                                            critic_steps=1, categories=3)})
    model = train(remote, tmp_path / "model", config, device="cpu", max_iters=2,
                  progress=False)
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / slide.name).symlink_to(slide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two iterations sort every cell into one type
        predict(remote, slides, model, tmp_path / "out", config=config, device="cpu", **DASK)
    model_id = load_trained_model(model).model_id
    root = open_store(remote)
    assert labelled_models(root, SLIDE_ID) == [model_id]
    provenance = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert provenance["store"] == remote
    n = export_cells(remote, tmp_path / "cells.csv", "csv")
    table = pd.read_csv(tmp_path / "cells.csv")
    assert n == len(table) == root[f"slides/{SLIDE_ID}"].attrs["n_cells"]
    assert table["cluster"].between(0, 2).all()
    assert not s3.exists(f"{BUCKET}/cells.zarr.lease")
