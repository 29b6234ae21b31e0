"""Helpers shared by the benchmark scripts: single-threaded set-up and data paths."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
VENDORED_DATA = REPO / "tests" / "data"


def single_threaded():
    """Pin numerical libraries to one thread (call before timing anything)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import cv2
    import threadpoolctl

    cv2.setNumThreads(1)
    threadpoolctl.threadpool_limits(1)


def bm_graz_dir() -> Path:
    """The full bm_graz set when ../shared/data is there, else the vendored two images."""
    full = SHARED_DATA / "bm_graz"
    return full if full.is_dir() else VENDORED_DATA / "bm_graz"


def headline(**figures):
    """Print the closing ``name: value`` lines."""
    for name, value in figures.items():
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
