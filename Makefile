# Two commands: `make demo` (the whole pipeline on the embedded demo data) and `make test` (the test suite).
# Both create or reuse .venv and install the project into it first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev

.PHONY: demo test test-all lint install install-dev ui repro clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes; the package itself is an editable install.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $@

install: $(STAMP)
install-dev: $(DEV)

# The demo data is a DVC stage output (dvc.yaml: demo_data), so its hash is versioned and logged on each run.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro demo_data
	$(BIN)/crossmodal demo

test: $(DEV)
	$(BIN)/python -m pytest

# The house rules: ruff (pyflakes, import order, no private access across modules) and the import layers
# (import-linter contracts in pyproject.toml: each layer imports only from the layers below it).
lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Also the slow tests (dvc repro end to end, a real Prefect server schedule).
test-all: $(DEV)
	$(BIN)/python -m pytest -m ''

# The DVC pipeline (dvc.yaml) with the venv's commands on PATH.
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

ui: $(STAMP)
	$(BIN)/crossmodal ui

clean:
	rm -rf work reports .cache/crossmodal
