# Every target works on a fresh clone: it creates .venv with Python 3.11 and installs the project first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUT ?= outputs

.PHONY: install test test-fast demo bench lint clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned in the same command so pip never pulls a multi-GB CUDA build on a CPU machine
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m chestct.demo --out $(OUT)/demo

bench: $(STAMP)
	$(BIN)/python benchmarks/preprocess.py --out $(OUT)/benchmarks

lint: $(STAMP)
	$(BIN)/python -m ruff check custom_nets chestct tests benchmarks

clean:
	rm -rf $(OUT) .pytest_cache
