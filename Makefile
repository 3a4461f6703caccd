# idle-cull: `make install`, `make test`, `make lint`, `make bench`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NODE_DIR := .node
NODE_BIN := $(abspath $(NODE_DIR))/node_modules/.bin
CHP := $(NODE_BIN)/configurable-http-proxy
STAMP := $(VENV)/.installed

.PHONY: install test lint bench demo clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

install: $(STAMP)

# The end-to-end tests run a real configurable-http-proxy in front of a real JupyterHub.
$(CHP):
	npm install --silent --no-audit --no-fund --prefix $(NODE_DIR) configurable-http-proxy@5.3.0

test: install $(CHP)
	PATH="$(NODE_BIN):$$PATH" $(PY) -m pytest -q

lint: install
	$(PY) -m ruff check idle_cull.py tests
	$(PY) -m ruff format --check idle_cull.py tests

clean:
	rm -rf $(VENV) $(NODE_DIR) .pytest_cache .ruff_cache .hypothesis
