"""Label every cell of a store with a trained model's Q head, back into the store.

For each complete slide and model the labels live in ``slides/<id>/labels/<model_id>/``:
``cluster`` (N,) int16 (argmax of Q) and ``proba`` (N, k) float32 (Q's softmax), chunked
like the slide's crops, with attributes ``{model_id, k, n_cells, slide_fingerprint,
config, wsicell_version, status}``.  ``status`` becomes ``"complete"`` only after every
chunk is written, so an interrupted run never leaves labels that look complete; labels
already complete for the same model (and the same slide content) are left untouched, so
rerunning is a no-op, and another model writes beside them.

Labelling runs one task per crop chunk: on CPU the tasks go to a Dask cluster (each
worker loads the model once and writes its own chunks, so no two tasks write the same
chunk); on a GPU they run in this process, one batch after another.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm

import wsicell
from wsicell.config import WsicellConfig
from wsicell.errors import WsicellError
from wsicell.proportions import (
    PolygonRegion,
    RegionGrid,
    cluster_counts,
    counts_to_proportions,
    grid_counts,
    polygon_counts,
    read_geojson_regions,
)
from wsicell.slide import find_slide_files
from wsicell.slide_classes import SlideClassifier, SlideKMeans, cross_validate, read_slide_labels
from wsicell.store import open_store, slide_cells, slide_crops, slide_group, store_lock

LABELS = "labels"
COMPLETE = "complete"
REGION_GRID = "region_proportions"


# --- labels in the store -------------------------------------------------------------------

def _labels_path(slide_id: str, model_id: str) -> str:
    return f"slides/{slide_id}/{LABELS}/{model_id}"


def labels_complete(root: zarr.Group, slide_id: str, model_id: str) -> bool:
    """True when the slide holds complete labels of this model for its current content."""
    slide = slide_group(root, slide_id)
    try:
        attrs = slide[f"{LABELS}/{model_id}"].attrs
    except KeyError:
        return False
    return (attrs.get("status") == COMPLETE
            and attrs.get("slide_fingerprint") == slide.attrs.get("fingerprint")
            and attrs.get("n_cells") == slide["crops"].shape[0])


def labelled_models(root: zarr.Group, slide_id: str) -> list[str]:
    """Ids of the models whose labels of this slide are complete (sorted)."""
    try:
        group = root[f"slides/{slide_id}/{LABELS}"]
    except KeyError:
        return []
    return sorted(name for name, _ in group.groups() if labels_complete(root, slide_id, name))


def read_labels(root: zarr.Group, slide_id: str, model_id: str) -> tuple[np.ndarray, np.ndarray]:
    """A model's complete labels of one slide.

    Returns
    -------
    cluster : ndarray, shape (N,), int16
    proba : ndarray, shape (N, k), float32

    Raises
    ------
    WsicellError
        When the slide has no complete labels of this model.
    """
    if not labels_complete(root, slide_id, model_id):
        raise WsicellError(f"{root.store}: slide {slide_id} has no complete labels of model "
                           f"{model_id} (run wsicell predict)")
    labels = root[_labels_path(slide_id, model_id)]
    return labels["cluster"][:], labels["proba"][:]


def check_model_fits(root: zarr.Group, slide_ids: list[str], model) -> None:
    """Refuse a model whose crop size or k does not match the store, before writing anything.

    Raises
    ------
    WsicellError
        A slide's crops are not ``(N, crop_size, crop_size, 3)``, or the slide already holds
        labels under this model id with another k.
    """
    for slide_id in slide_ids:
        shape = slide_crops(root, slide_id).shape
        if tuple(shape[1:]) != (model.crop_size, model.crop_size, 3):
            raise WsicellError(f"{root.store}: slide {slide_id} has crops of shape {shape[1:]}; "
                               f"model {model.model_id} takes {model.crop_size}x"
                               f"{model.crop_size} RGB crops")
        try:
            k = root[_labels_path(slide_id, model.model_id)].attrs.get("k")
        except KeyError:
            continue
        if k is not None and k != model.k:
            raise WsicellError(f"{root.store}: slide {slide_id} holds labels of model "
                               f"{model.model_id} with k={k}, but the model has k={model.k}")


@dataclass(frozen=True)
class ChunkTask:
    """Label crops ``[start, stop)`` of one slide (one crop chunk)."""

    store: str
    slide_id: str
    start: int
    stop: int


def _create_labels(root: zarr.Group, slide_id: str, model, config: WsicellConfig) -> zarr.Group:
    """(Re)create an empty, incomplete labels group chunked like the slide's crops."""
    slide = slide_group(root, slide_id)
    crops = slide["crops"]
    labels_root = slide.require_group(LABELS)
    if model.model_id in labels_root:
        del labels_root[model.model_id]
    group = labels_root.create_group(model.model_id)
    group.attrs.update({"status": "writing", "model_id": model.model_id, "k": model.k,
                        "n_cells": crops.shape[0], "slide_fingerprint": slide.attrs.get("fingerprint"),
                        "config": config.to_json(), "model_config": model.config.to_json(),
                        "wsicell_version": wsicell.__version__})
    chunk = crops.chunks[0]
    group.create_array("cluster", shape=(crops.shape[0],), chunks=(chunk,), dtype="int16",
                       fill_value=-1)
    group.create_array("proba", shape=(crops.shape[0], model.k), chunks=(chunk, model.k),
                       dtype="float32", fill_value=np.nan)
    return group


