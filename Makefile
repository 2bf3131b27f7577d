# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean labelstudio test-integration

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Label Studio for the integration test, in its own venv (its pinned dependencies conflict with ours).
LS_VENV := .venv-ls
LS_STAMP := $(LS_VENV)/.installed

$(LS_STAMP): requirements-labelstudio.lock
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q -r requirements-labelstudio.lock
	touch $(LS_STAMP)

labelstudio: $(LS_STAMP)

demo: $(STAMP)
	$(BIN)/sparseseg demo --out demo_out

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# A real Label Studio server on a loopback port: tasks in, answers through its API, export back in.
test-integration: $(STAMP) $(LS_STAMP)
	$(BIN)/python -m pytest -q -m labelstudio tests/test_labelstudio.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(LS_VENV) demo_out .pytest_cache
