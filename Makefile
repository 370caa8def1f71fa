# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNS   ?= runs

# pyproject.toml accepts torch >= 2.4; this is the build the test suite runs on. It is installed
# explicitly, before prunekit, so that pip does not resolve `torch` to the newest release and its
# CUDA packages (several GB) on a CPU machine. Already installed torch (e.g. a CUDA build put there
# first, see DEVELOPERS.md) is kept. TORCH_PIP_ARGS: extra pip options, e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH          ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test test-all lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	touch $@

$(VENV)/.core: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.core

# --apt: as root with apt-get, install the Debian package dataset-fashion-mnist; otherwise download.
demo: $(VENV)/.core
	$(BIN)/prunekit data fetch fashion-mnist --apt
	$(BIN)/prunekit train --model lenet-300-100 --dataset fashion-mnist --recipe lenet \
		--seed 0 --out $(RUNS)/demo-lenet300 --resume
	$(BIN)/prunekit prune --checkpoint $(RUNS)/demo-lenet300 --dataset fashion-mnist \
		--method merge --ratio 0.5 --out $(RUNS)/demo-lenet300-merge50

# Everything but the tests marked slow (each over ~20 s); test-all runs those too.
test: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache .hypothesis
