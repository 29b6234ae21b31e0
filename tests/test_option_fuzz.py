"""Every numeric option and every output path of every command, fuzzed: a value outside its
range (NaN, infinities, zero, negative, huge, not a number at all) is refused before the
command starts: exit code 2, one line on stderr naming the option, no traceback, and
nothing written (no store, lock or output).  The commands run in this process (the console
script's ``main``), so each example takes milliseconds."""

import contextlib
import io
import math
from pathlib import Path

import click
import pytest
from conftest import TEST_DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsicell.cli.main import COMMANDS, cli, main
from wsicell.cli.options import MemoryLimit, Number, OutputPath

SLIDE = str(TEST_DATA / "BM_GRAZ_HE_0001_01.png")


def _commands() -> dict[tuple[str, ...], click.Command]:
    """Every command of the console script by its path (``("evaluate", "clustering")``)."""
    found = {}
    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        if isinstance(command, click.Group):
            found.update({(name, sub): command.commands[sub] for sub in command.commands})
        else:
            found[(name,)] = command
    return found


COMMAND_LINES = _commands()


def _options(kind) -> list[tuple[tuple[str, ...], click.Option]]:
    return [(path, param) for path, command in COMMAND_LINES.items()
            for param in command.params if isinstance(param.type, kind)]


