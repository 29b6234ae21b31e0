"""Cell-type proportions of slides and regions (method section 3).

Pure, vectorised kernels on cell coordinates and cluster labels, plus the reader of
region polygons (QuPath GeoJSON annotation exports).  For a slide with cluster counts
``X_1..X_k`` the proportions are ``P_i = X_i / sum(X)``; the same holds per region of a
regular grid (side in microns) or per annotated polygon.

Coordinates are level-0 pixels of the slide (``x`` = column, ``y`` = row), as in the cell
store and in QuPath exports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity, make_valid

from wsicell.errors import WsicellError
from wsicell.files import read_json


def cluster_counts(clusters: np.ndarray, k: int) -> np.ndarray:
    """Cells per cluster.

    Parameters
    ----------
    clusters : ndarray, shape (N,), int
        Cluster of each cell, in ``0..k-1``.
    k : int
        Number of clusters.

    Returns
    -------
    ndarray, shape (k,), int64
        ``X_i``, the number of cells in cluster ``i``.
    """
    return np.bincount(np.asarray(clusters, dtype=np.int64), minlength=k)[:k]


def counts_to_proportions(counts: np.ndarray) -> np.ndarray:
    """Proportions ``P_i = X_i / sum(X)`` along the last axis.

    Parameters
    ----------
    counts : ndarray, shape (..., k), int
        Cells per cluster of each slide / region.

    Returns
    -------
    ndarray, shape (..., k), float64
        Proportions summing to 1 along the last axis; NaN where there is no cell.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts / total, np.nan)


@dataclass(frozen=True)
class RegionGrid:
    """A regular grid of square regions over a slide's level-0 pixels.

    Attributes
    ----------
    region_px : float
        Side of a region, level-0 pixels (``region_size_um / mpp``).
    shape : tuple of int
        ``(rows, columns)`` of regions, enough to cover ``width x height`` pixels.
    """

    region_px: float
    shape: tuple[int, int]

    @classmethod
    def covering(cls, width: int, height: int, mpp: float, region_size_um: float) -> "RegionGrid":
        """The grid of ``region_size_um`` squares covering a ``width x height`` px slide."""
        if mpp <= 0 or region_size_um <= 0:
            raise ValueError("mpp and region size must be positive")
        region_px = region_size_um / mpp
        return cls(region_px, (max(1, math.ceil(height / region_px)),
                               max(1, math.ceil(width / region_px))))

    def region_index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row and column of the region holding each point (clipped to the grid).

        Parameters
        ----------
        x, y : ndarray, shape (N,), float
            Level-0 pixel coordinates.

        Returns
        -------
        rows, cols : ndarray, shape (N,), int64
        """
        rows = np.clip((np.asarray(y) // self.region_px).astype(np.int64), 0, self.shape[0] - 1)
        cols = np.clip((np.asarray(x) // self.region_px).astype(np.int64), 0, self.shape[1] - 1)
        return rows, cols

    def bounds(self) -> np.ndarray:
        """Level-0 pixel bounds ``[x0, y0, x1, y1]`` of every region, shape (rows, cols, 4)."""
        rows, cols = np.meshgrid(np.arange(self.shape[0]), np.arange(self.shape[1]), indexing="ij")
        return np.stack([cols, rows, cols + 1, rows + 1], axis=-1) * self.region_px


def grid_counts(x: np.ndarray, y: np.ndarray, clusters: np.ndarray, k: int,
                grid: RegionGrid) -> np.ndarray:
    """Cells per cluster in every region of a regular grid.

    One ``np.bincount`` over the flattened ``(row, col, cluster)`` index: linear in the
    number of cells (10^6 cells take a few tens of milliseconds).

    Parameters
    ----------
    x, y : ndarray, shape (N,), float
        Level-0 pixel coordinates of the cells.
    clusters : ndarray, shape (N,), int
        Cluster of each cell, in ``0..k-1``.
    k : int
        Number of clusters.
    grid : RegionGrid

    Returns
    -------
    ndarray, shape (rows, cols, k), int64
    """
    rows, cols = grid.region_index(x, y)
    flat = (rows * grid.shape[1] + cols) * k + np.asarray(clusters, dtype=np.int64)
    n_bins = grid.shape[0] * grid.shape[1] * k
    return np.bincount(flat, minlength=n_bins).reshape(grid.shape[0], grid.shape[1], k)


@dataclass(frozen=True)
class PolygonRegion:
    """A named annotated region, level-0 pixel coordinates.

    Attributes
    ----------
    name : str
        The annotation's name (or classification, or ``annotation_<i>``).
    geometry : shapely Polygon or MultiPolygon
        Valid (:attr:`is_valid`), holes excluded from the region.
    """

    name: str
    geometry: BaseGeometry

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which points lie inside the region (its interior; holes excluded).

        Parameters
        ----------
        x, y : ndarray, shape (N,), float

        Returns
        -------
        ndarray, shape (N,), bool

        Examples
        --------
        >>> from shapely.geometry import box
        >>> PolygonRegion("r", box(0, 0, 10, 10)).contains(np.array([5.0, 15.0]),
        ...                                                 np.array([5.0, 5.0])).tolist()
        [True, False]
        """
        return shapely.contains_xy(self.geometry, np.asarray(x, np.float64),
                                   np.asarray(y, np.float64))


