# Two commands: `make run` starts the whole service, `make test` runs the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: install run test test-full lint bench bench-sdxl chaos clean

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

# The browser tests need Debian's chromium and chromium-driver: installed here when run as root with apt-get;
# otherwise the test fails and says what to install.
test: lint
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "installing chromium and chromium-driver for the browser tests"; \
	        DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	    else \
	        echo "note: the browser tests need chromium and chromedriver: apt-get install chromium chromium-driver"; \
	    fi; \
	fi
	$(BIN)/pytest -m "not slow"

test-full: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/model_vs_diffusers.py
	$(BIN)/python bench/service_overhead.py

# SDXL-size random weights (13 GB on disk, up to 15 GB of memory per process): ours vs diffusers, about 15 minutes
# on 2 cores.
bench-sdxl: install
	$(BIN)/python bench/sdxl.py

# The chaos drills at full length: real processes killed, restarted and flooded while jobs run; one figure line per
# drill (`make test` runs the drills that pass, shortened, from tests/chaos).
chaos: install
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
