# The two entry points of a fresh clone (Python 3.11 and nothing else needed):
#   make demo   train + evaluate a tiny model on the built-in mixture (CPU, < 15 minutes)
#   make test   the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo

.PHONY: demo test

$(VENV)/.demo-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all]"
	touch $(VENV)/.demo-installed $@

# FLAN_JAX_TUNED_MALLOC=1: the opt-in glibc malloc tunables for CPU runs (docs/training.md).
demo: $(VENV)/.demo-installed
	FLAN_JAX_TUNED_MALLOC=1 $(PY) -m flan_jax.demo --workdir=$(WORKDIR)

test: $(VENV)/.test-installed
	$(PY) -m pytest -q -n 2 --durations=15 tests
