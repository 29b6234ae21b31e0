"""``wsicell ingest``: segment every nucleus of whole slides into a Zarr cell store."""

from __future__ import annotations

import click

from wsicell.cli.options import MPP, OUTPUT_DIR, MemoryLimit, count
from wsicell.config import SEGMENTATION_PRESETS, load_config

EPILOG = """\b
Examples:
  wsicell ingest slides/ --store cells.zarr
  wsicell ingest a.svs b.ndpi --store cells.zarr --workers 8 --memory-limit 6GB
  wsicell ingest scan.tif --store cells.zarr --mpp 0.25
  wsicell ingest slides/ --store /shared/cells.zarr --scheduler tcp://head-node:8786

\b
A killed run continues where it stopped when started again with the same options;
complete slides are skipped (--overwrite redoes them). With --scheduler, every worker
must see the slides and the store at the same paths (shared filesystem) and run the
same wsicell version.
"""


def ingest_options(command):
    """The slide-reading and Dask options of ingest, shared with ``wsicell predict``:
    ``--mpp``, ``--workers``, ``--threads-per-worker``, ``--memory-limit``, ``--scheduler``,
    ``--dashboard``."""
    options = [
        click.option("--mpp", type=MPP, default=None,
                     help="Level-0 microns per pixel of the slides, overriding their metadata."),
        click.option("--workers", type=count(1, 1024), default=2, show_default=True,
                     help="Worker processes of the local Dask cluster."),
        click.option("--threads-per-worker", type=count(1, 1024), default=1,
                     show_default=True),
        click.option("--memory-limit", type=MemoryLimit(), default="4GB", show_default=True,
                     help="Per local worker."),
        click.option("--scheduler", default=None,
                     help="An existing Dask scheduler instead of a local cluster: its address "
                     "(tcp://host:8786) or its scheduler file (dask scheduler "
                     "--scheduler-file, dask-jobqueue); see docs/cluster.md."),
        click.option("--dashboard", default="127.0.0.1:0", show_default=True,
                     help="host:port of the local cluster's Dask dashboard (port 0: a free "
                     "one; 'none': no dashboard). 0.0.0.0:8787 serves it to the network."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def dashboard_address(value: str) -> str | None:
    """The ``--dashboard`` value as ingest takes it (None for ``none``)."""
    return None if value.lower() == "none" else value


@click.command(epilog=EPILOG)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--store", required=True, type=OUTPUT_DIR,
              help="Zarr cell store, a path, or a URL such as s3://bucket/cells.zarr "
              "(created if missing).")
@ingest_options
@click.option("--config", "config_file", type=click.Path(), default=None,
              help="JSON configuration file (wsicell.config.WsicellConfig).")
@click.option("--preset", type=click.Choice(sorted(SEGMENTATION_PRESETS)), default=None,
              help="Segmentation preset [default: the configuration's, adaptive].")
@click.option("--tile-size", type=count(256, 16384), default=None,
              help="Tile side in pixels at the reference resolution [default: config].")
@click.option("--shared-stain", is_flag=True, default=None,
              help="Fit one stain on all the images of this run together (patches of one "
              "slide or staining batch) instead of one per slide [default: config].")
@click.option("--overwrite", is_flag=True, help="Redo slides the store already holds complete.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Dashboard link and progress bars on stderr.")
def ingest(paths, store, mpp, config_file, preset, tile_size, shared_stain, workers,
           threads_per_worker, memory_limit, scheduler, dashboard, overwrite, progress):
    """Ingest slides (files or directories of them, PATHS) into the cell store --store.

    Tissue is detected on a thumbnail, stain parameters are fitted per slide (or, with
    --shared-stain, once for all the images) on a sample of tissue tiles, and every
    tissue tile is segmented at the reference resolution on a Dask cluster; each nucleus
    becomes a crop plus a row of the cell table.
    """
    from wsicell.pipeline.ingest import ingest as run_ingest

    config = load_config(config_file, preset, ingest={"tile_size": tile_size,
                                                           "shared_stain": shared_stain})
    slide_ids = run_ingest(
        store, paths, config, mpp=mpp, workers=workers, threads_per_worker=threads_per_worker,
        memory_limit=memory_limit, scheduler=scheduler, dashboard=dashboard_address(dashboard),
        overwrite=overwrite, progress=progress,
    )
    click.echo(f"{store}: {len(slide_ids)} slide(s) complete: {', '.join(slide_ids)}")
