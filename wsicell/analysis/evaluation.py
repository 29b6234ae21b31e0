"""Evaluation of cell clusters and slide predictions against user annotations.

Cell classes come as one points CSV per slide (``x,y,label``, level-0 pixels, named by
the slide id / image stem); each annotated point is matched one-to-one to a detected cell
within a radius (:func:`wsicell.analysis.metrics.match_points`), and the matched cells are
clustered twice: by the GAN's Q head and by the hand-made-feature baseline ("MF +
k-means"), so the two are always reported side by side.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support

from wsicell.analysis.cluster_descriptions import cells_descriptions, confusion_table
from wsicell.analysis.metrics import clustering_score, match_points
from wsicell.analysis.slide_classes import read_slide_labels
from wsicell.errors import WsicellError
from wsicell.io.points import read_points
from wsicell.io.store import complete_slides, open_store, slide_cells, slide_crops
from wsicell.learning.baseline import baseline_clusters
from wsicell.learning.saved_model import load_trained_model


def matched_rows(store: str | Path, points_dir: str | Path, radius: float) -> pd.DataFrame:
    """The detected cells matched one-to-one to annotated points, and their labels.

    Parameters
    ----------
    store : path
        The cell store.
    points_dir : path
        Directory of ``<slide_id>.csv`` points files; files naming no complete slide of
        the store are skipped with a warning.
    radius : float
        Largest cell-to-point distance of a match, level-0 pixels.

    Returns
    -------
    DataFrame
        One row per match, slide by slide in file order and by cell within a slide:
        ``slide_id`` (categorical; its categories are all the slides with a points file,
        matched or not), ``cell`` (row of the slide's cell table and crops), ``label`` (str).

    Raises
    ------
    WsicellError
        No points directory or file, or no file named like a complete slide.
    """
    points_dir = Path(points_dir)
    if not points_dir.is_dir():
        raise WsicellError(f"{points_dir}: not a directory of points CSV files")
    files = sorted(points_dir.glob("*.csv"))
    if not files:
        raise WsicellError(f"{points_dir}: no .csv points file")
    root = open_store(store)
    slides = set(complete_slides(root))
    known = [f for f in files if f.stem in slides]
    if len(known) < len(files):
        unknown = [f.name for f in files if f.stem not in slides]
        warnings.warn(f"{points_dir}: {len(unknown)} points file(s) name no complete slide of "
                      f"the store and are skipped ({', '.join(unknown[:3])}...)", stacklevel=2)
    if not known:
        raise WsicellError(f"{points_dir}: no points file is named like a complete slide of {store}")
    parts = []
    for path in known:
        points = read_points(path)
        cells = slide_cells(root, path.stem)
        pairs = match_points(cells[["x", "y"]].to_numpy(), points[["x", "y"]].to_numpy(), radius)
        pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
        parts.append(pd.DataFrame({"slide_id": path.stem, "cell": pairs[:, 0],
                                   "label": points.label.to_numpy()[pairs[:, 1]].astype(str)}))
    rows = pd.concat(parts, ignore_index=True)
    rows["slide_id"] = pd.Categorical(rows.slide_id, categories=[f.stem for f in known])
    return rows


def matched_cells(store: str | Path, points_dir: str | Path, radius: float
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Crops of the detected cells matched to annotated points, with their labels.

    Parameters
    ----------
    store, points_dir, radius
        As :func:`matched_rows`.

    Returns
    -------
    crops : ndarray, shape (M, S, S, 3), uint8
    labels : ndarray, shape (M,), str
    matched : dict
        Matched cells per slide (slides with points files).
    """
    rows = matched_rows(store, points_dir, radius)
    if rows.empty:
        raise WsicellError(f"{points_dir}: no annotated point lies within {radius:g} px of a "
                           "detected cell")
    root = open_store(store)
    matched = rows.groupby("slide_id", observed=False).cell.apply(np.asarray)
    crops = [slide_crops(root, s).oindex[cells] for s, cells in matched.items() if len(cells)]
    return (np.concatenate(crops), rows.label.to_numpy(),
            {s: len(cells) for s, cells in matched.items()})


def evaluate_clustering(store: str | Path, model_dir: str | Path, points_dir: str | Path,
                        radius: float, device: str = "cpu", seed: int = 0) -> dict:
    """Purity / entropy / F-score of the GAN's clusters and of the baseline's.

    Both cluster the same matched cells into the model's k clusters.

    Returns
    -------
    dict
        ``{"gan": {purity, entropy, fscore, n_cells}, "baseline": {...}, "matched": M,
        "slides": {slide_id: matched}, "k": k, "radius": radius, "model_id": ...}``;
        ``"types"``: the annotated types, sorted; ``"confusion"``: per method (``gan``,
        ``baseline``), one record per cluster ``{"cluster", <type>: cells, ..., "cells",
        "majority", "share"}`` (:func:`~wsicell.analysis.cluster_descriptions.confusion_table`);
        ``"descriptions"``: per GAN cluster, its matched nuclei in words ("small, round,
        dark", :func:`~wsicell.analysis.cluster_descriptions.cells_descriptions`).
    """
    model = load_trained_model(model_dir, device=device)
    crops, labels, per_slide = matched_cells(store, points_dir, radius)
    if crops.shape[1:] != (model.crop_size, model.crop_size, 3):
        raise WsicellError(f"{store}: crops of shape {crops.shape[1:]}; model {model.model_id} "
                           f"takes {model.crop_size}x{model.crop_size} RGB crops")
    if len(crops) < model.k:
        raise WsicellError(f"{points_dir}: only {len(crops)} matched cells for k={model.k} clusters")
    gan = model.classify(crops).argmax(axis=1)
    baseline = baseline_clusters(crops, model.k, seed=seed)
    with warnings.catch_warnings():  # matched_cells warned of skipped files already
        warnings.simplefilter("ignore")
        rows = matched_rows(store, points_dir, radius)
    described = cells_descriptions(open_store(store), rows.slide_id.astype(str).to_numpy(),
                                   rows.cell.to_numpy(), gan, model.k)
    confusion = {name: confusion_table(clusters, labels, model.k)
                 for name, clusters in (("gan", gan), ("baseline", baseline))}
    return {"gan": clustering_score(gan, labels).as_dict(),
            "baseline": clustering_score(baseline, labels).as_dict(),
            "types": sorted(set(labels.tolist())),
            "confusion": {name: table.reset_index().to_dict(orient="records")
                          for name, table in confusion.items()},
            "descriptions": described.description.tolist(),
            "matched": int(len(crops)), "slides": per_slide, "k": model.k,
            "radius": radius, "model_id": model.model_id}


def evaluate_slide_predictions(predictions: str | Path, labels: str | Path) -> dict:
    """Slide labels against the predictions of ``wsicell predict``.

    Parameters
    ----------
    predictions : path
        ``slide_predictions.csv`` or the results directory holding it.
    labels : path
        ``slide_id,label`` CSV.

    Returns
    -------
    dict
        ``kmeans``: purity / entropy / F-score of the slide clusters against the labels;
        ``svm`` and ``cross_validation`` (when those columns exist): precision, recall,
        F-score (support-weighted); ``n_slides``.
    """
    path = Path(predictions)
    path = path / "slide_predictions.csv" if path.is_dir() else path
    try:
        table = pd.read_csv(path, dtype={"slide_id": str, "svm_class": str, "cv_predicted": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise WsicellError(f"{path}: not a readable slide predictions CSV ({err})") from None
    if "slide_id" not in table:
        raise WsicellError(f"{path}: no slide_id column (not written by wsicell predict?)")
    truth = read_slide_labels(labels, table.slide_id.tolist())
    table = table.set_index("slide_id").loc[truth.index]
    result: dict = {"n_slides": int(len(truth))}
    if "kmeans_cluster" in table:
        result["kmeans"] = clustering_score(table.kmeans_cluster.to_numpy(),
                                            truth.to_numpy()).as_dict()
    for column, name in (("svm_class", "svm"), ("cv_predicted", "cross_validation")):
        if column in table and table[column].notna().all():
            p, r, f, _ = precision_recall_fscore_support(truth.to_numpy(), table[column].to_numpy(),
                                                         average="weighted", zero_division=0)
            result[name] = {"precision": float(p), "recall": float(r), "fscore": float(f)}
    return result
