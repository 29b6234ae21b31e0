"""``wsicell predict``: slides in, cell types, proportions, slide classes and a report out."""

from __future__ import annotations

import click

from wsicell.cli.ingest import dashboard_address, ingest_options
from wsicell.cli.options import OUTPUT_DIR, count, positive
from wsicell.config import load_config

EPILOG = """\b
Examples:
  wsicell predict --slides slides/ --model model/ --store cells.zarr --out results/
  wsicell predict --slides slides/ --model model/ --store cells.zarr --out results/ \\
      --labels labels.csv --folds 4 --regions annotations/
  wsicell predict --slides new/ --model model/ --store cells.zarr --out new_results/ \\
      --classifier results/slide_classifier.json

\b
Outputs in RESULTS_DIR: report.html (open it in a browser) with the PNGs of report/,
slide_proportions, grid_proportions, annotation_proportions (with --regions) and
slide_predictions as .parquet and .csv, slide_kmeans.json, slide_classifier.json (with
--labels; reuse it on new slides with --classifier) and prediction.json (provenance).
Cell labels go into the store under slides/<id>/labels/<model_id>/; rerunning with the
same model does not recompute them.
"""


@click.command(epilog=EPILOG)
@click.option("--slides", "slides_dir", required=True, type=click.Path(),
              help="Directory of slides; those not yet in the store are ingested first.")
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="Trained model directory (wsicell train --out).")
@click.option("--store", required=True, type=OUTPUT_DIR,
              help="Zarr cell store (a path, or a URL such as s3://bucket/cells.zarr).")
@click.option("--out", "out_dir", required=True, type=OUTPUT_DIR, help="Results directory.")
@click.option("--region-size", type=positive(1e6, "um"), default=None,
              help="Side of the proportion grid's square regions, microns [default: 500].")
@click.option("--regions", type=click.Path(), default=None,
              help="GeoJSON polygon annotations (QuPath export): <slide_id>.geojson or a "
              "directory of them.")
@click.option("--fix-regions", is_flag=True,
              help="Repair invalid region polygons (self-intersections, ...) instead of "
              "refusing them.")
@click.option("--slide-clusters", type=count(1, 10000), default=None,
              help="k-means clusters of slides [default: 2].")
@click.option("--labels", type=click.Path(), default=None,
              help="CSV slide_id,label: train and cross-validate a linear SVM on slides.")
@click.option("--folds", type=count(2, 1000), default=None, help="Cross-validation folds [default: 4].")
@click.option("--classifier", type=click.Path(), default=None,
              help="Apply a slide_classifier.json saved by an earlier run.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N (CPU labelling runs on the Dask cluster).")
@click.option("--config", "config_file", type=click.Path(), default=None,
              help="JSON configuration file (wsicell.config.WsicellConfig).")
@ingest_options
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bars on stderr.")
def predict(slides_dir, model_dir, store, out_dir, region_size, regions, fix_regions,
            slide_clusters, labels,
            folds, classifier, device, config_file, mpp, workers, threads_per_worker,
            memory_limit, scheduler, dashboard, progress):
    """Label every cell of the slides with the model, then compute per-slide and per-region
    cell-type proportions, predict slide classes and write an HTML report."""
    from wsicell.pipeline.predict import predict as run_prediction

    config = load_config(config_file, predict={"region_size_um": region_size,
                                               "slide_clusters": slide_clusters, "folds": folds})
    report = run_prediction(
        store, slides_dir, model_dir, out_dir, config, regions=regions,
        fix_regions=fix_regions, labels=labels,
        classifier=classifier, device=device, mpp=mpp, workers=workers,
        threads_per_worker=threads_per_worker, memory_limit=memory_limit, scheduler=scheduler,
        dashboard=dashboard_address(dashboard),
        progress=progress)
    click.echo(f"report: {report}")
