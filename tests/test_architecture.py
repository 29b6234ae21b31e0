"""The package's promises to its users: a lazy public API, a light command line, and the
README's Python example running as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import wsicell

REPO = Path(__file__).resolve().parents[1]
API = ["ingest", "train", "predict", "open_store", "export", "WsicellConfig", "WsicellError"]


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_public_api_is_listed_and_documented():
    assert set(API) <= set(wsicell.__all__) and set(API) <= set(dir(wsicell))
    for name in API:
        assert getattr(wsicell, name).__doc__, name
    for name in ("ingest", "train", "predict", "export"):
        assert "Examples" in getattr(wsicell, name).__doc__, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wsicell.nope  # noqa: B018
    assert "PackageNotFoundError" not in dir(wsicell)


def test_store_is_the_first_argument_of_every_entry_point():
    import inspect

    for name in ("ingest", "train", "predict", "export"):
        first = next(iter(inspect.signature(getattr(wsicell, name)).parameters))
        assert first == "store", name


def test_importing_the_api_loads_neither_torch_nor_matplotlib():
    loaded = _python("import sys, wsicell; wsicell.ingest; wsicell.open_store; "
                     "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    assert loaded == "False False"


def test_the_command_line_starts_light():
    """`wsicell` itself imports no part of the pipeline; `wsicell ingest` no torch."""
    heavy = ["torch", "matplotlib", "dask", "zarr", "pandas", "pyarrow"]
    loaded = _python(f"import sys, wsicell.cli.main; print([m for m in {heavy} "
                     "if m in sys.modules])")
    assert loaded == "[]"
    loaded = _python("import sys; from wsicell.cli.main import cli; "
                     "cli.get_command(None, 'ingest'); import wsicell.pipeline.ingest; "
                     "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    assert loaded == "False False"


def test_nothing_changes_global_state_on_import():
    """No matplotlib backend chosen and Pillow's pixel limit untouched by importing
    every module."""
    code = ("import importlib, pkgutil, wsicell, PIL.Image as I, matplotlib; "
            "limit = I.MAX_IMAGE_PIXELS; backend = matplotlib.rcParams._get_backend_or_none(); "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(wsicell.__path__, "
            "'wsicell.')]; "
            "print(I.MAX_IMAGE_PIXELS == limit, matplotlib.rcParams._get_backend_or_none() "
            "== backend)")
    assert _python(code) == "True True"


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's "Python API" block, run as a notebook user would, from a directory
    holding the repository's tests/data."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").symlink_to(REPO / "tests")
    monkeypatch.setitem(os.environ, "OMP_NUM_THREADS", "1")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["report"].resolve() == (tmp_path / "results" / "report.html").resolve()
    assert namespace["report"].is_file()
    assert namespace["n_cells"] == sum(len(namespace["slide_cells"](namespace["root"], s))
                                       for s in namespace["slides"]) > 100
    assert namespace["crops"].shape == (100, 32, 32, 3)
