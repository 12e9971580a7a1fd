# Two commands do all set-up on a fresh machine: `make run` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint ui clean-workspace venv

# (Re)create the environment only when the lock or the project metadata changed.
# --no-deps: the lock is the whole, exact dependency set (torch 2.13.0 CPU wheel included), so nothing
# can pull a different torch or FastAPI; no resolver, same versions every time.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mmp run

test: $(STAMP)
	$(VENV)/bin/pytest -m "not gpu" --durations=15

test-fast: $(STAMP)
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

ui: $(STAMP)
	$(VENV)/bin/mmp ui

clean-workspace:
	rm -rf data/interim data/processed models reports mlflow.db mlartifacts .cache .prefect
