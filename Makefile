# The MLSys 2024 reproduction workbench.
#   make reproduce   run every notebook (or PAPER=NN) with papermill into runs/  (does its own set-up)
#   make test        lint + notebook hygiene + library tests + every notebook under nbval (does its own set-up)
# GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

SHELL      := /bin/bash
PYTHON     ?= python3
VENV       ?= .venv
VPY        := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= kernels,lab,papers,dev
STAMP      := $(VENV)/.stamp-setup
PAPER      ?=
PARAMS     ?=
JOBS       ?= 2

# Triton runs kernels in its interpreter on machines without a GPU.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifneq ($(HAS_GPU),1)
export TRITON_INTERPRET := 1
endif
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg
# Batch runs (tests, papermill) print no progress bars; see mlsys24.progress.

.PHONY: setup lab test test-lib test-notebooks test-browser lint reproduce figures bench clean help

help:
	@echo "make reproduce [PAPER=NN] [PARAMS=file.yaml]  run notebooks with papermill into runs/"
	@echo "make test                                     lint, hygiene, library tests, notebooks (nbval)"
	@echo "make setup | lab | figures | bench PAPER=slug"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(VPY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	$(VPY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mlsys24)" >/dev/null
	touch $@

# JupyterLab on notebooks/: the widget, plotly and anywidget renderers ship as prebuilt extensions.
# e.g. make lab LAB_ARGS="--no-browser --port 8899"
lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

lint: setup
	$(VENV)/bin/ruff check lib tests notebooks

test-lib: setup
	$(VPY) -m pytest -q -n $(JOBS) -m "not browser" tests

# One notebook at a time: notebooks assert CPU timing ratios, two kernels on 2 cores would be flaky.
test-notebooks: setup
	MLSYS24_BATCH=1 MLSYS24_FIGURES_DIR=runs/test-figures $(VPY) -m pytest -q -p no:xdist --nbval-lax \
	    --nbval-cell-timeout=600 --nbval-kernel-name=python3 notebooks/[0-9][0-9]_*.ipynb

# JupyterLab driven by headless Chromium (skips without chromium); screenshots in runs/screenshots/.
# MLSYS24_BROWSER_NOTEBOOKS=00,07 or =all picks the notebooks (default: the index + the first paper).
test-browser: setup
	$(VPY) -m pytest -q -p no:xdist -m browser tests/browser

test: lint test-lib test-notebooks test-browser

reproduce: setup
	MLSYS24_BATCH=1 $(VPY) -m mlsys24.reproduce $(if $(PAPER),--paper $(PAPER)) $(if $(PARAMS),--params $(PARAMS))

figures: setup
	MLSYS24_BATCH=1 $(VPY) -m mlsys24.reproduce --figures $(if $(PAPER),--paper $(PAPER)) $(if $(PARAMS),--params $(PARAMS))

# GPU benchmarks: plain CLIs that need only torch, triton, numpy (and safetensors).
bench:
	PYTHONPATH=lib $(PYTHON) -m mlsys24.bench $(PAPER)

clean:
	rm -rf runs .pytest_cache .ruff_cache
