# Everyday commands. `make run` and `make test` create or reuse the virtual environment .venv.
#
# torch 2.13.0 is installed first: on Linux without an NVIDIA GPU the CPU build (2.13.0+cpu) from
# PyTorch's CPU index, never PyPI's multi-GB CUDA build; with `nvidia-smi`, or on macOS (CPU + MPS),
# PyPI's build. Set TORCH_INDEX_URL to pick a build explicitly, e.g.
#   make TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 run    (CUDA 12.8)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?=
TORCH_CPU_INDEX_URL := https://download.pytorch.org/whl/cpu
# `torch==2.13.0+cpu` matches only the CPU build: from that index, or a wheel pip already finds
# (find-links, a mirror); never PyPI's CUDA build. Only torch is looked up there (its dependencies
# come with the project below) and with short timeouts, so an index out of reach costs seconds.
TORCH_CPU_PIP_ARGS := --no-deps --timeout 15 --retries 1 --extra-index-url $(TORCH_CPU_INDEX_URL)

.PHONY: install run test lint format typecheck pytest fuzz bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_INDEX_URL)" ]; then \
		$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX_URL)"; \
	elif ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then \
			echo "NVIDIA GPU found: installing torch $(TORCH_VERSION) with CUDA"; \
			$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"; \
		elif [ "$$(uname -s)" = Darwin ]; then \
			echo "macOS: installing torch $(TORCH_VERSION) (CPU + MPS)"; \
			$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"; \
		else \
			echo "No NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
			$(BIN)/python -m pip install --quiet $(TORCH_CPU_PIP_ARGS) "torch==$(TORCH_VERSION)+cpu"; \
		fi; \
	fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# Host and port come from LOCALAI_HOST / LOCALAI_PORT (default 127.0.0.1:8000).
run: $(STAMP)
	$(BIN)/python -m app

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# mypy --strict on the packages [tool.mypy] in pyproject.toml names: app, tests, benchmarks.
typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

# `make test` drives every API operation with generated requests (tests/app/test_openapi_fuzz.py,
# 20 examples per operation); this runs the same with more. FUZZ_EXAMPLES=N picks how many,
# FUZZ_SEED=N other requests than the fixed seed's.
FUZZ_EXAMPLES ?= 200
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/app/test_openapi_fuzz.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.lora_speed
	$(BIN)/python -m benchmarks.cpu_step
	$(BIN)/python -m benchmarks.http_costs
	$(BIN)/python -m benchmarks.memory_estimate

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
