"""What each cell cluster is, in a pathologist's words, from the measured nuclei.

Each nucleus is measured from what the store keeps: its area (the cell table's ``area``,
um^2), its roundness (``minor_axis_um / major_axis_um``, the axes of the ellipse with the
same second moments as its mask, measured at ingest; 1 = a disc) and its stain (the cell table's
``mean_hematoxylin``, 0..255, lower = more hematoxylin = darker).  Each measure is turned
into a rank **within its own slide** (0 = the smallest / most elongated / palest nucleus of
the slide, 1 = the largest / roundest / darkest), so that a slide stained darker or scanned
differently is described by its own standard; a cluster is described by the medians of
its cells' ranks: "small, round, dark" is a cluster whose typical nucleus is in the lower
part of its slide's areas and the upper part of its roundness and darkness.

:func:`confusion_table` counts clusters against annotated types (``wsicell evaluate
clustering``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from wsicell.io.store import read_labels, slide_cells, slide_masks

#: A cluster's median rank below LOW gets the first word, above HIGH the last, else the middle.
LOW, HIGH = 0.4, 0.6
#: The cell-table columns a description reads.
MEASURED = ["area", "mean_hematoxylin", "major_axis_um", "minor_axis_um"]
WORDS = {"area": ("small", "medium-sized", "large"),
         "roundness": ("elongated", "oval", "round"),
         "darkness": ("pale", "medium-stained", "dark")}


def axis_ratio(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """Roundness of nuclei: minor / major axis of their inertia ellipses.

    Parameters
    ----------
    major, minor : ndarray, shape (N,), float
        Axis lengths in any one unit (the cell table's ``major_axis_um`` / ``minor_axis_um``,
        or :func:`wsicell.segmentation.measurements.inertia_axes` of masks).

    Returns
    -------
    ndarray, shape (N,), float64
        In [0, 1]: 1 for a disc, near 0 for a line; NaN where the major axis is 0 or NaN.

    Examples
    --------
    >>> axis_ratio(np.array([8.0, 12.0, 0.0]), np.array([8.0, 4.0, 0.0])).round(2).tolist()
    [1.0, 0.33, nan]
    """
    major, minor = np.asarray(major, dtype=np.float64), np.asarray(minor, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(major > 0, minor / major, np.nan)


def slide_ranks(values: np.ndarray, slides: np.ndarray) -> np.ndarray:
    """Rank of each value within its slide, scaled to [0, 1] (ties share their mean rank;
    a slide of one cell ranks it 0.5; NaN stays NaN).

    Examples
    --------
    >>> slide_ranks(np.array([1.0, 5.0, 3.0, 10.0, 20.0]), np.array(["a", "a", "a", "b", "b"]))
    array([0. , 1. , 0.5, 0. , 1. ])
    """
    table = pd.DataFrame({"value": values, "slide": slides})
    groups = table.groupby("slide", sort=False).value
    rank, size = groups.rank(method="average"), groups.transform("count")
    return np.where(size > 1, (rank - 1) / (size - 1).clip(lower=1), 0.5)


def words_for(rank: float, words: tuple[str, str, str]) -> str:
    """The word of a median rank: ``words[0]`` below :data:`LOW`, ``words[2]`` above
    :data:`HIGH`, else ``words[1]``; empty for NaN."""
    if np.isnan(rank):
        return ""
    return words[0] if rank < LOW else words[2] if rank > HIGH else words[1]


def describe_clusters(clusters: np.ndarray, slides: np.ndarray, area_um2: np.ndarray,
                      roundness: np.ndarray, hematoxylin: np.ndarray, k: int) -> pd.DataFrame:
    """Each cluster's typical nucleus, measured and relative to its slide.

    Parameters
    ----------
    clusters : ndarray, shape (N,), int
        Cluster of each cell, 0..k-1.
    slides : ndarray, shape (N,)
        Slide of each cell (ranks are taken within a slide).
    area_um2, roundness, hematoxylin : ndarray, shape (N,), float
        Nucleus area (um^2), :func:`axis_ratio` and mean hematoxylin (0..255, lower =
        darker) of each cell.
    k : int
        Number of clusters (clusters without a cell get an empty row).

    Returns
    -------
    DataFrame, one row per cluster 0..k-1
        ``cells``, the medians ``area_um2``, ``roundness``, ``hematoxylin``, the median
        ranks ``area_rank``, ``roundness_rank``, ``darkness_rank`` (0..1 within the slide)
        and ``description`` ("small, round, dark").

    Examples
    --------
    >>> d = describe_clusters(np.array([0, 0, 1, 1]), np.zeros(4), np.array([10., 12, 40, 50]),
    ...                       np.array([.9, .95, .4, .5]), np.array([60., 70, 150, 160]), 2)
    >>> d.description.tolist()
    ['small, round, dark', 'large, elongated, pale']
    """
    clusters = np.asarray(clusters, dtype=np.int64)
    table = pd.DataFrame({
        "cluster": clusters, "area_um2": area_um2, "roundness": roundness,
        "hematoxylin": hematoxylin,
        "area_rank": slide_ranks(np.asarray(area_um2, np.float64), slides),
        "roundness_rank": slide_ranks(np.asarray(roundness, np.float64), slides),
        "darkness_rank": slide_ranks(-np.asarray(hematoxylin, np.float64), slides)})
    medians = table.groupby("cluster").median().reindex(range(k))
    medians.insert(0, "cells", np.bincount(clusters, minlength=k)[:k])
    medians["description"] = [
        ", ".join(w for w in (words_for(row.area_rank, WORDS["area"]),
                              words_for(row.roundness_rank, WORDS["roundness"]),
                              words_for(row.darkness_rank, WORDS["darkness"])) if w)
        for row in medians.itertuples()]
    medians.index.name = "cluster"
    return medians


def sample_in_chunks(n: int, chunk: int, most: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted rows ``0..n-1`` to read: all of them when ``n <= most``, else ``most`` random
    rows of whole random chunks of ``chunk`` rows (a bounded number of chunks is decoded).

    Examples
    --------
    >>> rows = sample_in_chunks(100, 10, 25, np.random.default_rng(0))
    >>> len(rows), len(np.unique(rows // 10))
    (25, 3)
    """
    if n <= most:
        return np.arange(n)
    order = rng.permutation(-(-n // chunk))
    rows = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, n)) for c in order])
    return np.sort(rows[:most])


