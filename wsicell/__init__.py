"""wsicell: unsupervised cell-level analysis of whole-slide histology images.

The pipeline, one subpackage per stage and imports flowing one way (top to bottom)::

    cli/           the command line (thin click commands)
    pipeline/      orchestration: Dask ingest, the training run, labelling, prediction
    viz/           figures and the HTML report
    analysis/      proportions, slide classes, metrics, evaluation
    learning/      the GAN: networks, crop streaming, training steps, checkpoints (torch)
    segmentation/  tissue, stain, nuclei
    io/            slides, the Zarr cell store (the one owner of its format), exports
    config, errors, files, palette

The public API, for a notebook (imported lazily: ``import wsicell`` loads neither torch nor
Dask)::

    import wsicell
    store = "cells.zarr"
    wsicell.ingest(store, "slides/")
    wsicell.train(store, "model/", wsicell.WsicellConfig().with_options(train={"width": 16}))
    wsicell.predict(store, "slides/", "model/", "results/")
    wsicell.export(store, "cells.csv", "csv")
    root = wsicell.open_store(store)
"""

from importlib import import_module as _import_module
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("wsicell")
except _PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

_API = {
    "ingest": ("wsicell.pipeline.ingest", "ingest"),
    "train": ("wsicell.pipeline.training", "train"),
    "predict": ("wsicell.pipeline.predict", "predict"),
    "open_store": ("wsicell.io.store", "open_store"),
    "export": ("wsicell.io.export", "export_cells"),
    "WsicellConfig": ("wsicell.config", "WsicellConfig"),
    "WsicellError": ("wsicell.errors", "WsicellError"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """The public API, imported on first use (PEP 562)."""
    try:
        module, attribute = _API[name]
    except KeyError:
        raise AttributeError(f"module 'wsicell' has no attribute {name!r}") from None
    value = getattr(_import_module(module), attribute)
    globals()[name] = value
    return value


_SUBPACKAGES = ["analysis", "cli", "io", "learning", "pipeline", "segmentation", "viz"]


def __dir__() -> list[str]:
    """What a notebook's tab completion offers: the API and the subpackages."""
    return sorted([*__all__, *_SUBPACKAGES])
