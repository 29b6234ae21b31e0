"""``wsicell evaluate``: measure results against annotations."""

import json

import click

from wsicell.config import SEGMENTATION_PRESETS


@click.group()
def evaluate():
    """Compare wsicell's results with annotations."""


@evaluate.command()
@click.argument("image_dir", type=click.Path())
@click.option("--points", "points_dir", required=True, type=click.Path(),
              help="Directory of x,y CSV files named like the images.")
@click.option("--preset", default="paper", show_default=True,
              type=click.Choice(sorted(SEGMENTATION_PRESETS) + ["all"]),
              help="Segmentation preset to evaluate, or all of them.")
@click.option("--radius", type=float, default=12.0, show_default=True,
              help="Largest centroid-to-point distance of a match (image pixels).")
@click.option("--config", "config_file", type=click.Path(), default=None,
              help="JSON configuration file the presets apply to.")
@click.option("--mpp", type=float, default=None, help="Microns per pixel of the images.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def detection(image_dir, points_dir, preset, radius, config_file, mpp, as_json):
    """Detection precision / recall / F1 of nucleus centroids against centre points.

    Images in IMAGE_DIR are matched to point CSVs of the same stem (images without one
    are skipped); centroids and points are matched one-to-one within --radius.
    """
    from wsicell.images import evaluate_detection

    presets = sorted(SEGMENTATION_PRESETS) if preset == "all" else [preset]
    result = evaluate_detection(image_dir, points_dir, presets, radius, config_file, mpp,
                                progress=not as_json)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for name, figures in result["presets"].items():
        click.echo(f"preset {name} (radius {radius:g} px)")
        click.echo(f"  {'image':28s} {'precision':>9s} {'recall':>7s} {'F1':>6s}")
        rows = list(figures["images"].items()) + [("overall", figures)]
        for stem, s in rows:
            click.echo(f"  {stem:28s} {s['precision']:9.3f} {s['recall']:7.3f} {s['f1']:6.3f}")
