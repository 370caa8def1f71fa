# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNS   ?= runs

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# Core install (torch is pinned to 2.13.0 in pyproject.toml: an unpinned torch pulls CUDA wheels).
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	$(BIN)/prunekit data fetch fashion-mnist
	$(BIN)/prunekit train --model lenet-300-100 --dataset fashion-mnist --recipe lenet \
		--seed 0 --out $(RUNS)/demo-lenet300 --resume
	$(BIN)/prunekit prune --checkpoint $(RUNS)/demo-lenet300 --dataset fashion-mnist \
		--method merge --ratio 0.5 --out $(RUNS)/demo-lenet300-merge50

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache .hypothesis
