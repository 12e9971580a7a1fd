# Two commands do all set-up on a fresh machine: `make run` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run demo test test-fast lint ui clean-workspace venv bench bench-peers

# (Re)create the environment only when the lock or the project metadata changed.
# --no-deps: the lock is the whole, exact dependency set (torch 2.13.0 CPU wheel included), so nothing
# can pull a different torch or FastAPI; no resolver, same versions every time.
# Bytecode: pip compiles every installed file one at a time (~90 s of a 3-minute install on 2 cores);
# compileall does the same on all cores (~57 s). A file that does not compile is only left uncached.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps --no-compile -r requirements.lock
	@$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		> /dev/null 2>&1 || true
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mmp run

# The whole flow on the demo profile (params/demo.yaml) in its own workspace, demo/: a few minutes.
demo: $(STAMP)
	$(VENV)/bin/mmp demo

test: $(STAMP)
	$(VENV)/bin/pytest -m "not gpu" --durations=15

test-fast: $(STAMP)
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

ui: $(STAMP)
	$(VENV)/bin/mmp ui

# Peer tools for the benchmarks (CleanVision, imagededup, scikit-image) live in their own venv so they can
# never change the project's pins; torch is pinned there too, so nothing pulls a CUDA build.
PEERS := bench/.venv-peers
$(PEERS)/.installed: bench/peers-requirements.txt
	@test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q torch==2.13.0
	$(PEERS)/bin/pip install -q -c bench/peers-constraints.txt -r bench/peers-requirements.txt
	@touch $@

bench-peers: $(PEERS)/.installed

bench: $(STAMP) $(PEERS)/.installed
	$(PY) bench/image_checks_bench.py
	$(PY) bench/neardup_bench.py
	$(PY) bench/cider_bench.py

clean-workspace:
	rm -rf data/interim data/processed models reports mlflow.db mlartifacts .cache .prefect
