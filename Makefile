# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project when it is missing or pyproject.toml changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/dagster_home

.PHONY: venv demo test ui bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first: this exact release is the CPU wheel on disk; anything else pulls a multi-GB CUDA build
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, transformers, dagster, mlflow, duckdb, scaffold_lib"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/scaffold demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

ui: $(STAMP)
	$(BIN)/scaffold ui

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python bench/bench_segment_label.py

clean:
	rm -rf $(VENV)