def run_main(argv: list[str]) -> tuple[int, str]:
    """Run the console script in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def _template(path: tuple[str, ...], workdir: Path, but: str) -> list[str]:
    """A complete command line whose outputs all lie in ``workdir``, without the option
    ``but`` (the one under test: given twice, click would take the last)."""
    out = str(workdir / "out")
    line = {
        ("ingest",): [SLIDE, "--store", workdir / "s.zarr"],
        ("predict",): ["--slides", TEST_DATA, "--model", workdir / "m", "--store",
                       workdir / "s.zarr", "--out", out],
        ("train",): ["--store", workdir / "s.zarr", "--out", out],
        ("segment",): [SLIDE, "--out", out],
        ("export",): [workdir / "s.zarr", "--format", "csv", "--out", workdir / "c.csv"],
        ("evaluate", "segmentation"): [TEST_DATA, "--masks", TEST_DATA, "--mpp", "0.4"],
    }.get(path, [])
    if but in line:
        i = line.index(but)
        del line[i:i + 2]
    return line


def assert_refused(code: int, stderr: str, option: str, workdir: Path) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("wsicell: error:"), stderr
    assert option in lines[0] and "Traceback" not in stderr, lines[0]
    assert not any(workdir.iterdir()), sorted(workdir.iterdir())  # no store, lock, output


def _outside(number: Number) -> st.SearchStrategy[str]:
    """Text values an option of type ``number`` must refuse."""
    special = st.sampled_from(["nan", "inf", "-inf", "1e400", "-1e400", "", "x", "1e",
                               str(2**64), str(-2**64), "0x10"])
    if number.kind is int:
        wrong = st.one_of(st.integers(max_value=number.low - 1),
                          st.integers(min_value=number.high + 1),
                          st.floats(allow_nan=False, allow_infinity=False).filter(
                              lambda x: x != int(x)))
    else:
        wrong = st.one_of(
            st.floats(max_value=number.low, exclude_max=not number.low_open),
            st.floats(min_value=number.high, exclude_min=True),
            st.just(math.nan))
    return st.one_of(special, wrong.map(repr if number.kind is float else str))


NUMERIC = _options(Number)
FUZZ = settings(max_examples=12, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_every_numeric_option_is_checked():
    """No command takes a bare int / float option (NaN, infinities and nonsense would pass)."""
    bare = [(path, param.name) for path, command in COMMAND_LINES.items()
            for param in command.params
            if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType))]
    assert not bare, f"options without a range (use wsicell.cli.options): {bare}"
    assert {p[0] for p, _ in NUMERIC} >= {"ingest", "train", "predict", "segment", "evaluate"}


@pytest.mark.parametrize(("path", "param"), NUMERIC,
                         ids=[f"{' '.join(p)} {o.opts[0]}" for p, o in NUMERIC])
@FUZZ
@given(data=st.data())
def test_a_numeric_option_out_of_range_is_refused(tmp_path, path, param, data):
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    value = data.draw(_outside(param.type), label=param.opts[0])
    extra = ["0.5"] * (param.nargs - 1)  # --betas takes two numbers
    code, stderr = run_main([*path, param.opts[0], value, *extra,
                             *_template(path, workdir, param.opts[0])])
    assert_refused(code, stderr, param.opts[0], workdir)


@pytest.mark.parametrize(("path", "param"), NUMERIC,
                         ids=[f"{' '.join(p)} {o.opts[0]}" for p, o in NUMERIC])
def test_the_range_ends_are_accepted(path, param):
    number = param.type
    low = number.low + 1 if number.kind is int and number.low_open else number.low
    for value in ([] if number.low_open else [low]) + [number.high]:
        assert number.convert(str(value), param, None) == value


@pytest.mark.parametrize(("path", "param"), _options(MemoryLimit),
                         ids=[" ".join(p) for p, _ in _options(MemoryLimit)])
@FUZZ
@given(value=st.one_of(st.sampled_from(["nan", "inf", "-1GB", "0", "1KB", "1e30TB", "GB", "4 XB",
                                        "-0"]),
                       st.text(alphabet="0123456789.eE-+ KMGTPiBb", max_size=8)))
def test_a_bad_memory_limit_is_refused(tmp_path, path, param, value):
    from dask.utils import parse_bytes

    try:
        if 16 * 2**20 <= parse_bytes(value) <= 2**50:
            return  # a valid size
    except (ValueError, TypeError, OverflowError):
        pass
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    code, stderr = run_main([*path, "--memory-limit", value,
                             *_template(path, workdir, "--memory-limit")])
    assert_refused(code, stderr, "--memory-limit", workdir)


OUTPUTS = _options(OutputPath)


@pytest.mark.parametrize(("path", "param"), OUTPUTS,
                         ids=[f"{' '.join(p)} {o.opts[0]}" for p, o in OUTPUTS])
@pytest.mark.parametrize("problem", ["missing parent", "parent is a file", "wrong kind"])
def test_an_impossible_output_path_is_refused(tmp_path, path, param, problem):
    workdir = tmp_path / "work"
    workdir.mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = {"missing parent": workdir / "missing" / "out",
              "parent is a file": blocker / "out",
              "wrong kind": blocker if param.type.kind == "directory" else tmp_path}[problem]
    expected = {"missing parent": "does not exist", "parent is a file": "is not a directory",
                "wrong kind": f"not a {param.type.kind.split(' or ')[0]}"}[problem]
    code, stderr = run_main([*path, param.opts[0], target,
                             *_template(path, workdir, param.opts[0])])
    assert_refused(code, stderr, param.opts[0], workdir)
    assert expected in stderr and str(target) in stderr, stderr
    assert blocker.read_text() == "x"


def _input_lines(given: Path, workdir: Path) -> dict[str, list]:
    """Command lines whose input path (file or directory) is ``given``."""
    out, store = workdir / "out", workdir / "s.zarr"
    return {
        "ingest PATHS": ["ingest", given, "--store", store, "--no-progress"],
        "ingest --config": ["ingest", SLIDE, "--store", store, "--config", given],
        "train --store": ["train", "--store", given, "--out", out],
        "predict --slides": ["predict", "--slides", given, "--model", TEST_DATA, "--store",
                             store, "--out", out],
        "predict --model": ["predict", "--slides", TEST_DATA, "--model", given, "--store",
                            store, "--out", out],
        "export STORE": ["export", given, "--format", "csv", "--out", workdir / "c.csv"],
        "validate STORE": ["validate", given],
        "segment PATHS": ["segment", given, "--out", out, "--no-progress"],
        "evaluate detection IMAGE_DIR": ["evaluate", "detection", given, "--points", TEST_DATA],
        "evaluate detection --points": ["evaluate", "detection", TEST_DATA, "--points", given],
        "evaluate segmentation --masks": ["evaluate", "segmentation", TEST_DATA, "--masks",
                                          given, "--mpp", "0.4"],
    }


@pytest.mark.parametrize("option", list(_input_lines(Path(), Path())))
@pytest.mark.parametrize("problem", ["missing", "a file where a directory belongs"])
def test_a_missing_or_wrong_kind_of_input_is_refused(tmp_path, option, problem):
    workdir = tmp_path / "work"
    workdir.mkdir()
    if problem == "missing":
        given = tmp_path / "missing" / "input"
    elif option in ("ingest --config",):
        given = tmp_path  # a directory where a file belongs
    else:
        given = tmp_path / "notes.txt"
        given.write_text("not a slide, store or directory\n")
    code, stderr = run_main(_input_lines(given, workdir)[option])
    assert_refused(code, stderr, str(given), workdir)
