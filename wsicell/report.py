"""Pictures a pathologist can check in a minute, and one HTML page that holds them.

Every ``draw_*`` function takes arrays, writes one PNG (matplotlib, Agg backend) and
returns its path; :func:`write_html_report` puts PNGs and tables into one
self-contained HTML file (images embedded, each linking to its PNG file).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

DPI = 100


def cluster_colours(k: int) -> np.ndarray:
    """A distinct colour per cluster (matplotlib ``tab10`` / ``tab20``), shape (k, 3), uint8."""
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return (np.array([cmap(i % cmap.N)[:3] for i in range(k)]) * 255).round().astype(np.uint8)


def crop_mosaic(crops: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """Tile crops into one image, row by row, separated by white gaps.

    Parameters
    ----------
    crops : ndarray, shape (N, h, w, 3), uint8
    columns : int

    Returns
    -------
    ndarray, shape (rows * (h + gap) - gap, columns * (w + gap) - gap, 3), uint8
        ``rows = ceil(N / columns)`` (at least 1); unused cells are white.
    """
    n, h, w = crops.shape[:3]
    rows = max(1, -(-n // columns))
    mosaic = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
    for i, crop in enumerate(crops):
        r, c = divmod(i, columns)
        mosaic[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = crop
    return mosaic


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_cluster_gallery(crops: np.ndarray, cluster: int, n_cells: int, share: float,
                         path: str | Path, columns: int = 10) -> Path:
    """Sample crops of one cluster as a mosaic (the paper's Fig. 8).

    Parameters
    ----------
    crops : ndarray, shape (M, 32, 32, 3), uint8
        The sampled crops (M may be 0).
    cluster : int
    n_cells, share : int, float
        Size of the cluster and its fraction of all cells, for the title.
    """
    fig, ax = plt.subplots(figsize=(columns * 0.55, max(1, -(-len(crops) // columns)) * 0.55 + 0.6))
    ax.imshow(crop_mosaic(crops, columns), interpolation="nearest")
    ax.set_title(f"cluster {cluster}: {n_cells} cells ({100 * share:.1f}%)")
    ax.axis("off")
    if len(crops) == 0:
        ax.text(0.5, 0.5, "no cell in this cluster", ha="center", va="center",
                transform=ax.transAxes)
    return _save(fig, path)


def draw_generator_grid(grid: np.ndarray, path: str | Path) -> Path:
    """The generator's view of each cluster: rows = fixed noise z, columns = category.

    Parameters
    ----------
    grid : ndarray, shape (rows, k, 32, 32, 3), uint8
    """
    rows, k = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(k * 0.7 + 0.5, rows * 0.7 + 0.6))
    ax.imshow(crop_mosaic(grid.reshape(rows * k, *grid.shape[2:]), k), interpolation="nearest")
    size = grid.shape[3] + 2
    ax.set_xticks(np.arange(k) * size + size / 2 - 1, [str(c) for c in range(k)])
    ax.set_yticks([])
    ax.set_xlabel("category (cluster)")
    ax.set_ylabel("noise z")
    ax.set_title("generator G(z, c)")
    return _save(fig, path)


def draw_slide_overview(thumbnail: np.ndarray | None, tissue_mask: np.ndarray | None,
                        density: np.ndarray, slide_size: tuple[int, int], region_px: float,
                        title: str, path: str | Path) -> Path:
    """Thumbnail with the tissue outline, and one density heatmap per cluster over it.

    Parameters
    ----------
    thumbnail : ndarray, shape (h, w, 3), uint8, or None
    tissue_mask : ndarray, shape (h', w'), bool, or None
    density : ndarray, shape (rows, cols, k), float
        Cells of each cluster per mm^2 in each grid region.
    slide_size : (width, height)
        Level-0 pixels; both thumbnail and grid are drawn in these coordinates.
    region_px : float
        Side of a grid region, level-0 pixels.
    """
    width, height = slide_size
    rows, cols, k = density.shape
    ncols = min(k + 1, 4)
    nrows = -(-(k + 1) // ncols)
    aspect = height / width
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.6 * nrows * aspect + 0.5),
                             squeeze=False)
    colours = cluster_colours(k) / 255
    grid_extent = (0, cols * region_px, rows * region_px, 0)
    vmax = np.nanmax(density) if np.isfinite(density).any() and np.nanmax(density) > 0 else 1
    for index, ax in enumerate(axes.ravel()):
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        if index > k:
            ax.axis("off")
            continue
        if thumbnail is not None:
            ax.imshow(thumbnail, extent=(0, width, height, 0))
        if index == 0:
            ax.set_title("tissue")
            if tissue_mask is not None and tissue_mask.any():
                h, w = tissue_mask.shape
                ax.contour((np.arange(w) + 0.5) * width / w, (np.arange(h) + 0.5) * height / h,
                           tissue_mask.astype(float), levels=[0.5], colors="lime", linewidths=1)
            continue
        cluster = index - 1
        layer = np.ma.masked_less_equal(density[..., cluster], 0)
        image = ax.imshow(layer, extent=grid_extent, cmap="magma", alpha=0.65, vmin=0, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(f"cluster {cluster}", color=colours[cluster])
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="cells / mm$^2$")
    fig.suptitle(title)
    return _save(fig, path)


def _pca_2d(proportions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components (zeros where the data has fewer) and explained ratios."""
    centred = proportions - proportions.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    xy = np.zeros((len(proportions), 2))
    m = min(2, len(s))
    xy[:, :m] = centred @ vt[:m].T
    variance = s ** 2
    ratio = np.zeros(2)
    ratio[:m] = variance[:m] / variance.sum() if variance.sum() > 0 else 0
    return xy, ratio


def draw_pca_scatter(proportions: np.ndarray, slide_ids: list[str], predicted,
                     labels, path: str | Path) -> Path:
    """Slides' proportion vectors projected by PCA to 2-D (the paper's Fig. 10).

    Parameters
    ----------
    proportions : ndarray, shape (S, k)
    slide_ids : list of str, length S
    predicted : sequence of str, length S, or None
        Predicted slide class / cluster, colours the left panel.
    labels : sequence of str, length S (missing = ""), or None
        Given slide labels, colour a second panel.
    """
    xy, ratio = _pca_2d(np.asarray(proportions, dtype=np.float64))
    panels = [("prediction", predicted)] + ([("label", labels)] if labels is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels):
        values = np.asarray(["slide"] * len(xy) if values is None else values, dtype=str)
        for i, value in enumerate(sorted(set(values))):
            chosen = values == value
            ax.scatter(xy[chosen, 0], xy[chosen, 1], s=50, color=plt.get_cmap("tab10")(i % 10),
                       label=value or "(unlabelled)", edgecolor="k")
        if len(xy) <= 30:
            for (x, y), sid in zip(xy, slide_ids):
                ax.annotate(sid, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.0f}% of variance)")
        ax.set_title(f"slides coloured by {name}")
        ax.legend(fontsize=8)
    return _save(fig, path)


