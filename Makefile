# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean labelstudio test-integration browser

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

# Debian's Chromium and its WebDriver for the report's browser test (tests/test_report.py, part of
# `make test`, which skips it with the reason when they are absent). Installed only when missing and
# when we are root (CI is); otherwise it says how and the test skips.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver present"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium chromium-driver; \
	else \
		echo "chromium not installed and not root: the browser test will skip" \
			"(sudo apt-get install chromium chromium-driver)"; \
	fi

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
