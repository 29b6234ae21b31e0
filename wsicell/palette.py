"""The colour of each cell-type cluster, the same in every picture and export."""

from __future__ import annotations

import numpy as np


def cluster_colours(k: int) -> np.ndarray:
    """A distinct colour per cluster (matplotlib ``tab10`` / ``tab20``), shape (k, 3), uint8.

    Examples
    --------
    >>> cluster_colours(2).tolist()
    [[31, 119, 180], [255, 127, 14]]
    """
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return (np.array([cmap(i % cmap.N)[:3] for i in range(k)]) * 255).round().astype(np.uint8)
