"""The wheel installs the library, the CLI under ``wsicell.cli`` and the schemas; no
top-level ``cli`` package."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(result.stderr)
    return next(out.glob("wsicell-*.whl"))


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "wsicell/cli/main.py" in names
    assert "wsicell/schemas/config.schema.json" in names
    assert not any(name.startswith("cli/") for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "wsicell = wsicell.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_normal_install_runs_cli(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import wsicell, wsicell.cli.main as m; "
            "assert wsicell.__file__.startswith(sys.argv[1]), wsicell.__file__; "
            "m.main(['--help'])")
    result = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ingest" in result.stdout and "segment" in result.stdout
