# dpserve: the commands of the quick start and the test tiers.
#   make serve   install (if needed) and serve the tiny MoE model with 2 DP ranks on 127.0.0.1:8000
#   make test    install (if needed) and run the test suite
#   make test-fast   the tests that start no engine and no cluster (the edit-test loop; < 2 min)
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dpserve-installed
# pip pulls CUDA builds of these next to the CPU torch; they fail to load and break transformers.
CUDA_LEFTOVERS := torchvision torchaudio torchcodec triton

.PHONY: serve test test-fast install model lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[cpu,test]"
	$(BIN)/pip uninstall -y -q $(CUDA_LEFTOVERS) || true
	touch $(STAMP)

install: $(STAMP)

model: install
	$(BIN)/dpserve make-model

serve: model
	$(BIN)/dpserve serve --config ray_configs/serve-local.yaml

test: model
	$(BIN)/python -m pytest --durations=15

test-fast: model
	DPSERVE_TEST_TIER=fast $(BIN)/python -m pytest -m "not slow" --durations=10

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