def _chunk_tasks(root: zarr.Group, store: str, slide_id: str) -> list[ChunkTask]:
    crops = slide_crops(root, slide_id)
    n, chunk = crops.shape[0], crops.chunks[0]
    return [ChunkTask(store, slide_id, start, min(start + chunk, n)) for start in range(0, n, chunk)]


def label_chunk(task: ChunkTask, model, batch_size: int) -> int:
    """Classify one chunk of crops and write its cluster / proba chunk; returns its size."""
    root = open_store(task.store, mode="r+")
    crops = slide_crops(root, task.slide_id)[task.start:task.stop]
    proba = model.classify(crops, batch_size=batch_size)
    if proba.shape != (len(crops), model.k):
        raise WsicellError(f"model {model.model_id}: Q returned shape {proba.shape} for "
                           f"{len(crops)} crops, expected k={model.k} columns")
    labels = root[_labels_path(task.slide_id, model.model_id)]
    labels["proba"][task.start:task.stop] = proba
    labels["cluster"][task.start:task.stop] = proba.argmax(axis=1).astype(np.int16)
    return task.stop - task.start


@functools.lru_cache(maxsize=2)
def _worker_model(model_dir: str, model_id: str, threads: int):
    """The model, loaded once per Dask worker process (CPU)."""
    import torch

    from wsicell.train import load_trained_model

    torch.set_num_threads(threads)
    model = load_trained_model(model_dir, device="cpu")
    if model.model_id != model_id:
        raise WsicellError(f"{model_dir}: the model changed during prediction "
                           f"({model_id} -> {model.model_id})")
    return model


def _label_chunk_on_worker(task: ChunkTask, model_dir: str, model_id: str, crops_per_batch: int,
                           threads: int) -> int:
    return label_chunk(task, _worker_model(model_dir, model_id, threads), crops_per_batch)


def label_slides(store: str | Path, slide_ids: list[str], model_dir: str | Path, model,
                 config: WsicellConfig, *, client=None, threads_per_worker: int = 1,
                 progress: bool = True) -> list[str]:
    """Write a model's labels for every listed slide that lacks complete ones.

    Parameters
    ----------
    store : path
        The cell store (complete slides only in ``slide_ids``).
    slide_ids : list of str
    model_dir : path
        Directory of ``model`` (Dask workers load it from there).
    model : TrainedModel
        The loaded model (its device is used when ``client`` is None).
    config : WsicellConfig
        Recorded with the labels; ``config.predict.batch_size`` crops per forward pass.
    client : distributed.Client, optional
        Run the chunk tasks on this Dask cluster (CPU); None runs them here, in order.
    threads_per_worker : int
        Torch threads of each Dask worker.

    Returns
    -------
    list of str
        The slides labelled by this call (empty when all were complete: a no-op).
    """
    store = str(store)
    root = open_store(store, mode="r+")
    check_model_fits(root, slide_ids, model)
    todo = [s for s in slide_ids if not labels_complete(root, s, model.model_id)]
    if not todo:
        return []
    with store_lock(store):
        tasks = []
        for slide_id in todo:
            _create_labels(root, slide_id, model, config)
            tasks += _chunk_tasks(root, store, slide_id)
        batch_size = config.predict.batch_size
        total = sum(t.stop - t.start for t in tasks)
        with tqdm(total=total, unit="cell", desc=f"label {len(todo)} slide(s)",
                  disable=not progress, dynamic_ncols=True) as bar:
            if client is None:
                for task in tasks:
                    bar.update(label_chunk(task, model, batch_size))
            else:
                from distributed import as_completed

                futures = client.map(_label_chunk_on_worker, tasks, model_dir=str(model_dir),
                                     model_id=model.model_id, crops_per_batch=batch_size,
                                     threads=threads_per_worker, pure=False)
                for future in as_completed(futures):
                    bar.update(future.result())
        for slide_id in todo:  # mark complete last
            root[_labels_path(slide_id, model.model_id)].attrs["status"] = COMPLETE
    return todo


