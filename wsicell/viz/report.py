"""The HTML report of a prediction run: one self-contained page a pathologist can check.

:func:`write_html_report` puts PNGs (:mod:`wsicell.viz.figures`), tables and HTML blocks into
one HTML file (images embedded, each linking to its PNG file); :func:`write_prediction_report`
draws every picture of a prediction run and writes that page: a summary first (slides, cells,
cell types, warnings in plain words), then the cell-type proportions in percent, the cell
types (galleries with a scale bar), each slide in detail, the training curves and the model.
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

from wsicell.analysis.cluster_descriptions import store_cluster_descriptions
from wsicell.analysis.metrics import SMALL_NUCLEUS_UM2, area_summary
from wsicell.analysis.proportions import cluster_warnings
from wsicell.errors import WsicellError
from wsicell.io.slide import open_slide
from wsicell.io.store import (
    file_fingerprint,
    read_labels,
    slide_attrs,
    slide_cells,
    slide_crops,
    slide_pictures,
)
from wsicell.palette import cluster_colours
from wsicell.viz.figures import (
    draw_area_histograms,
    draw_cluster_gallery,
    draw_generator_grid,
    draw_losses,
    draw_occupancy,
    draw_pca_scatter,
    draw_proportion_bars,
    draw_slide_overview,
    image_is_blank,
)

#: Longest side, in pixels, of the slide pictures of the report (read from the slide file).
OVERVIEW_SIDE = 900
#: Fewest slides for which a PCA of slides is drawn (below, a table says it all).
PCA_MIN_SLIDES = 3
#: A slide with fewer cells than this gets a warning: its proportions are noisy.
FEW_CELLS = 100
#: A cluster holding more than this share of all cells gets a warning.

STYLE = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:1.5em 2em;
 max-width:1400px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0.2em}h2{border-bottom:2px solid #ddd;padding-bottom:3px;
 margin-top:1.8em}
.sub{color:#666;margin-top:0}
img{max-width:100%;border:1px solid #e3e3e3}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:10px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 16px;min-width:150px;background:#fafafa}
.card .value{font-size:1.8em;font-weight:600}.card .label{color:#555;font-size:0.9em}
.warnings{background:#fff6e0;border-left:5px solid #e8a200;padding:6px 14px;margin:10px 0}
.ok{background:#eef8ee;border-left:5px solid #3a9a3a;padding:6px 14px;margin:10px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}
.grid figure{margin:0;border:1px solid #e3e3e3;padding:6px;background:#fff}
.grid figure img{border:none;width:100%}
figcaption{font-size:0.9em;color:#444}
.swatch{display:inline-block;width:0.9em;height:0.9em;border-radius:2px;margin-right:4px;
 vertical-align:-1px}
.note{color:#555;font-style:italic}
pre{font-size:11px;background:#f6f6f6;padding:8px;overflow:auto}
"""


@dataclass
class Section:
    """One part of the HTML report: a heading, a note, HTML blocks, tables and images.

    ``html`` is inserted as it is (built by this module, its text escaped); ``grid`` lays
    the images out in a regular grid of equal cells, with ``captions`` under them.
    """

    title: str
    text: str = ""
    tables: list[pd.DataFrame] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    html: str = ""
    grid: bool = False
    captions: list[str] = field(default_factory=list)


