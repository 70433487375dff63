# sessa_jax: install, test, run, bench. Every target installs first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
LOCK := requirements/lock.txt
PYTEST_WORKERS ?= 2

.PHONY: install lock lint test test-slow run bench dry-run test-targets clean

## On CPU, glibc returns an XLA step's large buffers to the system and maps them
## again on the next step; keeping them cut a small model's step time by about
## 12% on a 2-core machine (docs/training.md, "Run a config"). Override from the shell.
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

## Lint (pyflakes and pycodestyle, settings in pyproject.toml).
lint: install
	$(PY) -m ruff check .

## The suite CI runs (under 15 minutes on 2 cores), after the lint.
test: install lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" tests

## Only the tests marked `slow` (the two-process run, grain worker processes,
## the GPU check's CPU dry run), which `make test` leaves out.
test-slow: install
	$(PY) -m pytest -q -m slow tests

## The embedded default experiment, on CPU, in a few minutes.
run: install
	$(PY) launch.py --config=configs/default.py --workdir=workdirs/default

## Benchmarks: prints tables and writes workdirs/bench/bench{,_decode}_cpu.json
## (python experiments/bench.py --out_dir results updates the
## committed results).
bench: install
	$(PY) experiments/bench.py

## Compilers for deviceless compiles (sessa_jax/train/target_compile.py),
## each in an environment of its own at the locked JAX version: JAX's CUDA
## plugin (about 5.5 GB) and libtpu (about 1.5 GB).
.venv-cuda/.install-stamp: setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv .venv-cuda
	.venv-cuda/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-cuda/bin/python -m pip install -q -c $(LOCK) -e '.[cuda]'
	touch $@

.venv-tpu/.install-stamp: setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv .venv-tpu
	.venv-tpu/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-tpu/bin/python -m pip install -q -c $(LOCK) -e '.[tpu]'
	touch $@

## Compile CONFIG's train step for TARGET (h200, h100, a100, h200x8,
## v5e:2x2, v6e:4x4, v5p:2x2x2, ...) on this CPU: memory per device, FLOPs,
## whether it fits. ARGS takes more flags, e.g. ARGS='--config.mesh.fsdp=4'.
TARGET ?= h200
CONFIG ?= configs/default.py
ARGS ?=
TARGET_VENV = $(if $(filter v%,$(TARGET)),.venv-tpu,.venv-cuda)
dry-run:
	@$(MAKE) --no-print-directory $(TARGET_VENV)/.install-stamp
	$(TARGET_VENV)/bin/python launch.py --config='$(CONFIG)' \
	    --workdir=workdirs/dry_run --dry_run --target='$(TARGET)' $(ARGS)

## Every accelerator path compiled for h200, a100, v5e:2x2 and v6e:2x2
## (about 30 minutes on 2 cores); writes results/targets.{md,json}
## and fails if any case does.
test-targets: install .venv-cuda/.install-stamp .venv-tpu/.install-stamp
	mkdir -p workdirs/targets
	.venv-cuda/bin/python experiments/compile_targets.py --targets=h200,a100 \
	    --out=workdirs/targets/gpu.json; \
	.venv-tpu/bin/python experiments/compile_targets.py \
	    --targets=v5e:2x2,v6e:2x2 --out=workdirs/targets/tpu.json; \
	$(PY) experiments/compile_targets.py --merge workdirs/targets/gpu.json \
	    workdirs/targets/tpu.json --out_dir results

clean:
	rm -rf $(VENV) .venv-cuda .venv-tpu .venv-lock build *.egg-info .pytest_cache