# --- proportions of slides and regions -----------------------------------------------------

def _proportion_columns(counts: np.ndarray) -> dict:
    """``n_cells``, ``count_i`` and ``p_i`` columns from counts of shape (R, k)."""
    k = counts.shape[1]
    proportions = counts_to_proportions(counts)
    return {"n_cells": counts.sum(axis=1),
            **{f"count_{i}": counts[:, i] for i in range(k)},
            **{f"p_{i}": proportions[:, i] for i in range(k)}}


def proportion_columns(k: int) -> list[str]:
    """Names of the proportion columns ``p_0..p_{k-1}`` of the tables."""
    return [f"p_{i}" for i in range(k)]


@dataclass
class SlideProportions:
    """Counts of one slide: whole slide, regular grid, annotated regions."""

    slide_id: str
    counts: np.ndarray            # (k,) int64
    grid: RegionGrid
    grid_counts: np.ndarray       # (rows, cols, k) int64
    region_names: list[str]
    region_counts: np.ndarray     # (R, k) int64


def slide_proportions(root: zarr.Group, slide_id: str, model_id: str, k: int,
                      region_size_um: float, regions: list[PolygonRegion] | None = None
                      ) -> SlideProportions:
    """Count a slide's labelled cells per cluster: whole slide, grid and annotated regions."""
    slide = slide_group(root, slide_id)
    cluster, _ = read_labels(root, slide_id, model_id)
    cells = slide_cells(root, slide_id)
    x, y = cells["x"].to_numpy(), cells["y"].to_numpy()
    grid = RegionGrid.covering(int(slide.attrs["width"]), int(slide.attrs["height"]),
                               float(slide.attrs["mpp"]), region_size_um)
    regions = regions or []
    return SlideProportions(
        slide_id, cluster_counts(cluster, k), grid, grid_counts(x, y, cluster, k, grid),
        [r.name for r in regions],
        polygon_counts(x, y, cluster, k, regions) if regions else np.zeros((0, k), np.int64))


def write_region_grid(root: zarr.Group, slide_id: str, model_id: str, proportions: SlideProportions,
                      region_size_um: float, config: WsicellConfig) -> None:
    """Store the grid of proportions (rows, cols, k) float32 (NaN = no cell) beside the labels.

    Rewritten only when the region size or shape changed, and marked complete last.
    """
    group = root[_labels_path(slide_id, model_id)]
    counts = proportions.grid_counts
    if REGION_GRID in group:
        old = group[REGION_GRID]
        if old.attrs.get("status") == COMPLETE and old.shape == counts.shape \
                and old.attrs.get("region_size_um") == region_size_um:
            return
        del group[REGION_GRID]
    array = group.create_array(REGION_GRID, shape=counts.shape, dtype="float32",
                               chunks=counts.shape, fill_value=np.nan)
    array[:] = counts_to_proportions(counts).astype(np.float32)
    array.attrs.update({"region_size_um": region_size_um, "region_px": proportions.grid.region_px,
                        "dims": ["row", "col", "cluster"], "config": config.to_json(),
                        "wsicell_version": wsicell.__version__, "status": COMPLETE})


def proportion_tables(results: list[SlideProportions]) -> dict[str, pd.DataFrame]:
    """Tables of slide, grid-region and annotated-region counts and proportions.

    Returns
    -------
    dict with ``slides`` (one row per slide), ``grid`` (one row per grid region holding at
    least one cell; bounds in level-0 pixels) and ``annotations`` (one row per annotated
    region; empty when none was given).
    """
    slides = pd.DataFrame({"slide_id": [r.slide_id for r in results],
                           **_proportion_columns(np.stack([r.counts for r in results]))})
    grid_parts, annotation_parts = [], []
    for r in results:
        k = r.grid_counts.shape[-1]
        flat = r.grid_counts.reshape(-1, k)
        keep = flat.sum(axis=1) > 0
        rows, cols = np.divmod(np.arange(len(flat)), r.grid.shape[1])
        bounds = r.grid.bounds().reshape(-1, 4)
        grid_parts.append(pd.DataFrame({
            "slide_id": r.slide_id, "row": rows[keep], "col": cols[keep],
            "x0": bounds[keep, 0], "y0": bounds[keep, 1], "x1": bounds[keep, 2],
            "y1": bounds[keep, 3], **_proportion_columns(flat[keep])}))
        if r.region_names:
            annotation_parts.append(pd.DataFrame({"slide_id": r.slide_id, "region": r.region_names,
                                                  **_proportion_columns(r.region_counts)}))
    return {"slides": slides, "grid": pd.concat(grid_parts, ignore_index=True),
            "annotations": (pd.concat(annotation_parts, ignore_index=True)
                            if annotation_parts else pd.DataFrame())}


