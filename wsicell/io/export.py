"""Export the cell table of a store: CSV, Parquet, GeoJSON that QuPath imports, or AnnData.

One row (or feature) per cell: ``slide_id``, ``cell_id``, ``x``, ``y`` (level-0 pixels of the
slide), bounding box, ``area_um2``, ``mean_hematoxylin``, crop placement, ``tile_id`` and,
when a model's labels exist, ``cluster`` and ``proba_0..proba_{k-1}``.  GeoJSON features are
QuPath detections whose geometry is the nucleus outline (traced on its stored mask,
:func:`mask_outlines`; the box or the centroid on request), with QuPath-style measurement
names and units and, with labels, a classification coloured by cluster.  AnnData (``.h5ad``, for scanpy / squidpy) holds the same table as
``obs`` with the coordinates in ``obsm["spatial"]`` (level-0 pixels) and
``obsm["spatial_um"]`` (microns); it needs the optional ``anndata`` package
(``pip install 'wsicell[scverse]'``).  Files are written to a temporary name and renamed,
so an interrupted export never leaves a truncated file under the requested name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
import shapely.affinity
from skimage.measure import find_contours

import wsicell
from wsicell.errors import WsicellError
from wsicell.io.store import (
    complete_slides,
    labelled_models,
    labels_complete,
    labels_k,
    open_store,
    read_labels,
    slide_attrs,
    slide_cells,
    slide_group,
    slide_masks,
    slide_pictures,
    store_location,
)
from wsicell.palette import cluster_colours

FORMATS = ("csv", "parquet", "geojson", "anndata")
GEOMETRIES = ("outline", "box", "point")
#: Cells whose masks are traced at a time (bounded memory on slides of millions of cells).
OUTLINE_BLOCK = 4096


def slide_table(root, slide_id: str, labels: str | None = None) -> pd.DataFrame:
    """The cell table of one slide with a leading ``slide_id`` column and, with ``labels``
    (a model id), that model's ``cluster`` and ``proba_0..proba_{k-1}`` columns.

    Raises
    ------
    WsicellError
        The slide has no complete labels of that model (none, or an interrupted run's).
    """
    cells = slide_cells(root, slide_id).rename(columns={"area": "area_um2"})
    cells.insert(0, "slide_id", slide_id)
    if labels is not None:
        cluster, proba = read_labels(root, slide_id, labels)
        cells["cluster"] = cluster
        for i in range(proba.shape[1]):
            cells[f"proba_{i}"] = proba[:, i]
    return cells


def _check_labels(root, slide_id: str, model_id: str) -> None:
    """Refuse a model whose labels of a slide are missing or were never finished."""
    if labels_complete(root, slide_id, model_id):
        return
    if labels_k(root, slide_id, model_id) is None:
        raise WsicellError(f"{root.store}: slide {slide_id!r} has no labels {model_id!r} "
                           "(run wsicell predict first)")
    raise WsicellError(f"{root.store}: slide {slide_id!r} has no labels {model_id!r} that are "
                       "complete (an interrupted wsicell predict left them unfinished; rerun it)")


def default_labels(root, slide_ids) -> str | None:
    """The model whose complete labels every slide holds, when there is exactly one."""
    common = set.intersection(*(set(labelled_models(root, s)) for s in slide_ids))
    return common.pop() if len(common) == 1 else None


def mask_outline(mask: np.ndarray):
    """The outline of a nucleus mask, traced midway between inside and outside pixel centres
    (marching squares), so that its area matches the pixel count.

    Parameters
    ----------
    mask : ndarray, shape (S, S), bool

    Returns
    -------
    shapely.Polygon, shapely.MultiPolygon or None
        In pixel-edge coordinates of the mask (pixel ``(r, c)`` covers
        ``[c, c + 1) x [r, r + 1)``), holes included; a MultiPolygon for a mask in several
        pieces; None for an empty mask.

    Examples
    --------
    >>> mask = np.zeros((8, 8), bool); mask[2:5, 3:7] = True
    >>> outline = mask_outline(mask)
    >>> outline.geom_type, float(outline.area), outline.bounds
    ('Polygon', 11.5, (3.0, 2.0, 7.0, 5.0))
    """
    padded = np.pad(mask, 1).astype(np.float32)
    # (row, col) of the padded mask -> (x, y) pixel edges; nested rings alternate between
    # outlines and holes, so the even-odd combination of all rings is the mask
    rings = [shapely.Polygon(r[:, ::-1] - 0.5) for r in find_contours(padded, 0.5)
             if len(r) >= 4]
    if not rings:
        return None
    outline = rings[0]
    for ring in rings[1:]:
        outline = outline.symmetric_difference(ring)
    return outline if outline.is_valid else shapely.make_valid(outline)


def mask_outlines(masks: np.ndarray, origin: np.ndarray, pixel: np.ndarray) -> list:
    """Nucleus outlines on the slide from the stored crop masks and placement.

    Parameters
    ----------
    masks : ndarray, shape (N, S, S), bool
        The store's ``masks``.
    origin : ndarray, shape (N, 2), float64
        ``crop_x0``, ``crop_y0``: level-0 position of each crop's top-left corner.
    pixel : ndarray, shape (N,), float
        ``crop_px``: level-0 pixels per crop pixel.

    Returns
    -------
    list of shapely geometries or None
        Valid polygons (multipolygons for masks in pieces) in level-0 pixel coordinates;
        None for an empty mask.
    """
    outlines = []
    for mask, (x0, y0), px in zip(masks, origin, pixel):
        outline = mask_outline(mask)
        outlines.append(None if outline is None else shapely.affinity.affine_transform(
            outline, [px, 0, 0, px, x0, y0]))
    return outlines


def _box(row) -> dict:
    x0, y0, x1, y1 = (int(row[c]) for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"))
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1],
                                                [x0, y0]]]}


def cell_feature(row, geometry: str, outline=None) -> dict:
    """A QuPath detection: a GeoJSON Feature with the nucleus outline (``outline``, a
    shapely (Multi)Polygon, for ``geometry="outline"``; the box when there is none), its box
    as a polygon, or its centroid as a point; measurements named as QuPath names its own."""
    if geometry == "point":
        shape = {"type": "Point", "coordinates": [row["x"], row["y"]]}
    elif geometry == "outline" and outline is not None:
        shape = shapely.geometry.mapping(shapely.set_precision(outline, 0.01))
    else:
        shape = _box(row)
    properties = {
        "objectType": "detection",
        "slide_id": row["slide_id"],
        "cell_id": int(row["cell_id"]),
        "measurements": {"Nucleus: Area µm^2": float(row["area_um2"]),
                         "Nucleus: Hematoxylin mean (0-255, 0 = most stain)":
                             float(row["mean_hematoxylin"])},
    }
    if "cluster" in row:
        cluster = int(row["cluster"])
        probabilities = {f"Cluster {k.removeprefix('proba_')} probability": float(v)
                         for k, v in row.items() if k.startswith("proba_")}
        colour = cluster_colours(max(len(probabilities), cluster + 1))[cluster]
        properties["classification"] = {"name": f"cluster {cluster}", "color": colour.tolist()}
        properties["measurements"].update(probabilities)
    return {"type": "Feature", "geometry": shape, "properties": properties}


def _write_csv(tables, tmp: Path) -> None:
    for i, table in enumerate(tables):
        table.to_csv(tmp, mode="w" if i == 0 else "a", header=i == 0, index=False)


def _write_parquet(tables, tmp: Path) -> None:
    writer = None
    try:
        for table in tables:
            arrow = pa.Table.from_pandas(table, preserve_index=False)
            writer = writer or pq.ParquetWriter(tmp, arrow.schema)
            writer.write_table(arrow)
    finally:
        if writer is not None:
            writer.close()


def _outlines(root, slide_id: str, table: pd.DataFrame, start: int, stop: int) -> list:
    masks = slide_masks(root, slide_id)[start:stop]
    rows = table.iloc[start:stop]
    return mask_outlines(masks, rows[["crop_x0", "crop_y0"]].to_numpy(),
                         rows["crop_px"].to_numpy())


def _write_geojson(root, slide_id: str, table: pd.DataFrame, tmp: Path, geometry: str) -> None:
    records = table.to_dict("records")
    with tmp.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for start in range(0, len(records), OUTLINE_BLOCK):
            stop = min(start + OUTLINE_BLOCK, len(records))
            outlines = (_outlines(root, slide_id, table, start, stop) if geometry == "outline"
                        else [None] * (stop - start))
            for i, outline in zip(range(start, stop), outlines):
                feature = cell_feature(records[i], geometry, outline)
                f.write(("" if i == 0 else ",\n") + json.dumps(feature))
        f.write("\n]}\n")


def _import_anndata():
    """The optional ``anndata`` package, or a one-line error saying how to install it."""
    try:
        import anndata
    except ImportError:
        raise WsicellError("--format anndata needs the anndata package: "
                           "pip install 'wsicell[scverse]' (or pip install anndata)") from None
    return anndata


def _hex(colour) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in colour)


def cells_anndata(root, slide_ids, labels: str | None = None, *, store: str = ""):
    """The cells of complete slides as one :class:`anndata.AnnData` (one row per cell).

    ``obs``: ``slide_id`` (categorical), ``cell_id``, ``cluster`` (categorical ``"0".."k-1"``)
    and ``proba_0..proba_{k-1}`` with ``labels``, ``area_um2``, ``mean_hematoxylin``,
    bounding box (level-0 pixels) and ``tile_id``; index ``"<slide_id>:<cell_id>"``.
    ``obsm["spatial"]``: centroids ``(x, y)`` in level-0 pixels; ``obsm["spatial_um"]``: the
    same times the slide's microns per pixel.  ``uns["spatial"][slide_id]``: the slide's
    thumbnail and its scale factor (squidpy / scanpy's layout); ``uns["cluster_colors"]``:
    the report's cluster colours; ``uns["wsicell"]``: provenance (version, model id, store,
    slides and their mpp).  ``X`` is empty (no variables): the measurements are in ``obs``.
    """
    anndata = _import_anndata()
    tables, spatial, spatial_um, library = [], [], [], {}
    for slide_id in slide_ids:
        table = slide_table(root, slide_id, labels)
        attrs = slide_attrs(root, slide_id)
        mpp = float(attrs["mpp"])
        xy = table[["x", "y"]].to_numpy(np.float64)
        spatial.append(xy)
        spatial_um.append(xy * mpp)
        tables.append(table.drop(columns=["x", "y"]))
        thumbnail, _ = slide_pictures(root, slide_id)
        entry = {"scalefactors": {"tissue_hires_scalef": (
                     thumbnail.shape[1] / float(attrs["width"]) if thumbnail is not None else 1.0),
                     "spot_diameter_fullres": 8.0 / mpp},  # a nucleus, about 8 um
                 "metadata": {"mpp": mpp, "width": int(attrs["width"]),
                              "height": int(attrs["height"])}}
        if thumbnail is not None:
            entry["images"] = {"hires": np.ascontiguousarray(thumbnail)}
        library[slide_id] = entry
    obs = pd.concat(tables, ignore_index=True)
    obs.index = pd.Index([f"{s}:{c}" for s, c in zip(obs.slide_id, obs.cell_id)], dtype=object)
    obs["slide_id"] = pd.Categorical(obs.slide_id.astype(object), categories=list(slide_ids))
    uns = {"spatial": library,
           "wsicell": {"wsicell_version": wsicell.__version__, "model_id": labels or "",
                       "store": store, "slides": list(slide_ids),
                       "mpp": {s: library[s]["metadata"]["mpp"] for s in slide_ids},
                       "spatial_units": {"spatial": "level-0 pixels", "spatial_um": "um"}}}
    if labels is not None:
        k = max(labels_k(root, s, labels) for s in slide_ids)
        obs["cluster"] = pd.Categorical(obs.cluster.astype(int).astype(str).astype(object),
                                        categories=[str(c) for c in range(k)])
        uns["cluster_colors"] = [_hex(c) for c in cluster_colours(k)]
    # object-dtype names: pandas 3's default string arrays are refused by anndata 0.12's writer
    return anndata.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([], dtype=object)), uns=uns,
                           obsm={"spatial": np.concatenate(spatial),
                                 "spatial_um": np.concatenate(spatial_um)})


def export_cells(store, out, fmt: str, slide_ids=None, *, geometry: str = "outline",
                 labels: str | None = None) -> int:
    """Write the cells of complete slides of a store to one file.

    Parameters
    ----------
    store : str or Path
    out : str or Path
        Output file.
    fmt : {"csv", "parquet", "geojson", "anndata"}
        ``anndata`` writes an ``.h5ad`` file (see :func:`cells_anndata`); it needs the
        optional ``anndata`` package.
    slide_ids : list of str, optional
        Slides to export (default: every complete slide).  GeoJSON holds one slide's
        coordinates, so it needs exactly one.
    geometry : {"outline", "box", "point"}
        GeoJSON geometry: the nucleus outline traced on its stored mask (a polygon in
        level-0 pixels), its bounding box as a polygon, or its centroid.
    labels : str, optional
        Model id whose cluster labels (``labels/<model_id>``: cluster and probabilities)
        are added; by default those of the one model every slide has complete labels of.
        GeoJSON features are then classified and coloured by cluster.

    Returns
    -------
    int
        Number of cells written.

    Examples
    --------
    >>> import wsicell
    >>> wsicell.export("cells.zarr", "cells.parquet", "parquet")  # doctest: +SKIP
    81599
    >>> wsicell.export("cells.zarr", "slide.geojson", "geojson",
    ...                ["slide"], geometry="point")  # doctest: +SKIP
    1432
    >>> wsicell.export("cells.zarr", "cells.h5ad", "anndata")  # doctest: +SKIP
    81599
    """
    if fmt not in FORMATS:
        raise WsicellError(f"{out}: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if geometry not in GEOMETRIES:
        raise WsicellError(f"{out}: unknown geometry {geometry!r}; choose from "
                           f"{', '.join(GEOMETRIES)}")
    root = open_store(store)
    slide_ids = list(slide_ids) if slide_ids else complete_slides(root)
    if not slide_ids:
        raise WsicellError(f"{store}: no complete slides to export")
    if fmt == "anndata":
        _import_anndata()  # a missing package fails before anything is read
    if fmt == "geojson" and len(slide_ids) != 1:
        raise WsicellError(f"{out}: GeoJSON holds the coordinates of one slide; pick one with "
                           f"--slide (store has {', '.join(slide_ids)})")
    for slide_id in slide_ids:
        slide_group(root, slide_id)  # missing or incomplete slides fail before writing
    labels = labels if labels is not None else default_labels(root, slide_ids)
    for slide_id in slide_ids if labels is not None else []:
        _check_labels(root, slide_id, labels)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    counted: list[int] = []

    def each_slide():
        for slide_id in slide_ids:
            table = slide_table(root, slide_id, labels)
            counted.append(len(table))
            yield table

    tables = each_slide()
    try:
        if fmt == "anndata":
            adata = cells_anndata(root, slide_ids, labels, store=str(store_location(store)))
            counted.append(adata.n_obs)
            adata.write_h5ad(tmp)
        elif fmt == "csv":
            _write_csv(tables, tmp)
        elif fmt == "parquet":
            _write_parquet(tables, tmp)
        else:
            _write_geojson(root, slide_ids[0], next(tables), tmp, geometry)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return int(np.sum(counted))