def _embedded_image(path: Path, html_dir: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    href = html.escape(Path(path).resolve().relative_to(html_dir.resolve()).as_posix()
                       if Path(path).resolve().is_relative_to(html_dir.resolve())
                       else Path(path).resolve().as_uri())
    return (f'<a href="{href}"><img src="data:image/png;base64,{data}" '
            f'alt="{html.escape(Path(path).name)}"></a>')


def write_html_report(path: str | Path, title: str, sections: list[Section],
                      provenance: dict, subtitle: str = "") -> Path:
    """Write one self-contained HTML page (images embedded, each linking to its PNG).

    Parameters
    ----------
    path : str or Path
        The ``.html`` file; written to a temporary name and renamed when complete.
    title : str
    sections : list of Section
    provenance : dict
        Configuration, version, model id, ... shown at the end of the page.
    subtitle : str
        A line under the title.
    """
    path = Path(path)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f"<p class='sub'>{html.escape(subtitle)}</p>")
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.html:
            parts.append(section.html)
        parts += [table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
                  for table in section.tables]
        if section.grid:
            captions = section.captions + [""] * (len(section.images) - len(section.captions))
            parts.append("<div class='grid'>" + "".join(
                f"<figure>{_embedded_image(image, path.parent)}<figcaption>{caption}"
                "</figcaption></figure>" for image, caption in zip(section.images, captions))
                + "</div>")
        else:
            parts += [_embedded_image(image, path.parent) for image in section.images]
    parts.append("<h2>Provenance</h2><details><summary>wsicell version, model, store and the "
                 "full configuration of this run</summary><pre>"
                 f"{html.escape(json.dumps(provenance, indent=1, default=str))}</pre></details>"
                 "</body></html>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path


def training_table(train_config: dict) -> pd.DataFrame:
    """A two-column table (``setting``, ``value``) of a model's training configuration."""
    return pd.DataFrame({"setting": list(train_config),
                         "value": [json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
                                   for v in train_config.values()]})


STOPPED_BY = {"epochs": "its configured epochs", "max_iters": "--max-iters",
              "max_minutes": "--max-minutes (its time budget)"}


def training_run_table(training: dict) -> pd.DataFrame:
    """A two-column table (``setting``, ``value``) of what a training run did: iterations
    trained (and what the configured epochs take), why it stopped, wall time, device and
    precision (the keys of ``TrainedModel.training`` it holds; models of older versions
    give fewer rows)."""
    rows = []
    if "iterations" in training:
        full = training.get("epochs_iterations")
        rows.append(("iterations trained", f"{training['iterations']:,}" + (
            f" (the configured epochs: {full:,})" if full else "")))
    if "stop_reason" in training:
        rows.append(("stopped by", STOPPED_BY.get(training["stop_reason"],
                                                  str(training["stop_reason"]))))
    if "wall_s" in training:
        rows.append(("wall time", f"{training['wall_s'] / 60:.1f} min"))
    if "device" in training:
        rows.append(("device", f"{training['device']}, {training.get('precision', '')}"
                     .rstrip(", ")))
    return pd.DataFrame(rows, columns=["setting", "value"])


def value_trend(values, min_rows: int = 20, tolerance: float = 0.1) -> str:
    """Whether a training curve has levelled off: ``rising``, ``falling``, ``levelled`` or
    ``too short``, from the means of its last two quarters.

    Parameters
    ----------
    values : array-like, shape (n,)
        One value per iteration (e.g. V(D,G)).
    min_rows : int
        Fewer values are ``too short`` to tell.
    tolerance : float
        The last quarter's mean may differ from the third's by this fraction of the
        curve's spread (5th to 95th percentile) and still count as level.

    Examples
    --------
    >>> value_trend(np.arange(100.0)), value_trend(np.r_[np.arange(50.0), np.full(50, 50.0)])
    ('rising', 'levelled')
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < min_rows:
        return "too short"
    spread = np.percentile(values, 95) - np.percentile(values, 5)
    quarter = len(values) // 4
    change = values[-quarter:].mean() - values[-2 * quarter:-quarter].mean()
    if spread == 0 or abs(change) <= tolerance * spread:
        return "levelled"
    return "rising" if change > 0 else "falling"


def generator_size_note(train: dict) -> str | None:
    """What the generator's cells show of the nuclei's sizes, for a model's training
    configuration (its ``train`` section as JSON); None for a model that saw its crops as
    stored (``nucleus_px`` 0).

    Examples
    --------
    >>> generator_size_note({"nucleus_px": 0}) is None
    True
    >>> "one size" in generator_size_note({"nucleus_px": 28, "size_channel": 1})
    True
    """
    if not train.get("nucleus_px"):
        return None
    note = (f"The model sees every nucleus scaled to one size (the longer side of its box "
            f"{train['nucleus_px']:g} of 32 px), so the generator draws them at that size: "
            "compare shape, texture and stain here, and the sizes in the table of cell types")
    if train.get("size_channel"):
        note += ("; each nucleus's measured size is a separate input of the model, and the "
                 "generator makes one for each of its cells too, which these pictures do "
                 "not show")
    return note + "."


def training_caveat(training: dict, loss_rows: list[dict]) -> str | None:
    """A plain warning when the model is partly trained: stopped before its configured
    epochs (``--max-iters``, ``--max-minutes``) or V(D,G) still rising at the end (the
    critic winning); None otherwise."""
    reasons = []
    done, full = training.get("iterations"), training.get("epochs_iterations")
    if training.get("stop_reason") in ("max_iters", "max_minutes") and done and full \
            and done < full:
        reasons.append(f"it trained {done:,} of the {full:,} iterations of its configured "
                       f"epochs (stopped by --{training['stop_reason'].replace('_', '-')})")
    if value_trend([row["V"] for row in loss_rows if "V" in row]) == "rising":
        reasons.append("V(D,G) was still rising when it stopped (it should level off)")
    if not reasons:
        return None
    return ("A partly trained model: " + "; ".join(reasons) + ". The generator's cells and "
            "the cell types (clusters) are those of a short run: train longer (wsicell train "
            "--resume with a larger --max-iters or --max-minutes) before relying on them.")


def _swatch(cluster: int, k: int) -> str:
    colour = cluster_colours(k)[cluster]
    return (f"<span class='swatch' style='background:rgb({colour[0]},{colour[1]},{colour[2]})'>"
            "</span>")


def _html_table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset(),
                attrs: list[str] | None = None) -> str:
    """A table of already escaped cells; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        extra = f" {attrs[i]}" if attrs else ""
        cells = "".join(f"<td class='num'>{c}</td>" if j in numeric else f"<td>{c}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr{extra}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _percent(value) -> str:
    return "" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"


# --------------------------------------------------------------------------- summary


def _slides_phrase(slide_ids: list[str], verb: bool = True) -> str:
    """``Slide a has`` / ``3 slides (a, b, c) have`` (the first five named)."""
    if len(slide_ids) == 1:
        return f"slide {slide_ids[0]}" if not verb else f"Slide {slide_ids[0]} has"
    named = ", ".join(slide_ids[:5]) + (f" and {len(slide_ids) - 5} more" if len(slide_ids) > 5
                                        else "")
    return f"{len(slide_ids)} slides ({named})" + (" have" if verb else "")


def report_summary(root, slide_ids: list[str], model_id: str, k: int) -> dict:
    """The numbers at the top of the report, read from the store's labels.

    Returns
    -------
    dict
        ``slides`` (ids), ``cells`` (total), ``cells_per_slide`` ({slide: n}),
        ``cluster_cells`` (list of k counts over all slides), ``k``, ``clusters_used``
        (clusters holding at least one cell) and ``warnings`` (plain sentences).
    """
    per_slide, counts = {}, np.zeros(k, np.int64)
    for slide_id in slide_ids:
        cluster, _ = read_labels(root, slide_id, model_id)
        per_slide[slide_id] = len(cluster)
        counts += np.bincount(cluster.astype(np.int64), minlength=k)[:k]
    total = int(counts.sum())
    notes = cluster_warnings(counts)
    none = [s for s, n in per_slide.items() if n == 0]
    few = [s for s, n in per_slide.items() if 0 < n < FEW_CELLS]
    if none:
        notes.append(f"{_slides_phrase(none)} no detected cell: "
                     f"{'its' if len(none) == 1 else 'their'} proportions are empty.")
    if few:
        notes.append(f"{_slides_phrase(few)} fewer than {FEW_CELLS} cells "
                     f"({', '.join(str(per_slide[s]) for s in few[:5])}"
                     f"{', ...' if len(few) > 5 else ''}): "
                     f"{'its' if len(few) == 1 else 'their'} proportions are uncertain.")
    for source, how in (("override", "given on the command line (--mpp)"),
                        ("assumed", "assumed (the file states none)")):
        chosen = [s for s in slide_ids if slide_attrs(root, s).get("mpp_source") == source]
        if chosen:
            sizes = sorted({float(slide_attrs(root, s)["mpp"]) for s in chosen})
            notes.append(f"The pixel size of {_slides_phrase(chosen, verb=False)}, "
                         f"{' / '.join(f'{m:g}' for m in sizes)} \u00b5m, was {how}: areas and "
                         "densities are only as right as that value.")
    return {"slides": list(slide_ids), "cells": total, "cells_per_slide": per_slide,
            "cluster_cells": counts.tolist(), "k": k,
            "clusters_used": int((counts > 0).sum()), "warnings": notes}


def summary_html(summary: dict, extra_warnings: list[str] = ()) -> str:
    """The summary block: cards (slides, cells, cell types) and the warnings in plain words.

    Each number carries a ``data-summary`` attribute (``slides``, ``cells``, ``clusters``,
    ``clusters-used``) and each per-slide row a ``data-slide`` / ``data-cells`` pair, so that
    the page can be checked against the store.
    """
    k = summary["k"]
    cards = [("slides", len(summary["slides"]), "slides"),
             ("cells", summary["cells"], "cells (nuclei) labelled"),
             ("clusters", k, "cell types (clusters) in the model"),
             ("clusters-used", summary["clusters_used"], "cell types with cells here")]
    parts = ["<div class='cards'>" + "".join(
        f"<div class='card'><div class='value' data-summary='{key}'>{value:,}</div>"
        f"<div class='label'>{label}</div></div>" for key, value, label in cards) + "</div>"]
    notes = [*summary["warnings"], *extra_warnings]
    if notes:
        parts.append("<div class='warnings'><b>Please note</b><ul>"
                     + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul></div>")
    else:
        parts.append("<div class='ok'>No warnings: every slide has cells and every cell type "
                     "is used.</div>")
    counts = np.asarray(summary["cluster_cells"], dtype=np.float64)
    total = max(counts.sum(), 1)
    parts.append("<div class='cards'><div>")
    parts.append(_html_table(
        ["cell type (cluster)", "cells", "share of all cells"],
        [[f"{_swatch(c, k)}cluster {c}", f"{int(counts[c]):,}", _percent(counts[c] / total)]
         for c in range(k)], numeric={1, 2},
        attrs=[f"data-cluster='{c}' data-cells='{int(counts[c])}'" for c in range(k)]))
    parts.append("</div><div>")
    parts.append(_html_table(
        ["slide", "cells"],
        [[html.escape(s), f"{n:,}"] for s, n in summary["cells_per_slide"].items()],
        numeric={1},
        attrs=[f"data-slide='{html.escape(s, quote=True)}' data-cells='{n}'"
               for s, n in summary["cells_per_slide"].items()]))
    parts.append("</div></div>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- tables


#: A slide with more of its objects under SMALL_NUCLEUS_UM2 than this is flagged.
SMALL_FRACTION_WARNING = 0.2


def nuclei_html(root, slide_ids: list[str]) -> tuple[str, dict[str, np.ndarray], list[str]]:
    """The nuclei the segmentation found on each slide: the segmentation preset, the area
    distribution (quartiles, share under ``SMALL_NUCLEUS_UM2``) and the objects refused as
    too large.  Returns the table, the areas per slide (um2) and warnings in plain words."""
    rows, areas, notes = [], {}, []
    for slide_id in slide_ids:
        attrs = slide_attrs(root, slide_id)
        area = slide_cells(root, slide_id, ["area"])["area"].to_numpy(np.float64)
        areas[slide_id] = area
        found = area_summary(area)
        preset = attrs.get("config", {}).get("segmentation", {}).get("preset", "")
        refused = attrs.get("n_refused", 0)
        rows.append([html.escape(slide_id), html.escape(preset), f"{found.n:,}",
                     *(("",) * 4 if not found.n else (
                         f"{found.q25:.0f}", f"{found.median:.0f}", f"{found.q75:.0f}",
                         _percent(found.small_fraction))), f"{refused:,}"])
        if found.n and found.small_fraction > SMALL_FRACTION_WARNING:
            notes.append(f"{_percent(found.small_fraction)} of the nuclei of {slide_id} are "
                         f"smaller than {SMALL_NUCLEUS_UM2:g} \u00b5m\u00b2, smaller than a "
                         "nucleus: the segmentation may be outlining debris, keratin or "
                         "fragments there; look at its cells before trusting its proportions.")
    table = _html_table(["slide", "segmentation", "nuclei", "area q1 (\u00b5m\u00b2)",
                         "median", "q3", f"under {SMALL_NUCLEUS_UM2:g} \u00b5m\u00b2",
                         "refused as too large"], rows, numeric={2, 3, 4, 5, 6, 7})
    return table, areas, notes



def proportions_html(predictions: pd.DataFrame, k: int, show_kmeans: bool) -> str:
    """Per slide: cells, the share of each cell type in percent, and the slide-level
    predictions that mean something (k-means only with more slides than slide clusters)."""
    header = ["slide", "cells", *[f"{_swatch(c, k)}cluster {c}" for c in range(k)]]
    optional = [("kmeans_cluster", "slide group (k-means)", lambda v: str(int(v))),
                ("kmeans_distance", "distance to group centre", lambda v: f"{v:.3f}"),
                ("label", "given label", str), ("cv_predicted", "cross-validated prediction", str),
                ("svm_class", "predicted class (SVM)", str),
                ("svm_score", "SVM score", lambda v: f"{v:+.2f}")]
    shown = [(column, title, fmt) for column, title, fmt in optional
             if column in predictions and (show_kmeans or not column.startswith("kmeans"))]
    header += [title for _, title, _ in shown]
    rows = []
    for _, row in predictions.iterrows():
        cells = [html.escape(str(row.slide_id)), f"{int(row.n_cells):,}"]
        cells += [_percent(row.get(f"p_{c}", np.nan)) for c in range(k)]
        for column, _, fmt in shown:
            value = row[column]
            cells.append("" if pd.isna(value) or value == "" else html.escape(fmt(value)))
        rows.append(cells)
    return _html_table(header, rows, numeric=set(range(1, k + 2)))


def cluster_table_html(root, slide_ids: list[str], model_id: str, k: int,
                       descriptions: pd.DataFrame | None = None) -> str:
    """Per cell type: cells, share, mean nucleus area (um^2), mean hematoxylin (0..255)
    and, when given, the description of its typical nucleus relative to its slide
    (:func:`wsicell.analysis.cluster_descriptions.store_cluster_descriptions`)."""
    area_sum, stain_sum, counts = np.zeros(k), np.zeros(k), np.zeros(k)
    for slide_id in slide_ids:
        cluster, _ = read_labels(root, slide_id, model_id)
        cells = slide_cells(root, slide_id)
        cluster = cluster.astype(np.int64)
        counts += np.bincount(cluster, minlength=k)[:k]
        area_sum += np.bincount(cluster, cells["area"].to_numpy(np.float64), k)[:k]
        stain_sum += np.bincount(cluster, cells["mean_hematoxylin"].to_numpy(np.float64), k)[:k]
    total = max(counts.sum(), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        area, stain = area_sum / counts, stain_sum / counts
    rows = [[f"{_swatch(c, k)}cluster {c}", f"{int(counts[c]):,}", _percent(counts[c] / total),
             "" if counts[c] == 0 else f"{area[c]:.1f}",
             "" if counts[c] == 0 else f"{stain[c]:.0f}"] for c in range(k)]
    header = ["cell type", "cells", "share", "mean nucleus area (\u00b5m\u00b2)",
              "mean hematoxylin (0-255, lower = darker)"]
    if descriptions is not None:
        header += ["typical nucleus (against its slide)", "median roundness (1 = round)"]
        for c, row in enumerate(rows):
            d = descriptions.loc[c]
            row += [html.escape(d.description),
                    "" if pd.isna(d.roundness) else f"{d.roundness:.2f}"]
    return _html_table(header, rows, numeric={1, 2, 3, 4, 6})


def _generator_columns_html(descriptions: pd.DataFrame, k: int) -> str:
    """Under the generator's grid: what the real cells of each column's cluster look like."""
    items = "".join(f"<li>{_swatch(c, k)}column {c + 1} = cluster {c}: "
                    f"{html.escape(descriptions.description[c] or 'no cell')}</li>"
                    for c in range(k))
    return ("<p>The real cells of each cluster, measured (median nucleus against its "
            f"slide's nuclei):</p><ul>{items}</ul>")


# --------------------------------------------------------------------------- pictures


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


def slide_picture(root, slide_id: str, max_side: int = OVERVIEW_SIDE) -> np.ndarray | None:
    """The slide at about ``max_side`` pixels, read from its file when that file is still the
    one ingested (same fingerprint); else the store's thumbnail (None when there is none)."""
    attrs = slide_attrs(root, slide_id)
    width, height = int(attrs["width"]), int(attrs["height"])
    scale = min(1.0, max_side / max(width, height))
    try:
        source = Path(attrs["source_path"])
        if file_fingerprint(source) == attrs.get("fingerprint"):
            slide = open_slide(source)
            try:
                return slide.thumbnail(max(1, round(width * scale)), max(1, round(height * scale)))
            finally:
                slide.close()
    except Exception:  # noqa: BLE001 - moved, changed or unreadable: the thumbnail still shows it
        pass
    return slide_pictures(root, slide_id)[0]


def _loss_rows(model_dir: Path | None) -> list[dict]:
    if model_dir is None or not (Path(model_dir) / "log.jsonl").is_file():
        return []
    # imported here: it loads torch, needed only when there is a log to read
    from wsicell.learning.checkpoints import read_loss_log

    try:
        return read_loss_log(Path(model_dir) / "log.jsonl")
    except WsicellError as err:
        warnings.warn(f"report: training log not shown ({err})", stacklevel=3)
        return []


def write_prediction_report(out_dir: Path, root, model, results, predictions: pd.DataFrame,
                            summary: dict, provenance: dict, per_cluster: int = 60,
                            model_dir: str | Path | None = None) -> Path:
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
    per_cluster : int
        Cells shown per cluster gallery.
    model_dir : path, optional
        The model's directory: its ``log.jsonl`` gives the training curves (default:
        ``provenance["model_dir"]``).

    Returns
    -------
    Path of the HTML report.
    """
    pictures = Path(out_dir) / "report"
    pictures.mkdir(parents=True, exist_ok=True)
    k = model.k
    slide_ids = [r.slide_id for r in results]
    overview = report_summary(root, slide_ids, model.model_id, k)
    nuclei_table, areas, nuclei_notes = nuclei_html(root, slide_ids)
    overview["warnings"].extend(nuclei_notes)
    area_picture = draw_area_histograms(areas, SMALL_NUCLEUS_UM2, pictures / "nucleus_areas.png")
    counts = np.asarray(overview["cluster_cells"])
    total = max(int(counts.sum()), 1)
    reference_mpp = model.config.segmentation.reference_mpp
    samples = _sample_crops_per_cluster(root, slide_ids, model.model_id, k, per_cluster,
                                        seed=model.config.train.seed)
    columns = 10
    rows = max(1, -(-per_cluster // columns))
    galleries = [draw_cluster_gallery(samples[c], c, int(counts[c]), counts[c] / total,
                                      pictures / f"gallery_cluster_{c}.png", columns, rows,
                                      mpp=reference_mpp) for c in range(k)]
    descriptions = store_cluster_descriptions(root, slide_ids, model.model_id, k,
                                              seed=model.config.train.seed)
    described = [f" &mdash; {html.escape(d)}" if d else "" for d in descriptions.description]
    gallery_captions = [
        f"{_swatch(c, k)}cluster {c}: {int(counts[c]):,} cells ({_percent(counts[c] / total)})"
        + described[c]
        + ("" if counts[c] else " &mdash; <b>no cell of these slides is in this cluster</b>")
        for c in range(k)]
    generator = draw_generator_grid(model.generate_grid(8, seed=0), pictures / "generator.png")

    overviews = []
    for r in results:
        attrs = slide_attrs(root, r.slide_id)
        area_mm2 = (r.grid.region_px * float(attrs["mpp"]) / 1000) ** 2
        _, mask = slide_pictures(root, r.slide_id)
        overviews.append(draw_slide_overview(
            slide_picture(root, r.slide_id), mask, r.grid_counts / area_mm2,
            (int(attrs["width"]), int(attrs["height"])), r.grid.region_px,
            f"{r.slide_id}: {int(r.counts.sum()):,} cells", pictures / f"slide_{r.slide_id}.png"))

    p_columns = [f"p_{i}" for i in range(k)]
    proportions = predictions[p_columns].fillna(0).to_numpy()
    predicted = (predictions.svm_class if "svm_class" in predictions else
                 predictions.kmeans_cluster.astype(str) if "kmeans_cluster" in predictions else None)
    labels = predictions.label if "label" in predictions else None
    bars = draw_proportion_bars(proportions, predictions.slide_id.tolist(),
                                pictures / "proportions.png")
    slide_images = [bars]
    n_slides = len(predictions)
    if n_slides >= PCA_MIN_SLIDES:
        slide_images.append(draw_pca_scatter(proportions, predictions.slide_id.tolist(),
                                             predicted, labels, pictures / "slides_pca.png"))
    else:
        (pictures / "slides_pca.png").unlink(missing_ok=True)  # a stale one of an earlier run
    slide_groups = summary.get("kmeans", {}).get("clusters")
    show_kmeans = slide_groups is not None and n_slides > slide_groups
    notes = []
    if n_slides < PCA_MIN_SLIDES:
        notes.append(f"A map of the slides (PCA of their proportions) needs at least "
                     f"{PCA_MIN_SLIDES} slides; with {n_slides} the table says it all.")
    if slide_groups is not None and not show_kmeans:
        notes.append(f"{n_slides} slides and {slide_groups} slide groups: each slide is its own "
                     "k-means group, so the groups are not shown.")

    loss_rows = _loss_rows(model_dir if model_dir is not None else provenance.get("model_dir"))
    losses = (draw_losses(loss_rows, f"model {model.model_id}: training losses",
                          pictures / "losses.png") if loss_rows else None)
    watched = [r for r in loss_rows if "occupancy" in r]
    occupancy = draw_occupancy(watched, pictures / "occupancy.png") if watched else None
    training_pictures = [p for p in (losses, occupancy) if p]

    drawn = [*galleries, generator, area_picture, *overviews, *slide_images,
             *training_pictures]
    blank = [p.name for p in drawn if image_is_blank(p)]
    if blank:
        warnings.warn(f"report: blank picture(s) {', '.join(blank)}", stacklevel=2)
    extra = [f"Picture(s) {', '.join(blank)} came out blank."] if blank else []
    training = getattr(model, "training", {})
    caveat = training_caveat(training, loss_rows)
    size_note = generator_size_note(model.config.train.model_dump(mode="json"))
    extra += [caveat] if caveat else []

    cv = summary.get("cross_validation")
    region_um = results[0].grid.region_px * float(slide_attrs(root, slide_ids[0])["mpp"]) \
        if results else 0
    sections = [
        Section("Summary", html=summary_html(overview, extra)),
        Section("Cell-type proportions", "The share of each cell type (cluster) among the "
                "cells of each slide, in percent of the slide's cells.",
                html=proportions_html(predictions, k, show_kmeans)
                + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes),
                images=slide_images),
        Section("Cell types", f"{per_cluster} random cells of each cluster (the cluster Q gives "
                f"the highest probability). Each cell image is {32 * reference_mpp:.1f} \u00b5m "
                f"wide ({reference_mpp:g} \u00b5m per pixel); nuclei larger than that are shrunk "
                "to fit.",
                html=cluster_table_html(root, slide_ids, model.model_id, k, descriptions),
                images=galleries, grid=True, captions=gallery_captions),
        Section("Nuclei", "What the segmentation found on each slide: nucleus areas "
                "(quartiles and distribution, \u00b5m\u00b2) and the share of objects too "
                f"small to be a nucleus (under {SMALL_NUCLEUS_UM2:g} \u00b5m\u00b2). Objects "
                "too large to be one nucleus are not split into cells but counted as refused.",
                html=nuclei_table, images=[area_picture]),
        Section("What the model draws for each cell type", "The generator's cells for each "
                "category (rows = random noise z, columns = category): a column should look "
                "like one kind of cell." + "".join(
                    f" {n}" for n in (size_note, caveat) if n),
                images=[generator], html=_generator_columns_html(descriptions, k)),
        Section("Slides in detail", "Each slide with its tissue outline (green), then the "
                "density of each cell type: cells per mm\u00b2 in each "
                f"{region_um:.0f} \u00b5m square (dark blue = few, yellow = many; no colour = "
                "no cell of that type).", images=overviews),
        Section("Training", "Losses per iteration of the training run (thin) and their moving "
                "average (thick). V(D,G) should level off; L_Q should fall towards 0 (the "
                "categories are told apart)."
                + (" Below: the share of a fixed sample of real cells in each cluster during "
                   "training; a line climbing past 80% means the model is putting nearly "
                   "every cell in one cluster (a collapse)." if occupancy else "")
                if losses else "The model directory holds no training log (log.jsonl).",
                images=training_pictures),
        Section("Model", f"Model {model.model_id}: the training run (iterations, why it "
                "stopped, wall time) and the configuration it was trained with (full "
                "configuration under Provenance).",
                [t for t in (training_run_table(training),
                             training_table(model.config.train.model_dump(mode="json")))
                 if len(t)]),
    ]
    if cv:
        sections.insert(2, Section("Slide classifier", f"Stratified {cv['folds']}-fold "
                                   "cross-validation of the linear SVM on the labelled slides.",
                                   [pd.DataFrame([cv])]))
    subtitle = (f"model {model.model_id} (k={k}) \u00b7 store {provenance.get('store', '')} "
                f"\u00b7 wsicell {provenance.get('wsicell_version', '')}")
    return write_html_report(Path(out_dir) / "report.html", "wsicell prediction report",
                             sections, provenance, subtitle)
