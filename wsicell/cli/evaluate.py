"""``wsicell evaluate``: measure results against annotations."""

import json

import click

from wsicell.cli.options import MPP, SEED, positive
from wsicell.config import SEGMENTATION_PRESETS


def _presets(preset: str | None, config_file) -> list[str | None]:
    """The presets to evaluate: all, the one named, or the configuration's (default)."""
    if preset == "all":
        return sorted(SEGMENTATION_PRESETS)
    return [preset]  # None: the configuration's own, as its file sets it


@click.group()
def evaluate():
    """Compare wsicell's results with annotations."""


@evaluate.command()
@click.argument("image_dir", type=click.Path())
@click.option("--points", "points_dir", required=True, type=click.Path(),
              help="Directory of x,y CSV files named like the images.")
@click.option("--preset", default=None,
              type=click.Choice(sorted(SEGMENTATION_PRESETS) + ["all"]),
              help="Segmentation preset to evaluate, or all of them [default: the "
              "configuration's preset].")
@click.option("--radius", type=positive(1e4, "px"), default=12.0, show_default=True,
              help="Largest centroid-to-point distance of a match (image pixels).")
@click.option("--config", "config_file", type=click.Path(), default=None,
              help="JSON configuration file the presets apply to.")
@click.option("--mpp", type=MPP, default=None, help="Microns per pixel of the images.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def detection(image_dir, points_dir, preset, radius, config_file, mpp, as_json):
    """Detection precision / recall / F1 of nucleus centroids against centre points.

    Images in IMAGE_DIR are matched to point CSVs of the same stem (images without one
    are skipped); centroids and points are matched one-to-one within --radius.
    """
    from wsicell.pipeline.fields import evaluate_detection

    presets = _presets(preset, config_file)
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


@evaluate.command()
@click.argument("image_dir", type=click.Path())
@click.option("--masks", "mask_dir", required=True, type=click.Path(),
              help="Directory of instance-mask PNGs named like the images (8- or 16-bit "
              "integer, 0 = background).")
@click.option("--mpp", type=MPP, required=True, help="Microns per pixel of the images.")
@click.option("--preset", default=None,
              type=click.Choice(sorted(SEGMENTATION_PRESETS) + ["all"]),
              help="Segmentation preset to evaluate, or all of them [default: the "
              "configuration's preset].")
@click.option("--config", "config_file", type=click.Path(), default=None,
              help="JSON configuration file the presets apply to.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def segmentation(image_dir, mask_dir, mpp, preset, config_file, as_json):
    """Instance segmentation against instance masks: the paper's foreground IoU / F, AJI,
    panoptic quality and detection P / R / F1 of centroids within 3 um.

    Every image in IMAGE_DIR needs a mask of the same stem in --masks.  Overall figures
    are means over the images (detection: pooled); an image where a preset finds no
    nucleus scores zero.
    """
    from wsicell.pipeline.fields import evaluate_segmentation

    presets = _presets(preset, config_file)
    result = evaluate_segmentation(image_dir, mask_dir, presets, mpp, config_file,
                                   progress=not as_json)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    columns = ("iou", "f1", "aji", "pq")
    for name, figures in result["presets"].items():
        click.echo(f"preset {name} (detection within {result['radius_um']:g} um = "
                   f"{result['radius_px']:.1f} px)")
        click.echo(f"  {'image':28s}" + "".join(f"{c.upper():>7s}" for c in columns)
                   + f" {'det P':>6s} {'det R':>6s} {'det F1':>6s}")
        rows = list(figures["images"].items()) + [("overall", figures)]
        for stem, s in rows:
            d = s["detection"]
            click.echo(f"  {stem:28s}" + "".join(f"{s[c]:7.3f}" for c in columns)
                       + f" {d['precision']:6.3f} {d['recall']:6.3f} {d['f1']:6.3f}")


def _print_scores(rows: list[tuple[str, dict]], columns: list[str]) -> None:
    click.echo(f"  {'':18s}" + "".join(f"{c:>10s}" for c in columns))
    for name, scores in rows:
        click.echo(f"  {name:18s}" + "".join(f"{scores[c]:10.3f}" for c in columns))


@evaluate.command()
@click.option("--store", required=True, type=click.Path(),
              help="The cell store (a path, or a URL such as s3://bucket/cells.zarr).")
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="Trained model directory.")
@click.option("--points", "points_dir", required=True, type=click.Path(),
              help="Directory of x,y,label CSV files named by slide id (image stem).")
@click.option("--radius", type=positive(1e4, "px"), default=12.0, show_default=True,
              help="Largest cell-to-point distance of a match (level-0 pixels).")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def clustering(store, model_dir, points_dir, radius, device, seed, as_json):
    """Purity / entropy / F-score of the model's cell clusters against annotated cell
    classes, next to the hand-made-feature k-means baseline ("MF + k-means").

    Annotated points are matched one-to-one to detected cells within --radius.  Then, for
    each method, the confusion table: matched cells per cluster and annotated type, each
    cluster's majority type and its share, and (GAN) what the cluster's nuclei are like
    against the others of their slide ("small, round, dark").
    """
    from wsicell.analysis.evaluation import evaluate_clustering

    result = evaluate_clustering(store, model_dir, points_dir, radius, device, seed)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['matched']} matched cells, k = {result['k']}, model {result['model_id']}")
    _print_scores([("GAN (Q head)", result["gan"]), ("MF + k-means", result["baseline"])],
                  ["purity", "entropy", "fscore"])
    for name, title in (("gan", "GAN (Q head)"), ("baseline", "MF + k-means")):
        _print_confusion(title, result["confusion"][name], result["types"],
                         result["descriptions"] if name == "gan" else None)


def _print_confusion(title: str, records: list[dict], types: list[str],
                     descriptions: list[str] | None) -> None:
    """Clusters (rows) against annotated types (columns): matched cells, majority share."""
    width = max(10, *(len(t) + 2 for t in types))
    share = max(8, *(len(t) + 5 for t in types))
    click.echo(f"\n{title}: matched cells per cluster (rows) and annotated type (columns)")
    click.echo(f"  {'cluster':8s}" + "".join(f"{t:>{width}s}" for t in types)
               + f"{'cells':>8s}  {'majority':{share}s}"
               + ("  typical nucleus" if descriptions else ""))
    for r in records:
        majority = f"{r['majority']} {100 * r['share']:.0f}%" if r["cells"] else "-"
        line = (f"  {r['cluster']:<8d}" + "".join(f"{r[t]:>{width}d}" for t in types)
                + f"{r['cells']:>8d}  {majority:{share}s}")
        if descriptions:
            line += f"  {descriptions[r['cluster']]}"
        click.echo(line.rstrip())


@evaluate.command()
@click.option("--predictions", required=True, type=click.Path(),
              help="Results directory of wsicell predict (or its slide_predictions.csv).")
@click.option("--labels", required=True, type=click.Path(), help="CSV slide_id,label.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def slides(predictions, labels, as_json):
    """Slide labels against slide predictions: purity / entropy / F-score of the slide
    k-means clusters, precision / recall / F-score of the SVM classes."""
    from wsicell.analysis.evaluation import evaluate_slide_predictions

    result = evaluate_slide_predictions(predictions, labels)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['n_slides']} labelled slides")
    if "kmeans" in result:
        _print_scores([("k-means", result["kmeans"])], ["purity", "entropy", "fscore"])
    rows = [(name, result[key]) for key, name in (("svm", "SVM (fitted)"),
                                                  ("cross_validation", "SVM (CV)"))
            if key in result]
    if rows:
        _print_scores(rows, ["precision", "recall", "fscore"])
