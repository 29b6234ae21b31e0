"""The real cell store the trainer tests share: the vendored bone-marrow image ingested once
per test session (small tiles and chunks so that several chunks and streams exist)."""

from pathlib import Path

from conftest import TEST_DATA
from wsicell.config import IngestConfig, WsicellConfig
from wsicell.ingest import ingest

STORE_CONFIG = WsicellConfig(ingest=IngestConfig(tile_size=512, crops_per_chunk=128))
SLIDE = "BM_GRAZ_HE_0001_01"
_stores: dict[str, Path] = {}


def bm_graz_store(tmp_path_factory) -> Path:
    """Path of the session's store (ingested on first use)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _stores:
        path = tmp_path_factory.mktemp("train_store") / "cells.zarr"
        ids = ingest([TEST_DATA / f"{SLIDE}.png"], path, STORE_CONFIG, mpp=0.4, workers=1,
                     progress=False)
        assert ids == [SLIDE]
        _stores[key] = path
    return _stores[key]
