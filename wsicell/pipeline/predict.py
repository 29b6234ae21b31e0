"""The whole prediction run: slides in, report out.

ingest the new slides -> label every cell with the model's Q (:mod:`.labelling`) -> per-slide,
grid-region and annotated-region proportions -> slide classes -> tables, the region grids in
the store, and the HTML report.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd

import wsicell
from wsicell.analysis.proportions import (
    cluster_warnings,
    proportion_tables,
    region_warnings,
    regions_by_slide,
    slide_proportions,
)
from wsicell.analysis.slide_classes import (
    SlideClassifier,
    predict_slides,
    read_slide_labels,
)
from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.files import write_atomically
from wsicell.io.slide import find_slide_files
from wsicell.io.store import (
    labels_complete,
    open_store,
    read_labels,
    slide_attrs,
    slide_cells,
    store_location,
    store_lock,
    write_region_grid,
)
from wsicell.learning.device import resolve_device
from wsicell.learning.saved_model import load_trained_model
from wsicell.pipeline.cluster import DASHBOARD, dask_client
from wsicell.pipeline.ingest import ingest
from wsicell.pipeline.labelling import check_model_fits, label_slides
from wsicell.pipeline.tiles import slide_id_for
from wsicell.viz.report import write_prediction_report


def _check_slides_dir(slides_dir: Path) -> None:
    """Refuse a path that is not a directory holding at least one slide or image file."""
    if not slides_dir.is_dir():
        raise WsicellError(f"{slides_dir}: not a directory of slides")
    find_slide_files([slides_dir])


def _write_table(table: pd.DataFrame, out_dir: Path, name: str) -> list[Path]:
    """Write a table as Parquet and CSV (each atomically); returns both paths."""
    paths = []
    for suffix, write in ((".parquet", lambda t, p: t.to_parquet(p, index=False)),
                          (".csv", lambda t, p: t.to_csv(p, index=False))):
        final = out_dir / f"{name}{suffix}"
        tmp = out_dir / f".{name}{suffix}.tmp"
        write(table, tmp)
        tmp.replace(final)
        paths.append(final)
    return paths


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    write_atomically(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def predict(store: str | Path, slides: str | Path, model: str | Path, out: str | Path,
            config: WsicellConfig | None = None, *, regions: str | Path | None = None,
            labels: str | Path | None = None, classifier: str | Path | None = None,
            fix_regions: bool = False,
            device: str = "auto", mpp: float | None = None, workers: int = 2,
            threads_per_worker: int = 1, memory_limit: str = "4GB",
            scheduler: str | None = None, dashboard: str | None = DASHBOARD,
            progress: bool = True) -> Path:
    """Slides in, report out: ingest -> label cells -> proportions -> slide classes -> report.

    Slides of ``slides`` not yet in the store are ingested (same Dask options as
    :func:`wsicell.ingest`); every crop of those slides is labelled with the model's Q (Dask
    over crop chunks on CPU, in this process on a GPU); per-slide, grid-region and
    annotated-region proportions, slide predictions and pictures are written to ``out``.
    Every input (model, classifier, slide labels, regions) is checked before anything is
    written to the store.

    Parameters
    ----------
    store : path
        The cell store (created when missing).
    slides : path
        Directory of slides / images.
    model : path
        A trained model directory (:func:`wsicell.train`).
    out : path
        Results directory (created).
    config : WsicellConfig, optional
        ``config.predict`` holds region size, slide clusters, folds and batch size.
    regions : path, optional
        GeoJSON polygon annotations (see :func:`wsicell.analysis.proportions.regions_by_slide`).
    fix_regions : bool
        Repair invalid region polygons (shapely's ``make_valid``) instead of refusing them.
    labels : path, optional
        ``slide_id,label`` CSV: trains and cross-validates the slide SVM.
    classifier : path, optional
        A ``slide_classifier.json`` saved by an earlier run, applied to these slides.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    mpp, workers, threads_per_worker, memory_limit, scheduler, dashboard :
        Ingest / Dask options (as :func:`wsicell.ingest`).
    progress : bool
        Progress bars on stderr.

    Returns
    -------
    Path of ``report.html`` in ``out``.

    Examples
    --------
    >>> import wsicell
    >>> report = wsicell.predict("cells.zarr", "slides/", "model/", "results/",
    ...                          workers=1, progress=False)  # doctest: +SKIP
    >>> report.name  # doctest: +SKIP
    'report.html'
    """
    config = config or WsicellConfig()
    slides_dir, out_dir, model_dir = Path(slides), Path(out), Path(model)
    _check_slides_dir(slides_dir)
    if labels is not None and classifier is not None:
        raise WsicellError(f"{labels}: give either --labels (train a slide classifier) or "
                           "--classifier (apply a saved one), not both")
    torch_device = resolve_device(device)
    trained = load_trained_model(model_dir, device=torch_device)
    saved_classifier = SlideClassifier.load(classifier) if classifier is not None else None
    if saved_classifier is not None and saved_classifier.n_features != trained.k:
        raise WsicellError(f"{classifier}: trained on {saved_classifier.n_features} cell types, "
                           f"but model {trained.model_id} has k={trained.k}")
    expected_ids = [slide_id_for(p) for p in find_slide_files([slides_dir])]
    slide_labels = read_slide_labels(labels, expected_ids) if labels is not None else None
    slide_regions = regions_by_slide(regions, expected_ids, fix_regions)

    slide_ids = ingest(store, [slides_dir], config, mpp=mpp, workers=workers,
                       threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                       scheduler=scheduler, dashboard=dashboard, progress=progress)
    root = open_store(store, mode="r")
    check_model_fits(root, slide_ids, trained)
    pending = [s for s in slide_ids if not labels_complete(root, s, trained.model_id)]
    if pending and torch_device.type == "cpu":
        with dask_client(workers, threads_per_worker, memory_limit, scheduler, progress,
                         dashboard) as client:
            label_slides(store, pending, model_dir, trained, config, client=client,
                         threads_per_worker=threads_per_worker, progress=progress)
    elif pending:
        label_slides(store, pending, model_dir, trained, config, progress=progress)

    out_dir.mkdir(parents=True, exist_ok=True)
    root = open_store(store, mode="r+")
    region_size = config.predict.region_size_um
    results = [_slide_proportions(root, s, trained.model_id, trained.k, region_size,
                                  slide_regions.get(s)) for s in slide_ids]
    with store_lock(store, writer="prediction"):
        for result in results:
            write_region_grid(root, result.slide_id, trained.model_id, result.proportion_grid(),
                              {"region_size_um": region_size,
                               "region_px": result.grid.region_px, "config": config.to_json(),
                               "wsicell_version": wsicell.__version__})
    for result in results:
        attrs = slide_attrs(root, result.slide_id)
        for warning in region_warnings(result.slide_id, slide_regions.get(result.slide_id, []),
                                       result.region_counts, (attrs["width"], attrs["height"])):
            warnings.warn(warning, stacklevel=2)
    for warning in cluster_warnings(sum(result.counts for result in results)):
        warnings.warn(f"model {trained.model_id}: {warning}", stacklevel=2)
    tables = proportion_tables(results)
    _write_table(tables["slides"], out_dir, "slide_proportions")
    _write_table(tables["grid"], out_dir, "grid_proportions")
    if len(tables["annotations"]):
        _write_table(tables["annotations"], out_dir, "annotation_proportions")
    predictions, summary, fitted = predict_slides(tables["slides"], trained.k, config.predict,
                                                  config.train.seed, slide_labels,
                                                  saved_classifier)
    for name, data in fitted.items():
        _write_json(out_dir / name, data)
    _write_table(predictions, out_dir, "slide_predictions")
    provenance = {"wsicell_version": wsicell.__version__, "model_id": trained.model_id,
                  "k": trained.k, "model_dir": str(model_dir.resolve()),
                  "store": str(store_location(store)), "slides": slide_ids,
                  "slide_prediction": summary, "config": config.to_json(),
                  "model_config": trained.config.to_json()}
    _write_json(out_dir / "prediction.json", provenance)
    return write_prediction_report(out_dir, root, trained, results, predictions, summary,
                                   provenance, model_dir=model_dir)


def _slide_proportions(root, slide_id: str, model_id: str, k: int, region_size_um: float,
                       regions):
    """The counts of one slide's complete labels (read from the store)."""
    cluster, _ = read_labels(root, slide_id, model_id)
    cells = slide_cells(root, slide_id)
    attrs = slide_attrs(root, slide_id)
    return slide_proportions(slide_id, cells["x"].to_numpy(), cells["y"].to_numpy(), cluster, k,
                             (attrs["width"], attrs["height"]), attrs["mpp"], region_size_um,
                             regions)