def polygon_counts(x: np.ndarray, y: np.ndarray, clusters: np.ndarray, k: int,
                   regions: list[PolygonRegion]) -> np.ndarray:
    """Cells per cluster inside each annotated region (a cell may be in several).

    Parameters
    ----------
    x, y : ndarray, shape (N,), float
        Level-0 pixel coordinates of the cells.
    clusters : ndarray, shape (N,), int
    k : int
    regions : list of PolygonRegion

    Returns
    -------
    ndarray, shape (len(regions), k), int64
    """
    counts = np.zeros((len(regions), k), dtype=np.int64)
    for i, region in enumerate(regions):
        counts[i] = cluster_counts(np.asarray(clusters)[region.contains(x, y)], k)
    return counts


def _features(data, path: Path) -> list:
    if isinstance(data, list):  # QuPath's "export as array"
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise WsicellError(f"{path}: the FeatureCollection's features are not a list")
        return features
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    raise WsicellError(f"{path}: not a GeoJSON Feature, FeatureCollection or feature list")


def _region_geometry(geometry, path: Path, where: str, fix: bool) -> BaseGeometry:
    """A feature's geometry as a valid shapely (multi)polygon, or a one-line error."""
    if not isinstance(geometry, dict):
        raise WsicellError(f"{path}: {where} has no geometry object")
    kind = geometry.get("type")
    if kind not in ("Polygon", "MultiPolygon"):
        raise WsicellError(f"{path}: {where} is a {kind} geometry; regions must be "
                           "Polygon or MultiPolygon annotations")
    try:
        polygon = shape(geometry)
        coordinates = shapely.get_coordinates(polygon)
    except Exception:  # noqa: BLE001 - any malformed coordinate structure
        raise WsicellError(f"{path}: {where} has malformed polygon coordinates") from None
    if polygon.is_empty:
        raise WsicellError(f"{path}: {where} has an empty polygon")
    if not np.isfinite(coordinates).all():
        raise WsicellError(f"{path}: {where} has coordinates that are not finite numbers")
    if polygon.is_valid:
        return polygon
    if not fix:
        raise WsicellError(f"{path}: {where} is not a valid polygon "
                           f"({explain_validity(polygon)}); fix it in QuPath, or pass "
                           "--fix-regions to repair it")
    repaired = make_valid(polygon)
    parts = [g for g in getattr(repaired, "geoms", [repaired])
             if g.geom_type in ("Polygon", "MultiPolygon")]
    if not parts:
        raise WsicellError(f"{path}: {where} has no area once repaired")
    return shapely.union_all(parts)


def _ring_points(geometry: dict) -> bool:
    """Whether every ring of a GeoJSON polygon geometry has at least 3 distinct points."""
    polygons = ([geometry["coordinates"]] if geometry.get("type") == "Polygon"
                else geometry.get("coordinates") or [])
    try:
        return all(len({tuple(p[:2]) for p in ring}) >= 3 for rings in polygons
                   for ring in rings)
    except TypeError:
        return True  # malformed: reported by _region_geometry


def read_geojson_regions(path: str | Path, fix: bool = False) -> list[PolygonRegion]:
    """Read annotated regions from a GeoJSON file (QuPath "Export objects as GeoJSON").

    Parameters
    ----------
    path : str or Path
        A FeatureCollection, a single Feature, or a JSON list of Features whose geometries
        are Polygon or MultiPolygon in level-0 pixel coordinates.
    fix : bool
        Repair invalid polygons (self-intersections, ...) with shapely's ``make_valid``
        instead of refusing them.

    Returns
    -------
    list of PolygonRegion
        One per feature, named by ``properties.name``, else its classification's name,
        else ``annotation_<i>``.

    Raises
    ------
    WsicellError
        When the file is missing, not JSON (or nested too deeply), holds no feature, a
        feature that is not an object, a geometry that is not a (multi)polygon, malformed
        or non-finite coordinates, or an invalid polygon (``fix`` off); one line each.
    """
    path = Path(path)
    data = read_json(path, "GeoJSON file")
    features = _features(data, path)
    if not features:
        raise WsicellError(f"{path}: contains no feature")
    regions = []
    for i, feature in enumerate(features):
        where = f"feature {i}"
        if not isinstance(feature, dict):
            raise WsicellError(f"{path}: {where} is not a GeoJSON object")
        geometry = feature.get("geometry")
        if isinstance(geometry, dict) and not _ring_points(geometry):
            raise WsicellError(f"{path}: {where} has a polygon ring with fewer than 3 points")
        polygon = _region_geometry(geometry, path, where, fix)
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise WsicellError(f"{path}: {where} has properties that are not an object")
        classification = properties.get("classification") or {}
        name = properties.get("name") or (classification.get("name")
                                          if isinstance(classification, dict) else None)
        regions.append(PolygonRegion(str(name or f"annotation_{i}"), polygon))
    return regions


