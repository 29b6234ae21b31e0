"""``wsicell segment``: nuclei of plain images (fields of view) to crops, a table and pictures."""

import click

from wsicell.cli.options import MPP, OUTPUT_DIR
from wsicell.config import SEGMENTATION_PRESETS, load_config


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=OUTPUT_DIR, help="Output directory.")
@click.option("--preset", type=click.Choice(sorted(SEGMENTATION_PRESETS)), default=None,
              help="Segmentation preset [default: the configuration's, adaptive].")
@click.option("--config", "config_file", type=click.Path(), default=None,
              help="JSON configuration file (schemas/config.schema.json).")
@click.option("--mpp", type=MPP, default=None,
              help="Microns per pixel of the images, overriding their metadata.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def segment(paths, out_dir, preset, config_file, mpp, progress):
    """Segment the nuclei of image files (or directories of them) with the paper's recipe.

    For each image, OUT/<name>/ receives cells.csv (one row per nucleus), crops.npy
    (N x 32 x 32 x 3 cell images), crops.png (a gallery) and overlay.png (outlines).
    """
    from wsicell.io.slide import find_slide_files
    from wsicell.pipeline.fields import segment_files

    config = load_config(config_file, preset)
    folders = segment_files(find_slide_files(paths), out_dir, config, mpp, progress)
    for folder in folders:
        click.echo(folder)