# --- the whole prediction run --------------------------------------------------------------

def regions_by_slide(path: str | Path | None, slide_ids: list[str]) -> dict[str, list[PolygonRegion]]:
    """Annotated regions per slide from a GeoJSON file or a directory of them.

    A file ``<slide_id>.geojson`` (or ``.json``) holds the regions of that slide; a single
    file of another name is accepted when exactly one slide is predicted.

    Raises
    ------
    WsicellError
        Missing path, a directory without GeoJSON, a file naming no predicted slide, or
        a file that is not polygon GeoJSON (see :func:`read_geojson_regions`).
    """
    if path is None:
        return {}
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".geojson", ".json"))
        if not files:
            raise WsicellError(f"{path}: no .geojson file in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise WsicellError(f"{path}: no such file or directory")
    if len(files) == 1 and len(slide_ids) == 1 and files[0].stem not in slide_ids:
        return {slide_ids[0]: read_geojson_regions(files[0])}
    unknown = [f.name for f in files if f.stem not in slide_ids]
    if unknown:
        raise WsicellError(f"{path}: {', '.join(unknown)} name(s) no predicted slide "
                           f"(expected <slide_id>.geojson; slides: {', '.join(slide_ids[:5])})")
    return {f.stem: read_geojson_regions(f) for f in files}


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def predict_slides(table: pd.DataFrame, k: int, config: WsicellConfig, labels: pd.Series | None,
                   classifier, out_dir: Path) -> tuple[pd.DataFrame, dict]:
    """Slide-level predictions from the slides' proportion vectors.

    k-means (k-means++) into ``config.predict.slide_clusters`` groups when there are enough
    slides; with ``labels``, stratified cross-validation of the linear SVM and an SVM fitted
    on all labelled slides (saved as ``slide_classifier.json``); with a loaded
    ``classifier``, its predictions.

    Returns
    -------
    predictions : DataFrame
        ``slide_id``, ``n_cells``, ``p_*``, ``kmeans_cluster``, ``kmeans_distance`` and, when
        available, ``label``, ``cv_predicted``, ``svm_class``, ``svm_score``.
    summary : dict
        What was fitted and the cross-validation figures.
    """
    cfg = config.predict
    proportions = table[proportion_columns(k)].fillna(0).to_numpy()
    predictions = table[["slide_id", "n_cells", *proportion_columns(k)]].copy()
    summary: dict = {}
    if len(table) >= cfg.slide_clusters:
        if len(np.unique(proportions, axis=0)) < cfg.slide_clusters:
            warnings.warn(f"fewer than {cfg.slide_clusters} distinct proportion vectors among "
                          f"the slides: some of the {cfg.slide_clusters} slide clusters are "
                          "duplicates", stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            kmeans = SlideKMeans.fit(proportions, cfg.slide_clusters, seed=config.train.seed)
        predictions["kmeans_cluster"], predictions["kmeans_distance"] = kmeans.assign(proportions)
        _write_json(out_dir / "slide_kmeans.json", kmeans.to_json())
        summary["kmeans"] = {"clusters": cfg.slide_clusters, "file": "slide_kmeans.json"}
    else:
        warnings.warn(f"{len(table)} slide(s): too few for {cfg.slide_clusters} slide clusters; "
                      "k-means of slides skipped", stacklevel=2)
    if labels is not None:
        predictions["label"] = predictions.slide_id.map(labels).fillna("")
        known = predictions.label != ""
        cv = cross_validate(proportions[known], predictions.label[known], cfg.folds,
                            seed=config.train.seed)
        predictions.loc[known, "cv_predicted"] = cv.pop("predicted")
        summary["cross_validation"] = cv
        classifier = SlideClassifier.fit(proportions[known], predictions.label[known],
                                         seed=config.train.seed)
        classifier.save(out_dir / "slide_classifier.json")
        summary["classifier"] = {"classes": list(classifier.classes), "file": "slide_classifier.json"}
    if classifier is not None:
        predictions["svm_class"], predictions["svm_score"] = classifier.predict(proportions)
    return predictions, summary


def run_prediction(slides_dir: str | Path, model_dir: str | Path, store: str | Path,
                   out_dir: str | Path, config: WsicellConfig | None = None, *,
                   regions: str | Path | None = None, labels: str | Path | None = None,
                   classifier: str | Path | None = None, device: str = "auto",
                   mpp: float | None = None, workers: int = 2, threads_per_worker: int = 1,
                   memory_limit: str = "4GB", scheduler: str | None = None,
                   progress: bool = True) -> Path:
    """Slides in, report out: ingest -> label cells -> proportions -> slide classes -> report.

    Slides of ``slides_dir`` not yet in the store are ingested (same Dask options as
    ``wsicell ingest``); every crop of those slides is labelled with the model's Q (Dask
    over crop chunks on CPU, in this process on a GPU); per-slide, grid-region and
    annotated-region proportions, slide predictions and pictures are written to
    ``out_dir``.  Every input is checked before anything is written to the store.

    Parameters
    ----------
    slides_dir : path
        Directory of slides / images.
    model_dir : path
        A trained model directory (``wsicell train --out``).
    store : path
        The cell store (created when missing).
    out_dir : path
        Results directory (created).
    config : WsicellConfig, optional
        ``config.predict`` holds region size, slide clusters, folds and batch size.
    regions : path, optional
        GeoJSON polygon annotations (see :func:`regions_by_slide`).
    labels : path, optional
        ``slide_id,label`` CSV: trains and cross-validates the slide SVM.
    classifier : path, optional
        A ``slide_classifier.json`` saved by an earlier run, applied to these slides.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    mpp, workers, threads_per_worker, memory_limit, scheduler :
        Ingest / Dask options (as ``wsicell ingest``).

    Returns
    -------
    Path of ``report.html`` in ``out_dir``.
    """
    from wsicell.ingest import dask_client, ingest
    from wsicell.train import load_trained_model, resolve_device

    config = config or WsicellConfig()
    slides_dir, out_dir = Path(slides_dir), Path(out_dir)
    _check_slides_dir(slides_dir)
    if labels is not None and classifier is not None:
        raise WsicellError(f"{labels}: give either --labels (train a slide classifier) or "
                           "--classifier (apply a saved one), not both")
    torch_device = resolve_device(device)
    model = load_trained_model(model_dir, device=torch_device)
    saved_classifier = SlideClassifier.load(classifier) if classifier is not None else None
    if saved_classifier is not None and saved_classifier.n_features != model.k:
        raise WsicellError(f"{classifier}: trained on {saved_classifier.n_features} cell types, "
                           f"but model {model.model_id} has k={model.k}")

    slide_ids = ingest([slides_dir], store, config, mpp=mpp, workers=workers,
                       threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                       scheduler=scheduler, progress=progress)
    root = open_store(store, mode="r")
    check_model_fits(root, slide_ids, model)
    slide_labels = read_slide_labels(labels, slide_ids) if labels is not None else None
    slide_regions = regions_by_slide(regions, slide_ids)
    pending = [s for s in slide_ids if not labels_complete(root, s, model.model_id)]
    if pending and torch_device.type == "cpu":
        with dask_client(workers, threads_per_worker, memory_limit, scheduler, progress) as client:
            label_slides(store, pending, model_dir, model, config, client=client,
                         threads_per_worker=threads_per_worker, progress=progress)
    elif pending:
        label_slides(store, pending, model_dir, model, config, progress=progress)

    out_dir.mkdir(parents=True, exist_ok=True)
    root = open_store(store, mode="r+")
    region_size = config.predict.region_size_um
    results = [slide_proportions(root, s, model.model_id, model.k, region_size,
                                 slide_regions.get(s)) for s in slide_ids]
    with store_lock(store):
        for result in results:
            write_region_grid(root, result.slide_id, model.model_id, result, region_size, config)
    tables = proportion_tables(results)
    _write_table(tables["slides"], out_dir, "slide_proportions")
    _write_table(tables["grid"], out_dir, "grid_proportions")
    if len(tables["annotations"]):
        _write_table(tables["annotations"], out_dir, "annotation_proportions")
    predictions, summary = predict_slides(tables["slides"], model.k, config, slide_labels,
                                          saved_classifier, out_dir)
    _write_table(predictions, out_dir, "slide_predictions")
    provenance = {"wsicell_version": wsicell.__version__, "model_id": model.model_id,
                  "k": model.k, "model_dir": str(Path(model_dir).resolve()),
                  "store": str(Path(store).resolve()), "slides": slide_ids,
                  "slide_prediction": summary, "config": config.to_json()}
    _write_json(out_dir / "prediction.json", provenance)
    from wsicell.report import write_prediction_report

    return write_prediction_report(out_dir, root, model, results, predictions, summary, provenance)
