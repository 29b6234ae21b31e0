"""Checks and reads of user-named files that fail with one clear line, and atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from wsicell.errors import WsicellError


def existing_file(path: str | Path) -> Path:
    """``path`` as a Path when it names an existing regular file.

    Raises
    ------
    WsicellError
        ``<path>: no such file`` or ``<path>: not a file``.
    """
    path = Path(path)
    if not path.exists():
        raise WsicellError(f"{path}: no such file")
    if not path.is_file():
        raise WsicellError(f"{path}: not a file")
    return path


def read_json(path: str | Path, what: str = "JSON file"):
    """The data of a JSON file.

    Raises
    ------
    WsicellError
        ``<path>: no such file`` or ``<path>: not a readable <what> (<reason>)``.
    """
    path = existing_file(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WsicellError(f"{path}: not a readable {what} ({err})") from None


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


def write_atomically(path: str | Path, write) -> None:
    """Create or replace ``path`` with ``write(binary_file)`` through a temporary file in the
    same directory and a rename, so that readers see the whole old or new file, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        write(f)
    os.replace(tmp, path)
