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
import shutil
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

FORMATS = ("csv", "parquet", "geojson", "anndata", "spatialdata")
GEOMETRIES = ("outline", "box", "point")
#: Cells whose masks are traced at a time (bounded memory on slides of millions of cells).
OUTLINE_BLOCK = 4096
#: The nucleus measurements of an exported cell table (units in the column names): column
#: -> (QuPath's measurement name, unit).  AnnData's ``X`` holds them in this order.
MEASUREMENTS: dict[str, tuple[str, str]] = {
    "area_um2": ("Nucleus: Area µm^2", "um^2"),
    "perimeter_um": ("Nucleus: Perimeter µm", "um"),
    "circularity": ("Nucleus: Circularity", "1"),
    "solidity": ("Nucleus: Solidity", "1"),
    "eccentricity": ("Nucleus: Eccentricity", "1"),
    "major_axis_um": ("Nucleus: Major axis µm", "um"),
    "minor_axis_um": ("Nucleus: Minor axis µm", "um"),
    "max_caliper_um": ("Nucleus: Max caliper µm", "um"),
    "min_caliper_um": ("Nucleus: Min caliper µm", "um"),
    "hematoxylin_od_mean": ("Nucleus: Hematoxylin OD mean", "OD"),
    "hematoxylin_od_std": ("Nucleus: Hematoxylin OD std dev", "OD"),
    "hematoxylin_od_min": ("Nucleus: Hematoxylin OD min", "OD"),
    "hematoxylin_od_max": ("Nucleus: Hematoxylin OD max", "OD"),
    "eosin_od_mean": ("Nucleus: Eosin OD mean", "OD"),
    "eosin_od_std": ("Nucleus: Eosin OD std dev", "OD"),
    "mean_hematoxylin": ("Nucleus: Hematoxylin mean (0-255, 0 = most stain)", "0-255"),
}


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
        # NaN (a nucleus shrunk into its crop to an empty mask) is no JSON: left out
        "measurements": {name: float(row[column]) for column, (name, _) in MEASUREMENTS.items()
                         if np.isfinite(row[column])},
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


