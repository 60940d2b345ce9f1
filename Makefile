# Two commands on a fresh machine: `make demo` and `make test`.
# torch/torchvision are installed first, pinned: an unpinned torch pulls a newer multi-GB build,
# and PyPI's torchvision does not import beside other torch builds.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.corelens-installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
OUT ?= corelens-demo

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/corelens demo --out $(OUT)

# full tier: what CI runs (lint, then every test including those marked slow)
test: $(STAMP) lint
	$(BIN)/python -m pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# fast tier: the edit loop
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -x

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
