"""Checks and reads of user-named files that fail with one clear line, and atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    except RecursionError:
        raise WsicellError(f"{path}: not a readable {what} (nested too deeply)") from None


def write_atomically(path: str | Path, write) -> None:
    """Create or replace ``path`` with ``write(binary_file)`` through a temporary file in the
    same directory and a rename, so that readers see the whole old or new file, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        write(f)
    os.replace(tmp, path)
