"""Annotated cell positions: one CSV of points per image or slide (``x``, ``y`` in level-0
pixels and, for cell classes, ``label``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from wsicell.errors import WsicellError


def read_points(path: str | Path, columns: tuple[str, ...] = ("x", "y", "label")) -> pd.DataFrame:
    """Read a CSV of annotated cells: ``x``, ``y`` (level-0 pixels) and, when asked for,
    ``label``.

    Returns
    -------
    DataFrame with the ``columns``: ``x``, ``y`` float64, ``label`` str (stripped).

    Raises
    ------
    WsicellError
        Unreadable file, missing columns or non-numeric coordinates.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={"label": str}, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise WsicellError(f"{path}: not a readable points CSV ({err})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if not set(columns) <= set(table.columns):
        raise WsicellError(f"{path}: needs columns {','.join(columns)}; "
                           f"found {list(table.columns)}")
    try:
        table = table.assign(x=table.x.astype(float), y=table.y.astype(float))
    except ValueError:
        raise WsicellError(f"{path}: x and y must be numbers") from None
    if "label" in columns:
        table = table.assign(label=table.label.astype(str).str.strip())
    return table[list(columns)]
