"""The figures of wsicell, each drawn from arrays into one PNG.

Every ``draw_*`` function takes arrays, writes one PNG atomically and returns its path.
Figures are built with matplotlib's object API (:class:`matplotlib.figure.Figure`): no
pyplot state, no global backend, safe in a notebook and in worker threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import PercentFormatter
from PIL import Image
from skimage.segmentation import find_boundaries

from wsicell.files import write_atomically
from wsicell.palette import cluster_colours

DPI = 100
#: Sequential colour map of the density heatmaps: dark at low densities, so that no density
#: reads as the white / cream background of a slide (magma tops out in cream).
DENSITY_CMAP = "viridis"
LOSS_TITLES = {"V": "V(D,G) (Wasserstein estimate; should level off)", "L_D": "L_D (critic)",
               "L_G": "L_G (generator)", "L_Q": "L_Q (Q cross-entropy; should go to 0)"}


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


def _save(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically (a temporary file, then a rename)."""
    path = Path(path)
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight"))
    return path


def draw_cluster_gallery(crops: np.ndarray, cluster: int, n_cells: int, share: float,
                         path: str | Path, columns: int = 10, rows: int | None = None,
                         mpp: float = 0.4, scale_um: float = 10.0) -> Path:
    """Sample crops of one cluster as a mosaic (the paper's Fig. 8) with a scale bar.

    Every gallery of a report has the same ``columns`` x ``rows`` grid (unused places
    white), so that galleries line up on the page.

    Parameters
    ----------
    crops : ndarray, shape (M, 32, 32, 3), uint8
        The sampled crops (M may be 0).
    cluster : int
    n_cells, share : int, float
        Size of the cluster and its fraction of all cells, for the title.
    rows : int, optional
        Rows of the grid (default: as many as the crops need).
    mpp : float
        Microns per pixel of the crops (the reference resolution, 0.4); the scale bar is
        ``scale_um`` microns long.
    """
    rows = rows or max(1, -(-len(crops) // columns))
    crops = crops[:rows * columns]
    size, gap = (crops.shape[1] if len(crops) else 32), 2
    mosaic = crop_mosaic(crops, columns, gap)
    if mosaic.shape[0] < rows * (size + gap) - gap:
        pad = np.full((rows * (size + gap) - gap - mosaic.shape[0], *mosaic.shape[1:]), 255,
                      np.uint8)
        mosaic = np.concatenate([mosaic, pad])
    fig = Figure(figsize=(columns * 0.5, rows * 0.5 + 0.9))
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="nearest")
    colour = cluster_colours(cluster + 1)[cluster] / 255
    ax.set_title(f"cluster {cluster}: {n_cells:,} cells ({100 * share:.1f}%)", color="black",
                 fontsize=11, loc="left")
    ax.add_patch(Rectangle((0, -6), mosaic.shape[1], 4, color=colour, clip_on=False))
    ax.set_xlim(-0.5, mosaic.shape[1] - 0.5)
    ax.set_ylim(mosaic.shape[0] + 14, -8)
    bar_px = scale_um / mpp
    y_bar = mosaic.shape[0] + 6
    ax.plot([0, bar_px], [y_bar, y_bar], color="black", lw=3, solid_capstyle="butt")
    ax.text(bar_px + 6, y_bar, f"{scale_um:g} \u00b5m", va="center", fontsize=9)
    ax.text(mosaic.shape[1], y_bar, f"{size} px = {size * mpp:.1f} \u00b5m per cell image",
            va="center", ha="right", fontsize=8, color="0.35")
    ax.axis("off")
    if len(crops) == 0:
        ax.text(0.5, 0.55, "no cell in this cluster", ha="center", va="center", fontsize=12,
                color="0.3", transform=ax.transAxes)
    return _save(fig, path)


def draw_generator_grid(grid: np.ndarray, path: str | Path) -> Path:
    """The generator's view of each cluster: rows = fixed noise z, columns = category.

    Parameters
    ----------
    grid : ndarray, shape (rows, k, 32, 32, 3), uint8
    """
    rows, k = grid.shape[:2]
    fig = Figure(figsize=(k * 0.7 + 0.5, rows * 0.7 + 0.6))
    ax = fig.subplots()
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
    fig = Figure(figsize=(3.3 * ncols + 1.0, 3.3 * nrows * aspect + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
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
        image = ax.imshow(layer, extent=grid_extent, cmap=DENSITY_CMAP, alpha=0.7, vmin=0,
                          vmax=vmax, interpolation="nearest")
        ax.set_title(f"cluster {cluster}", color=colours[cluster])
        if not np.nan_to_num(density[..., cluster]).any():
            ax.text(0.5, 0.5, "no cell of this cluster", transform=ax.transAxes, ha="center",
                    va="center", fontsize=9, bbox={"facecolor": "white", "alpha": 0.85,
                                                   "edgecolor": "0.6"})
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
    fig = Figure(figsize=(5.2 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels):
        values = np.asarray(["slide"] * len(xy) if values is None else values, dtype=str)
        for i, value in enumerate(sorted(set(values))):
            chosen = values == value
            ax.scatter(xy[chosen, 0], xy[chosen, 1], s=50, color=colormaps["tab10"](i % 10),
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
    fig = Figure(figsize=(7, 0.35 * s + 1.4))
    ax = fig.subplots()
    left = np.zeros(s)
    for cluster in range(k):
        ax.barh(np.arange(s), proportions[:, cluster], left=left, color=colours[cluster],
                label=f"cluster {cluster}")
        left += proportions[:, cluster]
    ax.set_yticks(np.arange(s), slide_ids, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("share of the slide's cells")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15 - 0.6 / (s + 2)),
              ncol=min(k, 5), fontsize=8)
    return _save(fig, path)


def image_is_blank(path: str | Path, tolerance: float = 2.0) -> bool:
    """True when a PNG is (nearly) one flat colour: pixel standard deviation < tolerance."""
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    return pixels.size == 0 or pixels.std() < tolerance


def draw_losses(rows: list[dict], title: str, path: str | Path) -> Path:
    """Training curves: V(D,G), L_D, L_G, L_Q against the iteration (thin: per iteration;
    thick: moving average over a fiftieth of the run).

    Parameters
    ----------
    rows : list of dict
        One per iteration, with ``iteration`` and the losses named in :data:`LOSS_TITLES`
        (the lines of a training run's ``log.jsonl``); at least one.
    title : str
    path : str or Path
    """
    iterations = np.array([r["iteration"] for r in rows])
    fig = Figure(figsize=(16, 3.5))
    axes = fig.subplots(1, len(LOSS_TITLES))
    for ax, (name, loss_title) in zip(axes, LOSS_TITLES.items()):
        values = np.array([r[name] for r in rows])
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(iterations, values, lw=0.5, alpha=0.4)
        ax.plot(iterations[window - 1:], smooth, lw=1.5)
        ax.set_title(loss_title, fontsize=9)
        ax.set_xlabel("iteration")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def draw_area_histograms(areas: dict[str, np.ndarray], small_um2: float, path: str | Path
                         ) -> Path:
    """Nucleus-area distribution of each slide: the share of its nuclei per 2 um2 bin
    (0-150 um2, the last bin holding everything larger), with the implausibly small ones
    (under ``small_um2``) shaded.

    Parameters
    ----------
    areas : dict of str to ndarray
        Slide id -> nucleus areas (N,) in um2; at most the first 8 slides are drawn.
    small_um2 : float
    path : str or Path
    """
    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    edges = np.arange(0, 152, 2.0)
    ax.axvspan(0, small_um2, color="0.85", label=f"under {small_um2:g} \u00b5m\u00b2")
    for slide_id, area in list(areas.items())[:8]:
        if len(area):
            counts, _ = np.histogram(np.clip(area, 0, edges[-1] - 1e-6), edges)
            ax.step(edges[:-1], counts / len(area), where="post", lw=1.2, label=slide_id)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("nucleus area (\u00b5m\u00b2; the last bin: 150 and more)")
    ax.set_ylabel("share of the slide's nuclei")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def draw_occupancy(rows: list[dict], path: str | Path) -> Path:
    """Q's cluster occupancy during training: the share of a fixed sample of real cells in
    each category against the iteration (one cluster's line near 1 = collapse).

    Parameters
    ----------
    rows : list of dict
        Log entries with ``iteration`` and ``occupancy`` (cells per cluster); at least one.
    path : str or Path
    """
    iterations = np.array([r["iteration"] for r in rows])
    counts = np.array([r["occupancy"] for r in rows], dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    colours = cluster_colours(counts.shape[1]) / 255
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    for cluster in range(counts.shape[1]):
        ax.plot(iterations, 100 * shares[:, cluster], marker="o", ms=3, color=colours[cluster],
                label=f"cluster {cluster}")
    ax.axhline(80, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 100)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"% of {int(counts[0].sum())} real cells")
    ax.set_title("cluster occupancy during training (dashed: 80%, a collapse)", fontsize=9)
    ax.legend(fontsize=7, ncol=min(5, counts.shape[1]), loc="upper center")
    fig.tight_layout()
    return _save(fig, path)


def outline_overlay(rgb: np.ndarray, labels: np.ndarray, colour=(0, 200, 0)) -> np.ndarray:
    """The image with every nucleus outlined, 2 px wide (the pixels on both sides of each
    boundary), so that the outlines show at full size.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
    labels : ndarray, shape (H, W), int

    Returns
    -------
    ndarray, shape (H, W, 3), uint8
    """
    out = rgb.copy()
    out[find_boundaries(labels, mode="thick")] = colour
    return out
