"""wsicell: unsupervised cell-level representation learning for whole-slide histology.

Pipeline stages, one module each: ``slide`` (reading) -> ``tissue`` -> ``stain`` ->
``segment`` -> ``store`` (Zarr cell store) written by ``ingest``; ``data`` streams crops to
``model`` / ``train``; ``predict`` labels cells and computes proportions; ``metrics`` and
``report`` evaluate and draw.  ``config`` holds the one typed configuration.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsicell")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
