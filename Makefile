# Two commands on a fresh machine: `make demo` and `make test`.
#
# `make setup` installs the tested set from requirements.lock (exact versions of every package,
# torch + torchvision included), then corelens itself without resolving anything else. torch and
# torchvision come from the package registry (there is no local copy any more); they stay pinned
# as a pair (torch 2.14.1 + torchvision 0.29.1): an unpinned torch pulls a newer multi-GB build,
# and PyPI's torchvision does not import beside other torch builds.
# `make lock` refreshes requirements.lock from pyproject.toml's ranges (uv, pinned below);
# `make test-latest` runs the fast tier on the newest releases those ranges allow.
# `make docs` builds the documentation site (mkdocs.yml) into site/, offline.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LATEST_VENV ?= .venv-latest
TOOLS_VENV ?= .venv-tools
LOCK := requirements.lock
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
UV_PIN := uv==0.13.9
STAMP := $(VENV)/.corelens-installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
OUT ?= corelens-demo
VERSIONS := import corelens.compat as c; print(' '.join(f'{k}=={v}' for k, v in c.versions().items()))

.PHONY: setup demo test test-fast test-latest lint lock docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/corelens demo --out $(OUT)

# full tier: what CI runs (lint, then every test including those marked slow)
test: $(STAMP) lint
	$(BIN)/python -m pytest -n 2

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

# fast tier: the edit loop
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -x

# the documentation site, strictly (a broken reference or a failing notebook fails it), offline:
# open site/index.html. The notebooks are rendered from their executed copies in
# build/notebooks/ (tests/test_notebooks.py leaves them there); docs/hooks.py executes those that
# are missing or stale first (docs/run_notebooks.py). tests/test_docs_site.py builds it too.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -f mkdocs.yml -d site

# drift check: a second venv with the newest releases pyproject.toml allows (torch pair kept)
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	printf '%s\n' $(TORCH_PIN) > $(LATEST_VENV)/torch-pair.txt
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/torch-pair.txt \
		--upgrade --upgrade-strategy eager -e ".[test]"
	@$(LATEST_VENV)/bin/python -c "$(VERSIONS)"
	$(LATEST_VENV)/bin/python -m pytest -n 2 -m "not slow"

# refresh the lock: newest releases inside pyproject.toml's ranges, the torch pair held
lock:
	test -x $(TOOLS_VENV)/bin/uv || ($(PY) -m venv $(TOOLS_VENV) && \
		$(TOOLS_VENV)/bin/python -m pip install -q $(UV_PIN))
	printf '%s\n' $(TORCH_PIN) | $(TOOLS_VENV)/bin/uv pip compile pyproject.toml - --extra test \
		--python-version 3.11 --python-platform x86_64-unknown-linux-gnu -q -o $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(TOOLS_VENV) $(OUT) .pytest_cache site build/notebooks
