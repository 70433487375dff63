# sessa_jax: install, test, run, bench. Every target installs first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
PYTEST_WORKERS ?= 2

.PHONY: install test test-slow run bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

## The suite CI runs (under 15 minutes on 2 cores).
test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" tests

## Only the tests marked `slow` (the two-process run, grain worker processes,
## the GPU check's CPU dry run), which `make test` leaves out.
test-slow: install
	$(PY) -m pytest -q -m slow tests

## The embedded default experiment, on CPU, in a few minutes.
run: install
	$(PY) launch.py --config=configs/default.py --workdir=workdirs/default

## Benchmarks: prints a table and writes experiments/results/bench_cpu.json.
bench: install
	$(PY) experiments/bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
