# The README's two commands: `make demo` and `make test`. Each sets up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdpipe-installed
TORCH_CPU := torch==2.13.0

.PHONY: setup demo demo-fast test test-fast lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# A bare `torch` requirement would pull several GB of CUDA packages: install the CPU
	@# wheel first where no torch is present (machines with a CUDA torch keep theirs).
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e ".[test,lint,faiss-cpu]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/kdpipe demo

demo-fast: setup
	$(VENV)/bin/kdpipe demo --fast

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# ruff (lint and format check) and mypy over the package, tests and benchmarks, as CI runs them.
lint: setup
	$(VENV)/bin/ruff check kdpipe tests benchmarks examples docs/templates
	$(VENV)/bin/ruff format --check kdpipe tests benchmarks examples docs/templates
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix kdpipe tests benchmarks examples docs/templates
	$(VENV)/bin/ruff format kdpipe tests benchmarks examples docs/templates

bench: setup
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/cluster.py

clean:
	rm -rf $(VENV) runs .pytest_cache
