# Two commands do everything on a fresh machine:
#   make demo   installs cfl-sftp in .venv and runs the demo (SQLite and a local data folder)
#   make test   installs cfl-sftp with its test tools and runs linters and the test suite

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint tools clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/cfl-sftp demo

tools:
	./.ci/install-tools

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy

test: $(VENV)/.installed tools lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) cfl-demo .pytest_cache .mypy_cache .ruff_cache .hypothesis
