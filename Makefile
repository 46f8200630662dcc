# The README's commands: `make demo`, `make test`, `make lint`. Each sets up .venv on a fresh
# machine with what that target needs, and no more: demo the package (and faiss-cpu), test adds
# the test extra, lint the lint extra; `make setup` installs all three (a developer's venv).
#
# The installer is uv (pinned, from PyPI, installed into .venv by the venv's own pip): pip spent
# more than 9 minutes backtracking over this dependency set on a 2-core machine, uv resolves and
# installs it in seconds (docs/BENCHMARKS.md, "Set-up time"). uv prints what it resolves,
# downloads and installs; nothing is hidden.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
STAMP := $(VENV)/.kdpipe-installed
TORCH_CPU := torch==2.13.0
# uv reads no pip configuration: a local wheel folder (WHEELS, /opt/wheels on the lab's
# machines) is passed explicitly where it exists. Where it holds no torch wheel, torch's CPU
# build comes from PyTorch's CPU index (uv prefers an extra index over PyPI for what it holds).
WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)/*.whl),--find-links $(WHEELS))
TORCH_INDEX := $(if $(wildcard $(WHEELS)/torch-*.whl),,--extra-index-url https://download.pytorch.org/whl/cpu)
UV_INSTALL := $(UV) pip install --python $(PY) $(FIND_LINKS)

.PHONY: setup install demo demo-fast test test-fast lint format bench clean

# everything: the package, its tests and its linters
setup: $(STAMP) $(VENV)/.kdpipe-test $(VENV)/.kdpipe-lint

# the package alone (with faiss-cpu for K-means): what `make demo` needs
install: $(STAMP)

$(UV):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): pyproject.toml | $(UV)
	@# A bare `torch` requirement would pull several GB of CUDA packages: install the CPU
	@# wheel first where no torch is present (machines with a CUDA torch keep theirs: uv keeps
	@# an installed torch that meets the package's bound).
	@$(PY) -c "import torch" 2>/dev/null && echo "torch: keeping $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(UV_INSTALL) $(TORCH_INDEX) $(TORCH_CPU)
	$(UV_INSTALL) -e ".[faiss-cpu]"
	@touch $@

$(VENV)/.kdpipe-test: $(STAMP)
	$(UV_INSTALL) -e ".[faiss-cpu,test]"
	@touch $@

$(VENV)/.kdpipe-lint: $(STAMP)
	$(UV_INSTALL) -e ".[faiss-cpu,lint]"
	@touch $@

demo: install
	$(VENV)/bin/kdpipe demo

demo-fast: install
	$(VENV)/bin/kdpipe demo --fast

# Two pytest-xdist workers, one per core, one torch thread each; the tests that start a local
# Ray cluster share one worker (tests/conftest.py). Measured: docs/BENCHMARKS.md, "Test suite".
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup

test: $(VENV)/.kdpipe-test
	$(PYTEST)

test-fast: $(VENV)/.kdpipe-test
	$(PYTEST) -m "not slow"

# ruff (lint and format check) and mypy over the package, tests and benchmarks, as CI runs them.
lint: $(VENV)/.kdpipe-lint
	$(VENV)/bin/ruff check kdpipe tests benchmarks examples docs/templates
	$(VENV)/bin/ruff format --check kdpipe tests benchmarks examples docs/templates
	$(VENV)/bin/mypy

format: $(VENV)/.kdpipe-lint
	$(VENV)/bin/ruff check --fix kdpipe tests benchmarks examples docs/templates
	$(VENV)/bin/ruff format kdpipe tests benchmarks examples docs/templates

bench: install
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/cluster.py

clean:
	rm -rf $(VENV) runs .pytest_cache
