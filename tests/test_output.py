"""What the commands print: progress bars only for work to do, never mixed with other lines."""

import re
import subprocess
import sys

from conftest import TEST_DATA


def _ingest(store):
    result = subprocess.run(
        [sys.executable, "-m", "wsicell.cli.main", "ingest",
         str(TEST_DATA / "BM_GRAZ_HE_0001_01.png"),
         "--store", str(store), "--mpp", "0.4", "--workers", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    # a terminal shows the last state of each line: what follows the last carriage return
    return [line.rsplit("\r", 1)[-1] for line in result.stderr.splitlines()]


def test_ingest_prints_the_dashboard_and_its_bar_on_lines_of_their_own(tmp_path):
    store = tmp_path / "cells.zarr"
    first = _ingest(store)
    dashboard = [line for line in first if "Dask dashboard" in line]
    assert len(dashboard) == 1 and dashboard[0].startswith("Dask dashboard: http://")
    assert any(re.search(r"\d+/\d+ \[", line) for line in first)  # the tiles bar
    assert " 0tile [" not in "".join(first)  # no bar of zero tiles
    assert any(line.startswith("BM_GRAZ_HE_0001_01: ") and "cells from" in line
               for line in first)
    # a second run has nothing to do: no bar, no cluster, one line saying so
    second = _ingest(store)
    assert second == ["BM_GRAZ_HE_0001_01: already complete, skipped"], second
