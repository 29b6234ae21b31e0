"""Shared test helpers: where the real data of ../shared/data lives."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_DATA = Path(__file__).resolve().parent / "data"


def shared_data_path(*parts: str) -> Path:
    """A path under ../shared/data; skips the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def htk_reference():
    """The HistomicsTK-composed reference recipe (benchmarks/htk_reference.py); skips the
    calling test when HistomicsTK is not importable."""
    pytest.importorskip("histomicstk")
    import sys

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import htk_reference

    return htk_reference


def bm_graz_images() -> list[Path]:
    """All bm_graz images of ../shared/data (skips when absent)."""
    return sorted(shared_data_path("bm_graz", "images").glob("*.png"))
