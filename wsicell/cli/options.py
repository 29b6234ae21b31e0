"""The command line's option types: every number and output path is checked here, once,
before a command starts (so a refused value leaves no store, lock or output behind).

A refused value is a :class:`click.BadParameter`, which :func:`wsicell.cli.main.main`
prints as one line and exit code 2.  Numbers must be finite and inside a plausible range
(:class:`Number`); output paths must have an existing parent directory and not be a file
where a directory belongs, or the reverse (:class:`OutputPath`).
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from wsicell.config import MPP_RANGE

INT_MAX = 2**31 - 1  #: largest count / interval any integer option takes
SEED_MAX = 2**32 - 1  #: numpy's seeds are 32-bit


class Number(click.ParamType):
    """A finite ``int`` or ``float`` in ``[low, high]`` (``low`` excluded when
    ``low_open``); ``unit`` and ``why`` explain the range in the refusal.

    Examples
    --------
    >>> Number(float, 0, 10, low_open=True).convert("2.5", None, None)
    2.5
    >>> Number(int, 1, 8).convert("9", None, None)
    Traceback (most recent call last):
    ...
    click.exceptions.BadParameter: 9 is outside 1-8
    >>> Number(float, 0, 10, low_open=True, unit="um").describe()
    '(0, 10] um'
    """

    def __init__(self, kind: type, low: float, high: float, low_open: bool = False,
                 unit: str = "", why: str = ""):
        self.kind, self.low, self.high, self.low_open = kind, low, high, low_open
        self.unit, self.why = unit, why
        self.name = "integer" if kind is int else "number"

    def convert(self, value, param, ctx):
        try:
            number = self.kind(value)
            if self.kind is int and isinstance(value, float) and number != value:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{value!r} is not {'an integer' if self.kind is int else 'a number'}",
                      param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        below = number <= self.low if self.low_open else number < self.low
        if below or number > self.high:
            self.fail(f"{value}{self._unit} is outside {self.describe()}"
                      f"{'; ' + self.why if self.why else ''}", param, ctx)
        return number

    @property
    def _unit(self) -> str:
        return f" {self.unit}" if self.unit else ""

    def describe(self) -> str:
        """The range in words, e.g. ``0.02-20 um/px`` or ``(0, 1e+06]``."""
        def show(x):
            return str(x) if isinstance(x, int) else f"{x:g}"
        if self.low_open:
            return f"({show(self.low)}, {show(self.high)}]{self._unit}"
        return f"{show(self.low)}-{show(self.high)}{self._unit}"

    def __repr__(self) -> str:
        return f"Number({self.kind.__name__}, {self.low}, {self.high})"


def count(low: int = 1, high: int = INT_MAX) -> Number:
    """An integer in ``[low, high]``."""
    return Number(int, low, high)


def positive(high: float, unit: str = "") -> Number:
    """A finite float in ``(0, high]``."""
    return Number(float, 0, high, low_open=True, unit=unit)


#: ``--mpp``: level-0 microns per pixel, from oil-immersion 100x scans (~0.05) to a
#: stereo microscope's overview (~20); beyond, no nucleus is a pixel wide.
MPP = Number(float, *MPP_RANGE, unit="um/px",
             why="not a microscope's resolution (check the value and its unit, um per pixel)")
SEED = count(0, SEED_MAX)


class MemoryLimit(click.ParamType):
    """A Dask worker memory limit: ``auto`` or a positive size (``4GB``, ``500MiB``)."""

    name = "size"

    def convert(self, value, param, ctx):
        from dask.utils import parse_bytes

        if str(value).strip().lower() == "auto":
            return "auto"
        try:
            size = parse_bytes(str(value))
        except (ValueError, TypeError, OverflowError):
            self.fail(f"{value!r} is not a memory size like 4GB or 500MiB", param, ctx)
        if not 16 * 2**20 <= size <= 2**50:
            self.fail(f"{value} is outside 16MiB-1PiB per worker", param, ctx)
        return value


class OutputPath(click.Path):
    """A path a command writes: a ``file`` or a ``directory`` (created when missing).

    Refused before the command starts: a parent directory that does not exist (or is a
    file), a directory where a file belongs, or a file where a directory belongs.  A URL
    (``s3://bucket/cells.zarr``) passes unchanged.

    Examples
    --------
    >>> OUTPUT_DIR.convert("s3://bucket/cells.zarr", None, None)
    's3://bucket/cells.zarr'
    """

    def __init__(self, kind: str = "file"):
        super().__init__(path_type=None)
        self.kind = kind

    def convert(self, value, param, ctx):
        if "://" in str(value):  # a URL (s3://...): checked where it is opened
            return value
        path = Path(super().convert(value, param, ctx))
        parent = path.absolute().parent
        if not parent.is_dir():
            what = "is not a directory" if parent.exists() else "does not exist"
            self.fail(f"{path}: parent directory {parent} {what}", param, ctx)
        if self.kind == "file" and path.is_dir():
            self.fail(f"{path}: is a directory, not a file", param, ctx)
        if self.kind == "directory" and path.exists() and not path.is_dir():
            self.fail(f"{path}: is a file, not a directory", param, ctx)
        return value


OUTPUT_FILE, OUTPUT_DIR = OutputPath("file"), OutputPath("directory")


#: Ranges of the numeric fields of :class:`~wsicell.config.TrainConfig` on the command line
#: (``wsicell train --width ...``): far beyond any useful value, short of exhausting memory.
TRAIN_RANGES = {
    "categories": count(1, 1000),
    "noise_dim": count(1, 4096),
    "batch_size": count(1, 65536),
    "critic_steps": count(1, 100),
    "lr": positive(1.0),
    "lr_info": positive(1.0),
    "betas": Number(float, 0, 0.9999),
    "epochs": positive(1e6),
    "width": count(1, 1024),
    "stain_augment": Number(float, 0, 10),
    "seed": SEED,
    "shuffle_buffer": count(1, 2**26),
}
FLOAT_MAX = 1e6  #: upper bound of a numeric configuration field TRAIN_RANGES does not name


def field_type(name: str, field) -> click.ParamType | None:
    """The option type of a numeric configuration field (None for any other): its range in
    :data:`TRAIN_RANGES`, else its own lower bound (pydantic ``gt`` / ``ge``, 0 when it
    has none) up to :data:`INT_MAX` or :data:`FLOAT_MAX`."""
    if name in TRAIN_RANGES:
        return TRAIN_RANGES[name]
    kind = field.annotation
    if kind not in (int, float):
        return None
    low, low_open = 0, False
    for constraint in field.metadata:
        if getattr(constraint, "gt", None) is not None:
            low, low_open = constraint.gt, True
        elif getattr(constraint, "ge", None) is not None:
            low = constraint.ge
    if kind is int and low_open:
        low, low_open = low + 1, False
    return Number(kind, low, INT_MAX if kind is int else FLOAT_MAX, low_open=low_open)
