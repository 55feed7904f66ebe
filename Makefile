# keeper: the commands the README names. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= keeper-demo
PACKAGES := packages/core packages/train packages/serve
STAMP := $(VENV)/.keeper-installed

.PHONY: help setup browser demo test lint ruff format clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-8s\033[0m %s\n", $$1, $$2}'

# The install step is .ci/install.sh, the one docker/Dockerfile runs too (there: --system).
$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PACKAGES)) .ci/install.sh
	.ci/install.sh --venv $(VENV) --python $(PYTHON) --dev --editable
	touch $(STAMP)

setup: $(STAMP) browser ## create .venv and install the workspace (editable), the dev group, chromium

browser: ## Debian's chromium for the review page's browser test, where it is missing (apt-get as root)
	@bash .ci/install-browser.sh

# The demo trains and promotes a champion (keeper_train), serves it over HTTP (keeper_serve), and
# culls a camera library with keeper pick (timestamps, no labels), fine-tunes the tower (LoRA), and
# ends with one /v1/select (the selection cascade, a tiny random VLM) and its stage accounting.
demo: $(STAMP) ## run the main job end to end, offline, on embedded defaults (writes $(DEMO_DIR)/)
	$(PY) -m keeper_train.jobs.demo --out $(DEMO_DIR)
	$(PY) -m keeper_serve.demo --out $(DEMO_DIR)
	$(PY) -m keeper_train.jobs.pick_demo --out $(DEMO_DIR)
	$(PY) -m keeper_train.jobs.finetune_demo --out $(DEMO_DIR)
	$(PY) -m keeper_serve.select_demo --out $(DEMO_DIR)

ruff: $(STAMP) ## ruff check, ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lint: ruff ## ruff, then mypy on keeper_core
	$(VENV)/bin/mypy

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# ruff, then the integration tests in one process around the session's Ray, moto_server and
# mlflow server, and beside them, at a lower priority, mypy and the unit tests on two pytest-xdist
# workers (tests/run.sh says why). All of it always runs; pytest's exit 5 (no tests collected) fails
# either half. `make lint` is the quick check on its own.
test: setup ruff ## ruff, then the whole test suite (integration; beside it mypy and the unit tests)
	@bash tests/run.sh $(PY) --mypy

clean: ## remove the venv, caches and demo output
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