def cells_anndata(root, slide_ids, labels: str | None = None, *, store: str = "",
                  features: dict | None = None):
    """The cells of complete slides as one :class:`anndata.AnnData` (one row per cell).

    ``X``: the nucleus measurements, float32 (N, 16), variables named as the columns of
    :data:`MEASUREMENTS` (units in the names; ``var["qupath_name"]``, ``var["unit"]``).
    ``obs``: ``slide_id`` (categorical), ``cell_id``, ``cluster`` (categorical ``"0".."k-1"``)
    and ``proba_0..proba_{k-1}`` with ``labels``, bounding box (level-0 pixels), crop
    placement and ``tile_id``; index ``"<slide_id>:<cell_id>"``.
    ``obsm["X_wsicell_d"]``: with ``features`` (slide id -> (n, F) array, e.g. a model's
    discriminator features of the slide's crops), those rows.
    ``obsm["spatial"]``: centroids ``(x, y)`` in level-0 pixels; ``obsm["spatial_um"]``: the
    same times the slide's microns per pixel.  ``uns["spatial"][slide_id]``: the slide's
    thumbnail and its scale factor (squidpy / scanpy's layout); ``uns["cluster_colors"]``:
    the report's cluster colours; ``uns["wsicell"]``: provenance (version, model id, store,
    slides and their mpp).
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
    measured = obs[list(MEASUREMENTS)].to_numpy(np.float32)
    obs = obs.drop(columns=list(MEASUREMENTS))
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
    obsm = {"spatial": np.concatenate(spatial), "spatial_um": np.concatenate(spatial_um)}
    if features is not None:
        obsm["X_wsicell_d"] = np.concatenate([features[s] for s in slide_ids]).astype(np.float32)
    # object-dtype names: pandas 3's default string arrays are refused by anndata 0.12's writer
    var = pd.DataFrame({"qupath_name": [name for name, _ in MEASUREMENTS.values()],
                        "unit": [unit for _, unit in MEASUREMENTS.values()]},
                       index=pd.Index(list(MEASUREMENTS), dtype=object)).astype(object)
    return anndata.AnnData(X=measured, obs=obs, var=var, uns=uns, obsm=obsm)


def _import_spatialdata():
    """The optional ``spatialdata`` package, or a one-line error saying how to install it."""
    try:
        import spatialdata
    except ImportError:
        raise WsicellError("--format spatialdata needs the spatialdata package (>= 0.8, Python "
                           ">= 3.12): pip install spatialdata, then wsicell without torch: "
                           "pip install --no-deps wsicell (docs/interop.md)") from None
    return spatialdata


def cells_spatialdata(root, slide_ids, labels: str | None = None, *, store: str = "",
                      features: dict | None = None):
    """The cells of complete slides as one :class:`spatialdata.SpatialData`.

    Per slide, in a coordinate system named after it (level-0 pixels of the slide): the
    nucleus outlines as shapes ``<slide_id>_nuclei`` (polygons traced on the stored masks,
    :func:`mask_outlines`; the bounding box for an empty mask; indexed by ``cell_id``) and
    the slide's thumbnail as the image ``<slide_id>_thumbnail`` (scaled onto level 0).  The
    table ``cells`` is :func:`cells_anndata`'s, annotating the shapes (``obs["region"]``,
    instance key ``cell_id``).
    """
    import geopandas
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    adata = cells_anndata(root, slide_ids, labels, store=store, features=features)
    regions = [f"{slide_id}_nuclei" for slide_id in slide_ids]
    adata.obs["region"] = pd.Categorical(
        [f"{slide_id}_nuclei" for slide_id in adata.obs.slide_id.astype(object)],
        categories=regions)
    shapes, images = {}, {}
    for slide_id, region in zip(slide_ids, regions):
        table = slide_table(root, slide_id)
        outlines = []
        for start in range(0, len(table), OUTLINE_BLOCK):
            stop = min(start + OUTLINE_BLOCK, len(table))
            outlines += _outlines(root, slide_id, table, start, stop)
        boxes = shapely.box(table.bbox_x0, table.bbox_y0, table.bbox_x1, table.bbox_y1)
        geometry = [box if outline is None else outline for outline, box in zip(outlines, boxes)]
        frame = geopandas.GeoDataFrame(geometry=geometry,
                                       index=pd.Index(table.cell_id.to_numpy(), name="cell_id"))
        shapes[region] = ShapesModel.parse(frame, transformations={slide_id: Identity()})
        thumbnail, _ = slide_pictures(root, slide_id)
        if thumbnail is not None:
            attrs = slide_attrs(root, slide_id)
            scale = [float(attrs["height"]) / thumbnail.shape[0],
                     float(attrs["width"]) / thumbnail.shape[1]]
            images[f"{slide_id}_thumbnail"] = Image2DModel.parse(
                np.ascontiguousarray(thumbnail.transpose(2, 0, 1)), dims=("c", "y", "x"),
                transformations={slide_id: Scale(scale, axes=("y", "x"))})
    table = TableModel.parse(adata, region=regions, region_key="region", instance_key="cell_id")
    return SpatialData(images=images, shapes=shapes, tables={"cells": table})


def export_cells(store, out, fmt: str, slide_ids=None, *, geometry: str = "outline",
                 labels: str | None = None, features: dict | None = None) -> int:
    """Write the cells of complete slides of a store to one file.

    Parameters
    ----------
    store : str or Path
    out : str or Path
        Output file.
    fmt : {"csv", "parquet", "geojson", "anndata", "spatialdata"}
        ``anndata`` writes an ``.h5ad`` file (see :func:`cells_anndata`); it needs the
        optional ``anndata`` package.  ``spatialdata`` writes a SpatialData Zarr directory
        (see :func:`cells_spatialdata`); it needs ``spatialdata`` (Python >= 3.12).
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
    features : dict of str to ndarray, optional
        Per slide, an (n_cells, F) array (a model's discriminator features of its crops)
        that AnnData / SpatialData hold as ``obsm["X_wsicell_d"]``.

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
    if fmt in ("anndata", "spatialdata"):
        _import_anndata()  # a missing package fails before anything is read
    if fmt == "spatialdata":
        _import_spatialdata()
    if features is not None and fmt not in ("anndata", "spatialdata"):
        raise WsicellError(f"{out}: features go into AnnData / SpatialData only "
                           "(--format anndata or spatialdata)")
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
            adata = cells_anndata(root, slide_ids, labels, store=str(store_location(store)),
                                  features=features)
            counted.append(adata.n_obs)
            adata.write_h5ad(tmp)
        elif fmt == "spatialdata":
            sdata = cells_spatialdata(root, slide_ids, labels, store=str(store_location(store)),
                                      features=features)
            counted.append(sdata.tables["cells"].n_obs)
            sdata.write(tmp)
            if out.is_dir():  # a directory cannot be renamed over another: replace it
                shutil.rmtree(out)
        elif fmt == "csv":
            _write_csv(tables, tmp)
        elif fmt == "parquet":
            _write_parquet(tables, tmp)
        else:
            _write_geojson(root, slide_ids[0], next(tables), tmp, geometry)
        os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.unlink(missing_ok=True)
    return int(np.sum(counted))