#: A cluster holding more than this share of all cells is reported as a collapse.
DOMINANT_SHARE = 0.8


def cluster_warnings(counts: np.ndarray) -> list[str]:
    """Plain sentences about degenerate cell types: empty clusters, and one cluster holding
    more than :data:`DOMINANT_SHARE` of all cells (the model's clusters collapsed).

    Parameters
    ----------
    counts : ndarray, shape (k,), int
        Cells per cluster over all slides.

    Examples
    --------
    >>> cluster_warnings(np.array([90, 10, 0]))  # doctest: +NORMALIZE_WHITESPACE
    ['Cluster 2 holds no cell: the model sorts these slides into 2 of its 3 cell types.',
     'Cluster 0 holds 90% of all cells: the model tells few cell types apart in these
     slides (a short training run can do this).']
    """
    counts = np.asarray(counts)
    k, total = len(counts), int(counts.sum())
    notes = []
    empty = [str(c) for c in range(k) if counts[c] == 0]
    if empty:
        notes.append(f"{'Cluster' if len(empty) == 1 else 'Clusters'} {', '.join(empty)} "
                     f"{'holds' if len(empty) == 1 else 'hold'} no cell: the model sorts these "
                     f"slides into {k - len(empty)} of its {k} cell types.")
    if total and counts.max() > DOMINANT_SHARE * total:
        top = int(counts.argmax())
        notes.append(f"Cluster {top} holds {100 * counts[top] / total:.0f}% of all cells: the "
                     "model tells few cell types apart in these slides (a short training run "
                     "can do this).")
    return notes


def region_warnings(slide_id: str, regions: list[PolygonRegion], counts: np.ndarray,
                    slide_size: tuple[int, int]) -> list[str]:
    """What a user should know about a slide's regions: those outside the slide and those
    that hold no cell.

    Parameters
    ----------
    slide_id : str
    regions : list of PolygonRegion
    counts : ndarray, shape (len(regions), k), int
        Cells per cluster in each region.
    slide_size : (width, height)
        Level-0 pixels.
    """
    width, height = slide_size
    slide = shapely.box(0, 0, width, height)
    warnings = []
    for region, row in zip(regions, counts):
        if not region.geometry.intersects(slide):
            warnings.append(f"slide {slide_id}: region {region.name!r} lies outside the slide "
                            f"({width} x {height} px): check the GeoJSON is this slide's")
        elif row.sum() == 0:
            warnings.append(f"slide {slide_id}: region {region.name!r} covers no cell")
    return warnings


def regions_by_slide(path: str | Path | None, slide_ids: list[str], fix: bool = False
                     ) -> dict[str, list[PolygonRegion]]:
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
        return {slide_ids[0]: read_geojson_regions(files[0], fix)}
    unknown = [f.name for f in files if f.stem not in slide_ids]
    if unknown:
        raise WsicellError(f"{path}: {', '.join(unknown)} name(s) no predicted slide "
                           f"(expected <slide_id>.geojson; slides: {', '.join(slide_ids[:5])})")
    return {f.stem: read_geojson_regions(f, fix) for f in files}


# --- proportions of slides and regions ----------------------------------------------------

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

    def proportion_grid(self) -> np.ndarray:
        """The grid's proportions, (rows, cols, k) float32, NaN where a region has no cell."""
        return counts_to_proportions(self.grid_counts).astype(np.float32)


def slide_proportions(slide_id: str, x: np.ndarray, y: np.ndarray, cluster: np.ndarray, k: int,
                      slide_size: tuple[int, int], mpp: float, region_size_um: float,
                      regions: list[PolygonRegion] | None = None) -> SlideProportions:
    """Count a slide's labelled cells per cluster: whole slide, grid and annotated regions.

    Parameters
    ----------
    slide_id : str
    x, y : ndarray, shape (N,), float
        Level-0 pixel coordinates of the cells.
    cluster : ndarray, shape (N,), int
        Cluster of each cell, in ``0..k-1``.
    k : int
    slide_size : (width, height)
        Level-0 pixels.
    mpp : float
        Level-0 microns per pixel.
    region_size_um : float
        Side of the grid's square regions, microns.
    regions : list of PolygonRegion, optional

    Examples
    --------
    >>> import numpy as np
    >>> result = slide_proportions("s", np.array([10.0, 900.0]), np.array([10.0, 10.0]),
    ...                            np.array([0, 1]), 2, (1000, 500), 0.5, 250)
    >>> result.counts.tolist(), result.grid_counts.shape
    ([1, 1], (1, 2, 2))
    """
    width, height = slide_size
    grid = RegionGrid.covering(int(width), int(height), float(mpp), region_size_um)
    regions = regions or []
    return SlideProportions(
        slide_id, cluster_counts(cluster, k), grid, grid_counts(x, y, cluster, k, grid),
        [r.name for r in regions],
        polygon_counts(x, y, cluster, k, regions) if regions else np.zeros((0, k), np.int64))


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