def store_cluster_descriptions(root, slide_ids: list[str], model_id: str, k: int,
                               max_cells: int = 5000, seed: int = 0) -> pd.DataFrame:
    """:func:`describe_clusters` of the cells a model labelled in a store.

    Areas, stain and roundness come from the cell tables (the measurements of ingest), for
    up to ``max_cells`` cells per slide (all of a smaller slide; else those of random whole
    chunks, :func:`sample_in_chunks`), the cells whose ranks are taken.

    Parameters
    ----------
    root : zarr.Group
        The cell store (``wsicell.io.store.open_store``).
    slide_ids : list of str
        Slides with complete labels of ``model_id``.
    model_id : str
    k : int
    max_cells, seed : int
        Cells measured per slide, and the seed of their random choice.

    Returns
    -------
    DataFrame as :func:`describe_clusters`; ``cells`` counts the measured cells.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for slide_id in slide_ids:
        cluster, _ = read_labels(root, slide_id, model_id)
        chunk = slide_masks(root, slide_id).chunks[0]
        chosen = sample_in_chunks(len(cluster), chunk, max_cells, rng)
        cells = slide_cells(root, slide_id, MEASURED).iloc[chosen]
        parts.append(pd.DataFrame({"slide": slide_id, "cluster": cluster[chosen],
                                   "area": cells.area.to_numpy(np.float64),
                                   "hematoxylin": cells.mean_hematoxylin.to_numpy(np.float64),
                                   "roundness": axis_ratio(cells.major_axis_um,
                                                           cells.minor_axis_um)}))
    every = pd.concat(parts, ignore_index=True)
    return describe_clusters(every.cluster.to_numpy(), every.slide.to_numpy(),
                             every.area.to_numpy(), every.roundness.to_numpy(),
                             every.hematoxylin.to_numpy(), k)


def cells_descriptions(root, slide_of: np.ndarray, cell_of: np.ndarray, clusters: np.ndarray,
                       k: int) -> pd.DataFrame:
    """:func:`describe_clusters` of chosen cells of a store (e.g. those matched to
    annotations): ``slide_of`` / ``cell_of`` (N,) name each cell (slide id, row of its slide),
    ``clusters`` (N,) its cluster; ranks are taken among the chosen cells of each slide."""
    slide_of, cell_of = np.asarray(slide_of).astype(str), np.asarray(cell_of, dtype=np.int64)
    area, stain, roundness = (np.full(len(cell_of), np.nan) for _ in range(3))
    for slide_id in np.unique(slide_of):
        where = np.flatnonzero(slide_of == slide_id)
        order = where[np.argsort(cell_of[where], kind="stable")]
        rows = cell_of[order]
        cells = slide_cells(root, slide_id, MEASURED).iloc[rows]
        area[order] = cells.area.to_numpy(np.float64)
        stain[order] = cells.mean_hematoxylin.to_numpy(np.float64)
        roundness[order] = axis_ratio(cells.major_axis_um, cells.minor_axis_um)
    return describe_clusters(clusters, slide_of, area, roundness, stain, k)


def confusion_table(clusters: np.ndarray, labels: np.ndarray, k: int) -> pd.DataFrame:
    """Cells of each cluster (rows 0..k-1) per annotated type (columns, sorted), with the
    row's total, its majority type and that type's share of the row.

    Examples
    --------
    >>> confusion_table(np.array([0, 0, 1]), np.array(["a", "b", "b"]), 3).to_dict("list")
    {'a': [1, 0, 0], 'b': [1, 1, 0], 'cells': [2, 1, 0], 'majority': ['a', 'b', ''], 'share': [0.5, 1.0, 0.0]}
    """
    table = pd.crosstab(pd.Series(np.asarray(clusters), name="cluster"),
                        pd.Series(np.asarray(labels), name="type"))
    table = table.reindex(range(k), fill_value=0).sort_index(axis=1)
    table.columns.name = None
    counts = table.to_numpy()
    cells = counts.sum(axis=1)
    table["cells"] = cells
    table["majority"] = [str(table.columns[i]) if n else "" for i, n in
                         zip(counts.argmax(axis=1), cells)]
    table["share"] = np.where(cells > 0, counts.max(axis=1) / np.maximum(cells, 1), 0.0)
    return table
