"""``wsicell export``: the cell table of a store as CSV, Parquet, QuPath GeoJSON or AnnData."""

from __future__ import annotations

import click

from pathlib import Path

from wsicell.cli.options import OutputPath
from wsicell.io.export import FORMATS, GEOMETRIES


@click.command()
@click.argument("store", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True)
@click.option("--out", required=True, type=OutputPath("file or directory"),
              help="Output file (a directory for spatialdata).")
@click.option("--slide", "slide_ids", multiple=True,
              help="Slide id to export (repeatable) [default: all complete slides].")
@click.option("--geometry", type=click.Choice(GEOMETRIES), default="outline",
              show_default=True,
              help="GeoJSON shape of a cell: its nucleus outline (polygon), its bounding box "
              "(polygon) or its centroid (point).")
@click.option("--labels", default=None,
              help="Model id whose cluster labels (wsicell predict) are added as a column / "
              "QuPath classification.")
@click.option("--features", "model_dir", type=click.Path(), default=None,
              help="A trained model's directory: its discriminator features of every crop "
              "go into obsm['X_wsicell_d'] (anndata, spatialdata; needs torch).")
def export(store, fmt, out, slide_ids, geometry, labels, model_dir):
    """Export the cells of STORE: one row per cell (slide_id, cell_id, x, y in level-0
    pixels, bounding box, nucleus measurements in um and OD, crop placement, tile_id).

    GeoJSON is a FeatureCollection of QuPath detections (File > Import objects) with the
    nucleus outlines and QuPath-named measurements, one slide per file. AnnData (.h5ad, for
    scanpy / squidpy) holds the measurements as X, the cells as obs, the centroids in
    obsm["spatial"] (level-0 pixels) and obsm["spatial_um"] (microns); it needs
    pip install 'wsicell[scverse]'. SpatialData (a Zarr directory: table, nucleus shapes,
    thumbnail) needs spatialdata >= 0.8 on Python >= 3.12 (docs/interop.md).
    """
    from wsicell.io.export import export_cells

    if fmt != "spatialdata" and "://" not in str(out) and Path(out).is_dir():
        raise click.BadParameter(f"{out}: is a directory, not a file", param_hint="'--out'")
    features = None
    if model_dir is not None and fmt not in ("anndata", "spatialdata"):
        raise click.UsageError("--features goes into --format anndata or spatialdata only")
    if model_dir is not None:
        from wsicell.pipeline.features import discriminator_features

        features = discriminator_features(store, model_dir, slide_ids)
    n = export_cells(store, out, fmt, slide_ids, geometry=geometry, labels=labels,
                     features=features)
    click.echo(f"{out}: {n} cells")
