# visstg: the two README commands are `make train` and `make test`; each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?=

.DEFAULT_GOAL := help

.PHONY: help install train test test-all lint format clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; free < 8 and print(f'warning: {free:.1f} GiB free on this disk; the virtualenv takes about 6.5 GiB (torch is a CUDA build), so the install may stop with \"No space left on device\"', file=sys.stderr)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import torchvision.ops, torch_geometric, pytorch_lightning, pycocotools, av; print('visstg environment ready: torch', __import__('torch').__version__)"
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install visstg (editable, with dev extras); no-op when done

train: install ## train the default configuration on the built-in synthetic data
	$(BIN)/python -m visstg.train $(ARGS)

test: install ## run the fast test suite
	$(BIN)/python -m pytest $(PYTEST_FLAGS)

test-all: install ## run every test, the slow ones included
	$(BIN)/python -m pytest -m "" $(PYTEST_FLAGS)

lint: install ## ruff check and format check
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: install ## apply ruff formatting and fixes
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
