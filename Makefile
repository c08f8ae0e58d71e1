# Entry points. Each target sets up what it needs: on a fresh machine `make pipeline` and
# `make test` are the only commands to know (see README.md).
SHELL := /bin/bash
# uv from PATH, else a private copy bootstrapped into .tools/ (works without root or pipx).
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --frozen
HOST ?= 127.0.0.1
PORT ?= 5000
# The model the serving targets use: a registered alias by default (also read by the server as $MODEL_URI).
MODEL_URI ?= models:/mnist-digits@champion
MODEL_DIR ?= serving/model
IMAGE ?= mnist-serving

.PHONY: setup pipeline plots push pull registry-sync test test-fast lab ui server server-proxied benchmark lock sweep serve export-model docker-build benchmark-serving

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet uv

# The locked environment (uv.lock) in .venv, byte-compiled: this machine sets
# PYTHONDONTWRITEBYTECODE, and without .pyc files every stage spends ~10 s compiling imports.
# Then the notebooks' kernel, in this environment (.venv/share/jupyter): a --user kernel of the
# same name would be shared by every clone of the project and run whichever registered it last.
setup: $(UV)
	$(UV) sync --frozen --compile-bytecode
	$(RUN) python -m ipykernel install --sys-prefix --name mnist-lifecycle --display-name "Python (mnist-lifecycle)" >/dev/null

# The main job: the whole pipeline, tracked in mlflow.db / mlartifacts/ unless MLFLOW_TRACKING_URI is set;
# then a check that the registry's aliases are what data/registry/decision.json says.
pipeline: setup
	$(RUN) dvc repro
	$(RUN) python -m mnist_lifecycle.registry check

# Share the outputs through the DVC remote (README, "Share and reproduce"); a failure names the remote.
push: setup
	$(RUN) python -m mnist_lifecycle.remote push

pull: setup
	$(RUN) python -m mnist_lifecycle.remote pull

# Move the registry's aliases to what this checkout's data/registry/decision.json says (after
# `git checkout` + `dvc checkout`, or `dvc exp apply`; README, "Share and reproduce").
registry-sync: setup
	$(RUN) python -m mnist_lifecycle.registry sync

# A sweep of the training notebook on Optuna (docs/sweeps.md): make sweep SWEEP=params/sweeps/smoke.yaml
# WORKERS=2; run again, it resumes; SWEEP_ARGS=--overwrite starts over, SWEEP_ARGS="--storage URL" joins a
# team's study. Needs the prepared data only.
SWEEP ?= params/sweeps/lr_width.yaml
sweep: setup
	$(RUN) dvc repro prepare
	$(RUN) python -m mnist_lifecycle.sweep $(SWEEP) $(if $(WORKERS),--workers $(WORKERS)) $(SWEEP_ARGS)

# dvc plots show, with the Vega scripts its page needs fetched once into .tools/vega/ (the page
# falls back to the CDN without them): the plots render where the CDN is unreachable.
VEGA := .tools/vega
VEGA_PACKAGES := vega/-/vega-5.20.2 vega-lite/-/vega-lite-5.2.0 vega-embed/-/vega-embed-6.18.2
plots: setup $(VEGA)/vega-embed.min.js
	$(RUN) dvc plots show

$(VEGA)/vega-embed.min.js:
	mkdir -p $(VEGA)
	for package in $(VEGA_PACKAGES); do \
		curl -sSfL https://registry.npmjs.org/$$package.tgz | tar -xzO package/build/$$(basename $${package%-*}).min.js \
			> $(VEGA)/$$(basename $${package%-*}).min.js || exit 1; \
	done

# Tests spread over the cores (pytest-xdist; tests/conftest.py schedules them: modules with servers in one worker).
test: setup
	$(RUN) pytest -n auto

# The unit tests only (no pipeline, no servers, no browser): about 10 s, for quick feedback.
FAST_TESTS = tests/test_config.py tests/test_data.py tests/test_model.py tests/test_outputs.py tests/test_environment.py
test-fast: setup
	$(RUN) pytest $(FAST_TESTS)

# Jupyter refuses to run as root without --allow-root (containers, CI machines).
lab: setup
	$(RUN) jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root)

# Tracking servers and the UI without MLflow's GenAI job runner (5 more processes, unused here).
NO_JOBS := MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
SERVER := $(NO_JOBS) $(RUN) mlflow server --backend-store-uri sqlite:///mlflow.db

# The link to the training runs first: MLflow's UI otherwise opens an experiment on its GenAI view.
ui: setup
	@python3 -c "import sqlite3; db = sqlite3.connect('file:mlflow.db?mode=ro', uri=True); \
		(found,) = db.execute(\"select experiment_id from experiments where name = 'mnist-lifecycle'\").fetchall(); \
		print(f'Training runs: http://$(HOST):$(PORT)/#/experiments/{found[0]}?workflowType=machine_learning')" \
		2>/dev/null || true
	$(NO_JOBS) $(RUN) mlflow ui --backend-store-uri sqlite:///mlflow.db --host $(HOST) --port $(PORT)

# The seed's tracking server on mlflow.db; clients write artifacts straight into ./artifacts on
# their own disk, so it serves this machine only. Then: export MLFLOW_TRACKING_URI=http://$(HOST):$(PORT)
server: setup
	$(SERVER) --default-artifact-root ./artifacts --host $(HOST) --port $(PORT)

# The same with artifacts proxied: clients send them over HTTP (mlflow-artifacts:/ URIs), the
# server stores them in ./mlartifacts. Works for clients on other machines (HOST=0.0.0.0).
server-proxied: setup
	$(SERVER) --artifacts-destination ./mlartifacts --host $(HOST) --port $(PORT)

benchmark: setup
	$(RUN) python benchmarks/pipeline.py

# The model server: POST /predict and MLflow's routes on http://$(HOST):9201 (see docs/serving.md).
# MODEL_URI=data/model/mlflow_model serves the pipeline's model directory (after `dvc pull`: no store needed).
serve: setup
	$(RUN) python -m mnist_lifecycle.serving --model-uri '$(MODEL_URI)' --host $(HOST)

# The model as a plain directory (what serving/Dockerfile copies into the image). The tracking store
# is $MLFLOW_TRACKING_URI, else the pipeline's mlflow.db.
export-model: setup
	rm -rf $(MODEL_DIR)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
		$(RUN) mlflow artifacts download --artifact-uri $(MODEL_URI) --dst-path $(MODEL_DIR)

docker-build: export-model
	docker build -f serving/Dockerfile -t $(IMAGE) .

benchmark-serving: setup
	$(RUN) python benchmarks/serving.py

# Left out of serving/requirements.txt: serving/Dockerfile installs torch's CPU-only build.
SERVING_EXCLUDED = $(foreach p,$(shell grep -oE '^name = "(torch|triton|cuda-[a-z-]+|nvidia-[a-z0-9-]+)"' uv.lock \
	| cut -d'"' -f2),--no-emit-package $(p))

# After changing dependencies in pyproject.toml: relock, and re-export for pip/conda users.
lock: $(UV)
	$(UV) lock
	$(UV) export --frozen --no-hashes --no-dev --no-emit-project -q -o requirements.lock
	$(UV) export --frozen --no-hashes --only-group serving --no-emit-project -q $(SERVING_EXCLUDED) \
		-o serving/requirements.txt
