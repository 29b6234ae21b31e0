# wsicell: `make demo` runs the pipeline on the bundled sample, `make test` runs the tests.
# Both create the virtual environment .venv when it is missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WSICELL := $(VENV)/bin/wsicell
DEMO := demo-output
DEMO_MINUTES ?= 3

.PHONY: demo test test-all bench clean

# Runtime environment. torch is pinned to the 2.13.0 CPU wheel first: a bare `torch`
# requirement would pull a multi-GB CUDA build (pre-install another torch to use a GPU).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[test]'
	touch $@

# HistomicsTK 1.4.0, the numerical reference of the tests and benchmarks only. Its
# declared dependencies cannot be met beside current dask, so its code goes without them
# (and without its metadata) into a folder of its own that a .pth file puts on the path:
# pip never sees its unmet requirements (no resolver errors); the few packages it imports
# go in as usual.
REFERENCE := $(VENV)/reference
$(VENV)/.reference: $(VENV)/.installed
	$(PY) -m pip uninstall -q -y histomicstk 2>/dev/null || true
	$(PY) -m pip install -q girder-slicer-cli-web nimfa girder-client ctk-cli
	$(PY) -m pip install -q --no-deps --upgrade --target $(REFERENCE) histomicstk==1.4.0
	rm -rf $(REFERENCE)/histomicstk-*.dist-info
	$(PY) -c "import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], \
	    'wsicell-reference.pth').write_text(str(pathlib.Path(sys.argv[1]).resolve()) + '\n')" $(REFERENCE)
	touch $@

# The bundled sample: two bone-marrow fields at the reference 0.4 um/px. The GAN is
# CPU-sized (width 16, 250 iterations, the critic and G at lr 5e-4 so that G draws
# nucleus-like blobs within such a short run (at the default 1e-4 its grid is still
# coloured noise at 150-400 iterations), and lambda_confidence 1 so that Q spreads the
# sample's cells over its categories) so the demo takes minutes; one torch thread, so that
# every 2-core machine trains the same model (bf16 autocast where the CPU has it). Measured
# on the sample (docs/training.md): 4 of the 5 clusters hold cells after 250 iterations;
# the report says so in words. On a loaded machine --max-minutes 3 (DEMO_MINUTES) ends
# training earlier (the report then says the model is partly trained). The model is kept
# and reused by later runs (delete demo-output/ to start again).
SAMPLE := tests/data/bm_graz/images
demo: $(VENV)/.installed
	mkdir -p $(DEMO)
	$(WSICELL) segment $(SAMPLE) --out $(DEMO)/segment --mpp 0.4 --no-progress
	$(WSICELL) ingest $(SAMPLE) --store $(DEMO)/cells.zarr --mpp 0.4
	test -f $(DEMO)/model/model.pt || $(WSICELL) train --store $(DEMO)/cells.zarr \
	    --out $(DEMO)/model --width 16 --lr 5e-4 --lr-info 1e-3 --lambda-confidence 1 --epochs 100 --max-iters 250 --sample-every 50 \
	    --checkpoint-every 50 --workers 0 --threads 1 --max-minutes $(DEMO_MINUTES)
	$(WSICELL) predict --slides $(SAMPLE) --model $(DEMO)/model --store $(DEMO)/cells.zarr \
	    --out $(DEMO)/results --mpp 0.4 --region-size 100

# The export-only scverse environment of docs/interop.md: Python >= 3.12 (spatialdata 0.8
# needs it and a Dask newer than 0.7.3's pin), spatialdata, scanpy, squidpy and wsicell
# without its dependencies (export imports neither torch nor OpenSlide). The tests of
# --format spatialdata and of the docs' scanpy / squidpy example run in it; without a
# Python 3.12 / 3.13 they skip.
PYTHON_SCVERSE ?= $(shell for p in python3.12 python3.13 $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3; \
    do $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && echo $$p && break; done)
SCVERSE := $(VENV)/scverse
$(SCVERSE)/.installed: pyproject.toml
	@if [ -z "$(PYTHON_SCVERSE)" ]; then echo "no python3.12 / 3.13: scverse tests skip"; else \
	  $(PYTHON_SCVERSE) -m venv $(SCVERSE) && \
	  $(SCVERSE)/bin/python -m pip install -q 'spatialdata>=0.8' scanpy squidpy igraph jsonschema && \
	  PYTHONWARNINGS="ignore:Editable installation" $(SCVERSE)/bin/python -m pip install -q --no-deps -e . && \
	  touch $@; fi

# The layering contract (pyproject.toml, [tool.importlinter]) first, then the tests.
test: $(VENV)/.reference $(SCVERSE)/.installed
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(PY) -m pytest -q

test-all: $(VENV)/.reference $(SCVERSE)/.installed
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(PY) -m pytest -q -m ''

bench: $(VENV)/.reference
	cd benchmarks && ../$(PY) bench_segment.py

clean:
	rm -rf $(DEMO)
