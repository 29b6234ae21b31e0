"""The HTML report of a prediction run: one self-contained page a pathologist can check.

:func:`write_html_report` puts PNGs (:mod:`wsicell.viz.figures`) and tables into one HTML
file (images embedded, each linking to its PNG file); :func:`write_prediction_report` draws
every picture of a prediction run and writes that page.
"""

from __future__ import annotations

import base64
import html
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from wsicell.io.store import read_labels, slide_attrs, slide_crops, slide_pictures
from wsicell.viz.figures import (
    draw_cluster_gallery,
    draw_generator_grid,
    draw_pca_scatter,
    draw_proportion_bars,
    draw_slide_overview,
    image_is_blank,
)


@dataclass
class Section:
    """One part of the HTML report: a heading, a note, tables and images."""

    title: str
    text: str = ""
    tables: list[pd.DataFrame] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)


def _embedded_image(path: Path, html_dir: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    href = html.escape(Path(path).resolve().relative_to(html_dir.resolve()).as_posix()
                       if Path(path).resolve().is_relative_to(html_dir.resolve())
                       else Path(path).resolve().as_uri())
    return (f'<a href="{href}"><img src="data:image/png;base64,{data}" '
            f'alt="{html.escape(Path(path).name)}"></a>')


def write_html_report(path: str | Path, title: str, sections: list[Section],
                      provenance: dict) -> Path:
    """Write one self-contained HTML page (images embedded, each linking to its PNG).

    Parameters
    ----------
    path : str or Path
        The ``.html`` file; written to a temporary name and renamed when complete.
    title : str
    sections : list of Section
    provenance : dict
        Configuration, version, model id, ... shown at the end of the page.
    """
    path = Path(path)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "img{max-width:100%;margin:4px;border:1px solid #ddd}"
             "table{border-collapse:collapse;font-size:12px;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px}pre{font-size:11px;background:#f6f6f6;"
             "padding:8px;overflow:auto}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        parts += [table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
                  for table in section.tables]
        parts += [_embedded_image(image, path.parent) for image in section.images]
    parts.append("<h2>Provenance</h2><pre>"
                 f"{html.escape(json.dumps(provenance, indent=1, default=str))}</pre></body></html>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path


def training_table(train_config: dict) -> pd.DataFrame:
    """A two-column table (``setting``, ``value``) of a model's training configuration."""
    return pd.DataFrame({"setting": list(train_config),
                         "value": [json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
                                   for v in train_config.values()]})


def _sample_crops_per_cluster(root, slide_ids: list[str], model_id: str, k: int,
                              per_cluster: int, seed: int, max_chunks: int = 16) -> list[np.ndarray]:
    """Up to ``per_cluster`` random crops of each cluster, drawn over all slides.

    Cells are drawn from ``max_chunks`` random crop chunks when those hold enough of a
    cluster (so a gallery of a big store reads a bounded number of chunks), else from all.
    """
    rng = np.random.default_rng(seed)
    clusters = [read_labels(root, s, model_id)[0] for s in slide_ids]
    chunk = np.array([slide_crops(root, s).chunks[0] for s in slide_ids])
    slide_of = np.concatenate([np.full(len(c), i) for i, c in enumerate(clusters)])
    index_of = np.concatenate([np.arange(len(c)) for c in clusters])
    everything = np.concatenate(clusters)
    _, chunk_id = np.unique(np.stack([slide_of, index_of // chunk[slide_of]]), axis=1,
                            return_inverse=True)
    preferred = np.isin(chunk_id, rng.permutation(chunk_id.max() + 1)[:max_chunks])
    samples = []
    for cluster in range(k):
        members = np.flatnonzero(everything == cluster)
        near = members[preferred[members]]
        pool = near if len(near) >= per_cluster else members
        chosen = np.sort(rng.choice(pool, min(per_cluster, len(pool)), replace=False))
        crops = [slide_crops(root, slide_ids[s]).oindex[index_of[chosen][slide_of[chosen] == s]]
                 for s in np.unique(slide_of[chosen])]
        samples.append(np.concatenate(crops) if crops else np.empty((0, 32, 32, 3), np.uint8))
    return samples


def write_prediction_report(out_dir: Path, root, model, results, predictions: pd.DataFrame,
                            summary: dict, provenance: dict, per_cluster: int = 60) -> Path:
    """Draw every picture of a prediction run into ``out_dir/report/`` and write the page.

    Parameters
    ----------
    out_dir : Path
        Results directory; the page is ``out_dir/report.html``.
    root : zarr.Group
        The cell store (labels, crops, thumbnails).
    model : TrainedModel
    results : list of SlideProportions
        Counts per slide and per grid region (see ``wsicell.pipeline.predict``).
    predictions : DataFrame
        The slide predictions table.
    summary, provenance : dict
        Slide-prediction summary and the run's provenance.

    Returns
    -------
    Path of the HTML report.
    """
    pictures = Path(out_dir) / "report"
    pictures.mkdir(parents=True, exist_ok=True)
    k = model.k
    counts = np.stack([r.counts for r in results]).sum(axis=0)
    total = max(int(counts.sum()), 1)
    samples = _sample_crops_per_cluster(root, [r.slide_id for r in results], model.model_id, k,
                                        per_cluster, seed=model.config.train.seed)
    galleries = [draw_cluster_gallery(samples[c], c, int(counts[c]), counts[c] / total,
                                      pictures / f"gallery_cluster_{c}.png") for c in range(k)]
    generator = draw_generator_grid(model.generate_grid(8, seed=0), pictures / "generator.png")

    overviews = []
    for r in results:
        attrs = slide_attrs(root, r.slide_id)
        area_mm2 = (r.grid.region_px * float(attrs["mpp"]) / 1000) ** 2
        thumbnail, mask = slide_pictures(root, r.slide_id)
        overviews.append(draw_slide_overview(
            thumbnail, mask, r.grid_counts / area_mm2,
            (int(attrs["width"]), int(attrs["height"])), r.grid.region_px,
            f"{r.slide_id}: {int(r.counts.sum())} cells", pictures / f"slide_{r.slide_id}.png"))

    p_columns = [f"p_{i}" for i in range(k)]
    proportions = predictions[p_columns].fillna(0).to_numpy()
    slide_ids = predictions.slide_id.tolist()
    predicted = (predictions.svm_class if "svm_class" in predictions else
                 predictions.kmeans_cluster.astype(str) if "kmeans_cluster" in predictions else None)
    labels = predictions.label if "label" in predictions else None
    pca = draw_pca_scatter(proportions, slide_ids, predicted, labels, pictures / "slides_pca.png")
    bars = draw_proportion_bars(proportions, slide_ids, pictures / "proportions.png")

    blank = [p.name for p in [*galleries, generator, *overviews, pca, bars] if image_is_blank(p)]
    if blank:
        warnings.warn(f"report: blank picture(s) {', '.join(blank)}", stacklevel=2)

    cv = summary.get("cross_validation")
    sections = [
        Section("Slides", "Cell-type proportions and slide-level predictions.",
                [predictions], [bars, pca]),
        Section("Cell types", "Random cells of each cluster (Q's argmax) and the generator's "
                "view of each category (rows = noise z, columns = category).",
                images=[generator, *galleries]),
        Section("Slides in detail", "Thumbnail with the tissue outline, then the density of "
                "each cell type (cells per mm^2 of each grid region).", images=overviews),
        Section("Model", f"Model {model.model_id}: the training configuration it was trained "
                "with (full configuration under Provenance).",
                [training_table(model.config.train.model_dump(mode="json"))]),
    ]
    if cv:
        sections.insert(1, Section("Slide classifier", f"Stratified {cv['folds']}-fold "
                                   "cross-validation of the linear SVM on the labelled slides.",
                                   [pd.DataFrame([cv])]))
    return write_html_report(Path(out_dir) / "report.html",
                             f"wsicell prediction, model {model.model_id}", sections, provenance)
