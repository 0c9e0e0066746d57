# The README's two commands: `make demo` and `make test`. Each creates the environment
# from nothing (.venv), installs, and runs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
PYTHON := $(abspath $(VENV))/bin/python
STAMP := $(VENV)/.installed
# No machine here reaches a model hub: fail fast instead of waiting on the network.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Weights load from local folders here: no per-component progress bars.
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false
export COMFUSION_CACHE ?= $(abspath .cache/comfusion)
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: help venv demo test stop bench clean

help:
	@echo "make demo   set up, start local Ray + MLflow, run the demo job and the Serve app"
	@echo "make test   set up and run the test suite"
	@echo "make stop   stop what 'make demo' started"
	@echo "make bench  CPU benchmarks (figures printed)"

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	@# A GPU machine keeps (or gets) its CUDA torch; elsewhere take the CPU build, so that
	@# nothing later pulls a CUDA build of several GB.
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PYTHON) -m pip install -q torch; \
	else \
	  $(PYTHON) -m pip install -q torch==2.13.0; \
	fi
	$(PYTHON) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m jobs.demo

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

stop:
	-$(PYTHON) -m jobs.demo --stop

bench: $(STAMP)
	$(PYTHON) benchmarks/sample.py

clean:
	rm -rf $(VENV) .cache storage mlruns mlflow.db demo_out
