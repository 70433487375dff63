"""Studies and measurements built on sessa_jax, one script a file.

Sweep definitions (`matched_budget.py`), the study report and its analyses
(`report.py`, `memory_tail.py`, `symbol_soup_ceiling.py`), benchmarks
(`bench.py`, `seed_batching.py`, `ray_overhead.py`, `memory_per_device.py`),
studies that drive `launch.py` (`device_study.py`) and accelerator checks
(`gpu_check.py`, `compile_targets.py`). Each runs as `python
experiments/NAME.py` from the repo root or as `python -m experiments.NAME`;
the package is installed beside `sessa_jax` (setup.cfg), so a script imports
its siblings as `from experiments import NAME`. Their committed outputs are
under `results/` at the repo root.
"""
