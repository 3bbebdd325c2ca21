# One target makes the environment; `make test` runs the suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mixattn-installed

.PHONY: setup setup-foundry setup-lmeval demo docs-tables test test-foundry test-lmeval test-gpu lint lint-docker bench-attention plan clean

setup: $(STAMP)

# torch 2.14.1 + torchvision 0.29.1 first (composer imports torchvision; TORCH_INDEX=URL
# picks a PyTorch wheel index, e.g. https://download.pytorch.org/whl/cpu); then
# composer/streaming without their stale torch pins; then mixattn itself.
$(STAMP): pyproject.toml requirements/runtime.txt requirements/mosaic.txt requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -r requirements/runtime.txt -r requirements/dev.txt
	$(PIP) install -q --no-deps -r requirements/mosaic.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# the first-run demo: tokenizer + MDS data from Python's stdlib, a tiny MixAttention model trained on 2 CPU cores
demo: setup
	$(VENV)/bin/mixattn demo

test: setup
	$(PY) -m pytest tests

# regenerate the preset tables in docs/ from the presets (tests/test_docs_tables.py checks them)
docs-tables: setup
	$(PY) scripts/docs_tables.py

# the llm-foundry plugin: llm-foundry 0.22 without its torch==2.7.0 pin, plus
# what it imports (requirements/foundry.txt), then its checks against our plan
# conversion and a real llm-foundry training run with model.name: mixattn
FOUNDRY_STAMP := $(VENV)/.mixattn-foundry-installed
setup-foundry: $(FOUNDRY_STAMP)
$(FOUNDRY_STAMP): $(STAMP) requirements/foundry.txt requirements/foundry-nodeps.txt
	$(PIP) install -q -r requirements/foundry.txt
	$(PIP) install -q --no-deps -r requirements/foundry-nodeps.txt
	touch $(FOUNDRY_STAMP)

test-foundry: setup-foundry
	$(PY) -m pytest tests/test_foundry.py tests/test_mpt.py

# lm-evaluation-harness on a `mixattn export-hf` folder, in its own environment
# (lm-eval wants transformers 5; the main one pins 4.57): a local task's
# log-likelihoods through the harness equal the native model's
LMEVAL_VENV ?= .venv-lmeval
LMEVAL_STAMP := $(LMEVAL_VENV)/.mixattn-lmeval-installed
setup-lmeval: $(LMEVAL_STAMP)
$(LMEVAL_STAMP): requirements/lmeval.txt pyproject.toml
	test -x $(LMEVAL_VENV)/bin/python || $(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -m pip install -q -r requirements/lmeval.txt
	$(LMEVAL_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(LMEVAL_STAMP)

test-lmeval: setup-lmeval
	$(LMEVAL_VENV)/bin/python -m pytest tests/test_lm_eval.py

# on a CUDA machine: the GPU-only checks (flex backward, compiled kernels)
test-gpu:
	$(PY) -m pytest tests/gpu

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts

# the Dockerfiles, linted with hadolint (no docker engine needed)
lint-docker: setup
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.cpu

bench-attention:
	$(PY) benchmarks/attention.py

plan: setup
	$(VENV)/bin/mixattn plan ma --n-layers 24 --window 1024

clean:
	rm -rf $(VENV) build *.egg-info
