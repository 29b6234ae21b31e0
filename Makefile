# wsicell: `make demo` runs the pipeline on the bundled sample, `make test` runs the tests.
# Both create the virtual environment .venv when it is missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WSICELL := $(VENV)/bin/wsicell
DEMO := demo-output

.PHONY: demo test test-all bench clean

# Runtime environment. torch is pinned to the 2.13.0 CPU wheel first: a bare `torch`
# requirement would pull a multi-GB CUDA build (pre-install another torch to use a GPU).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# HistomicsTK 1.4.0, the numerical reference of the tests and benchmarks only. Its
# declared dependencies cannot be met beside current dask, so it goes in without them
# plus the few it imports.
$(VENV)/.reference: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps histomicstk==1.4.0
	$(PY) -m pip install -q girder-slicer-cli-web shapely nimfa girder-client ctk-cli
	touch $@

demo: $(VENV)/.installed
	$(WSICELL) segment tests/data/bm_graz/images --out $(DEMO)/segment

test: $(VENV)/.reference
	$(PY) -m pytest -q

test-all: $(VENV)/.reference
	$(PY) -m pytest -q -m ''

bench: $(VENV)/.reference
	cd benchmarks && ../$(PY) bench_segment.py

clean:
	rm -rf $(DEMO)
