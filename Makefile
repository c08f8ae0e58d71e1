# Entry points. Each target sets up what it needs: on a fresh machine `make pipeline` and
# `make test` are the only commands to know (see README.md).
SHELL := /bin/bash
# uv from PATH, else a private copy bootstrapped into .tools/ (works without root or pipx).
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --frozen
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: setup pipeline test lab ui server server-proxied benchmark lock sweep

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet uv

# The locked environment (uv.lock) in .venv, byte-compiled: this machine sets
# PYTHONDONTWRITEBYTECODE, and without .pyc files every stage spends ~10 s compiling imports.
setup: $(UV)
	$(UV) sync --frozen --compile-bytecode
	$(RUN) python -m ipykernel install --user --name mnist-lifecycle --display-name "Python (mnist-lifecycle)" >/dev/null

# The main job: the whole pipeline, tracked in mlflow.db / mlartifacts/ unless MLFLOW_TRACKING_URI is set.
pipeline: setup
	$(RUN) dvc repro

# A papermill sweep over the training notebook (README, "Sweeps"): make sweep SWEEP=params/sweeps/smoke.yaml
# WORKERS=2; SWEEP_ARGS=--overwrite reruns into the same sweeps/<name>/. Needs the prepared data only.
SWEEP ?= params/sweeps/lr_width.yaml
sweep: setup
	$(RUN) dvc repro prepare
	$(RUN) python -m mnist_lifecycle.sweep $(SWEEP) $(if $(WORKERS),--workers $(WORKERS)) $(SWEEP_ARGS)

test: setup
	$(RUN) pytest

lab: setup
	$(RUN) jupyter lab

ui: setup
	$(RUN) mlflow ui --backend-store-uri sqlite:///mlflow.db --host $(HOST) --port $(PORT)

# The seed's tracking server on mlflow.db; clients write artifacts straight into ./artifacts on
# their own disk, so it serves this machine only. Then: export MLFLOW_TRACKING_URI=http://$(HOST):$(PORT)
server: setup
	$(RUN) mlflow server --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./artifacts --host $(HOST) --port $(PORT)

# The same with artifacts proxied: clients send them over HTTP (mlflow-artifacts:/ URIs), the
# server stores them in ./mlartifacts. Works for clients on other machines (HOST=0.0.0.0).
server-proxied: setup
	$(RUN) mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts --host $(HOST) --port $(PORT)

benchmark: setup
	$(RUN) python benchmarks/pipeline.py

# After changing dependencies in pyproject.toml: relock, and re-export for pip/conda users.
lock: $(UV)
	$(UV) lock
	$(UV) export --frozen --no-hashes --no-dev --no-emit-project -q -o requirements.lock