def draw_proportion_bars(proportions: np.ndarray, slide_ids: list[str], path: str | Path) -> Path:
    """Stacked bars of each slide's cell-type proportions.

    Parameters
    ----------
    proportions : ndarray, shape (S, k), rows summing to 1
    slide_ids : list of str, length S
    """
    proportions = np.nan_to_num(np.asarray(proportions, dtype=np.float64))
    s, k = proportions.shape
    colours = cluster_colours(k) / 255
    fig, ax = plt.subplots(figsize=(7, 0.35 * s + 1.4))
    left = np.zeros(s)
    for cluster in range(k):
        ax.barh(np.arange(s), proportions[:, cluster], left=left, color=colours[cluster],
                label=f"cluster {cluster}")
        left += proportions[:, cluster]
    ax.set_yticks(np.arange(s), slide_ids, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("proportion of cells")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15 - 0.6 / (s + 2)),
              ncol=min(k, 5), fontsize=8)
    return _save(fig, path)


def image_is_blank(path: str | Path, tolerance: float = 2.0) -> bool:
    """True when a PNG is (nearly) one flat colour: pixel standard deviation < tolerance."""
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    return pixels.size == 0 or pixels.std() < tolerance


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


def _sample_crops_per_cluster(root, slide_ids: list[str], model_id: str, k: int,
                              per_cluster: int, seed: int, max_chunks: int = 16) -> list[np.ndarray]:
    """Up to ``per_cluster`` random crops of each cluster, drawn over all slides.

    Cells are drawn from ``max_chunks`` random crop chunks when those hold enough of a
    cluster (so a gallery of a big store reads a bounded number of chunks), else from all.
    """
    from wsicell.predict import read_labels
    from wsicell.store import slide_crops

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
        Counts per slide and per grid region (see ``wsicell.predict``).
    predictions : DataFrame
        The slide predictions table.
    summary, provenance : dict
        Slide-prediction summary and the run's provenance.

    Returns
    -------
    Path of the HTML report.
    """
    from wsicell.store import slide_group

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
        slide = slide_group(root, r.slide_id)
        mpp = float(slide.attrs["mpp"])
        area_mm2 = (r.grid.region_px * mpp / 1000) ** 2
        thumbnail = slide["thumbnail"][:] if "thumbnail" in slide else None
        mask = slide["tissue_mask"][:] if "tissue_mask" in slide else None
        overviews.append(draw_slide_overview(
            thumbnail, mask, r.grid_counts / area_mm2,
            (int(slide.attrs["width"]), int(slide.attrs["height"])), r.grid.region_px,
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
        import warnings
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
    ]
    if cv:
        sections.insert(1, Section("Slide classifier", f"Stratified {cv['folds']}-fold "
                                   "cross-validation of the linear SVM on the labelled slides.",
                                   [pd.DataFrame([cv])]))
    return write_html_report(Path(out_dir) / "report.html",
                             f"wsicell prediction, model {model.model_id}", sections, provenance)
