# Two commands: `make run` starts the whole service, `make test` runs the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: install run test test-full lint bench clean

install: $(STAMP)

# torch is installed first, pinned, so that pip never resolves a (multi-GB) CUDA build on its own.
# open-clip-torch is installed without its dependencies: we only read the CLIP BPE vocabulary it ships.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[model,dev]"
	$(BIN)/python -m pip install -q --no-deps "open-clip-torch==3.3.0"
	touch $(STAMP)

run: install
	$(BIN)/sdqueue dev --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -m "not slow"

test-full: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/model_vs_diffusers.py
	$(BIN)/python bench/service_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
