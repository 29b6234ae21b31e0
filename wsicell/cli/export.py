"""``wsicell export``: the cell table of a store as CSV, Parquet, QuPath GeoJSON or AnnData."""

from __future__ import annotations

import click

from wsicell.cli.options import OUTPUT_FILE
from wsicell.io.export import FORMATS, GEOMETRIES


@click.command()
@click.argument("store", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True)
@click.option("--out", required=True, type=OUTPUT_FILE, help="Output file.")
@click.option("--slide", "slide_ids", multiple=True,
              help="Slide id to export (repeatable) [default: all complete slides].")
@click.option("--geometry", type=click.Choice(GEOMETRIES), default="outline",
              show_default=True,
              help="GeoJSON shape of a cell: its nucleus outline (polygon), its bounding box "
              "(polygon) or its centroid (point).")
@click.option("--labels", default=None,
              help="Model id whose cluster labels (wsicell predict) are added as a column / "
              "QuPath classification.")
def export(store, fmt, out, slide_ids, geometry, labels):
    """Export the cells of STORE: one row per cell (slide_id, cell_id, x, y in level-0
    pixels, bounding box, area_um2, mean hematoxylin, tile_id).

    GeoJSON is a FeatureCollection of QuPath detections (File > Import objects) with the
    nucleus outlines, one slide per file. AnnData (.h5ad, for scanpy / squidpy) holds the cells as obs, the centroids
    in obsm["spatial"] (level-0 pixels) and obsm["spatial_um"] (microns); it needs
    pip install 'wsicell[scverse]'.
    """
    from wsicell.io.export import export_cells

    n = export_cells(store, out, fmt, slide_ids, geometry=geometry, labels=labels)
    click.echo(f"{out}: {n} cells")
