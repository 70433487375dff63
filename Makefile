# sessa_jax: install, test, run, bench. Every target installs first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
LOCK := requirements/lock.txt
PYTEST_WORKERS ?= 2

.PHONY: install lock test test-slow run bench clean

## On CPU, glibc returns an XLA step's large buffers to the system and maps them
## again on the next step; keeping them cut a small model's step time by about
## 12% on a 2-core machine (README, "Run a config"). Override from the shell.
export MALLOC_MMAP_THRESHOLD_ ?= 4000000000
export MALLOC_TRIM_THRESHOLD_ ?= 4000000000
export MALLOC_TOP_PAD_ ?= 536870912

install: $(STAMP)

## The exact versions of requirements/lock.txt (constraints) into .venv.
$(STAMP): setup.cfg pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "sessa_jax needs Python 3.11 or newer; run make PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c $(LOCK) -e '.[test]'
	touch $(STAMP)

## Upgrade the lock: the newest versions setup.cfg allows, in a scratch venv;
## the suite must pass before the lock is rewritten.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lock/bin/python -m pip install -q -e '.[test]'
	.venv-lock/bin/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" tests
	{ head -n 2 $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

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

## Benchmarks: prints tables and writes workdirs/bench/bench{,_decode}_cpu.json
## (python experiments/bench.py --out_dir experiments/results updates the
## committed results).
bench: install
	$(PY) experiments/bench.py

clean:
	rm -rf $(VENV) .venv-lock build *.egg-info .pytest_cache
