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

One command-line style, absl flags (as `launch.py`'s), each script's on a
`flags.FlagValues` of its own (`sessa_jax.cli`): a script's
`_define_flags(fv)` defines them and `main(argv)` parses them, so importing
a script defines no flags, scripts that import one another never clash, and
a test calls `main(["--flag=value", ...])`. `--help` lists a script's flags;
a boolean flag `--NAME` also reads `--noNAME`.
"""
