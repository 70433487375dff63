"""GPU check of the Pallas feedback kernels: compile, compare, time.

One command, meant to finish within 8 minutes on one H100/H200:

  python experiments/gpu_check.py [--out experiments/results/gpu_check.json]

1. Compiles the GPU (Triton) Pallas kernels for real and compares values and
   gradients of all four inputs with the dense oracle (float32 at T = 1024;
   the kernels' float32 dots may use TF32, hence the loose tolerance).
2. Times forward+backward in bfloat16 for T = 4k ... 32k (B = 2, K = D = 256)
   for `pallas`, `chunked` (plain JAX) and `dense`, and cuDNN causal
   attention of the same shape (4 heads of 64) as a yardstick.
3. Writes everything as JSON (also after each case, so a timeout keeps what
   was measured).

`--dry_run` runs the same code on CPU with tiny shapes, the kernels in
interpret mode and cuDNN skipped; the test suite uses it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # Run as a script from a checkout.
  sys.path.insert(0, str(ROOT))

from sessa_jax.kernels import feedback_chunked  # pylint: disable=g-import-not-at-top,wrong-import-position
from sessa_jax.kernels import feedback_pallas  # pylint: disable=g-import-not-at-top,wrong-import-position
from sessa_jax.kernels import feedback_ref  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_OUT = ROOT / "experiments" / "results" / "gpu_check.json"


def _inputs(b, t, width, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, t, width), jnp.float32)
  k = jax.random.normal(keys[1], (b, t, width), jnp.float32)
  gamma = 0.999 * jnp.tanh(jax.random.normal(keys[2], (b, t), jnp.float32))
  f = jax.random.normal(keys[3], (b, t, width), jnp.float32)
  cot = jax.random.normal(keys[4], (b, t, width), jnp.float32)
  return [x.astype(dtype) for x in (q, k, gamma, f, cot)]


def _value_and_grads(solve):
  def run(q, k, gamma, f, cot):
    s, vjp = jax.vjp(solve, q, k, gamma, f)
    return [s, *vjp(cot)]
  return jax.jit(run)


def _time(fn, args, runs=3):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), compile_s


def _solvers(chunk, interpret):
  return {
      "pallas": lambda *a: feedback_pallas.feedback_solve_pallas(
          *a, chunk=chunk, backend="gpu", interpret=interpret),
      "chunked": lambda *a: feedback_chunked.feedback_solve_chunked(*a),
      "dense": feedback_ref.feedback_solve_dense,
  }


def _attention(b, t, width, heads, dtype, implementation):
  """Causal attention fwd+bwd of the same width, as a speed yardstick."""
  keys = jax.random.split(jax.random.key(1), 4)
  shape = (b, t, heads, width // heads)
  q, k, v, cot = [jax.random.normal(key, shape, jnp.float32).astype(dtype)
                  for key in keys]

  def run(q, k, v, cot):
    out, vjp = jax.vjp(lambda *x: jax.nn.dot_product_attention(
        *x, is_causal=True, implementation=implementation), q, k, v)
    return [out, *vjp(cot)]
  return jax.jit(run), (q, k, v, cot)


def check_correctness(b, t, width, chunk, interpret):
  """Relative max errors of pallas vs dense, values and the four gradients."""
  args = _inputs(b, t, width, jnp.float32, seed=1)
  got = _value_and_grads(_solvers(chunk, interpret)["pallas"])(*args)
  want = _value_and_grads(feedback_ref.feedback_solve_dense)(*args)
  errors = {}
  for name, x, y in zip(("s", "dq", "dk", "dgamma", "df"), got, want):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    errors[name] = float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
  return errors


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(DEFAULT_OUT))
  parser.add_argument("--dry_run", action="store_true",
                      help="tiny shapes on CPU, kernels in interpret mode")
  parser.add_argument("--lengths", default=None,
                      help="comma-separated T values to time")
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="stop starting new timings after this many seconds")
  args = parser.parse_args(argv)

  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.dry_run:
    parser.error("no GPU found; use --dry_run to exercise the script on CPU")
  if args.dry_run:
    b, width, heads, chunk, check_t = 1, 32, 4, 16, 40
    lengths = [64, 128]
  else:
    b, width, heads, chunk, check_t = 2, 256, 4, 64, 1024
    lengths = [4096, 8192, 16384, 32768]
  if args.lengths:
    lengths = [int(x) for x in args.lengths.split(",")]
  interpret = not on_gpu
  started = time.time()
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  result = {
      "device": str(jax.devices()[0].device_kind),
      "jax": jax.__version__,
      "dry_run": args.dry_run,
      "config": {"batch": b, "width": width, "chunk": chunk,
                 "timing_dtype": "bfloat16"},
      "correctness": {"t": check_t, "dtype": "float32",
                      "rel_max_error": check_correctness(
                          b, check_t, width, chunk, interpret)},
      "timings": [],
  }
  errors = result["correctness"]["rel_max_error"]
  result["correctness"]["ok"] = max(errors.values()) < 2e-2
  print("correctness (rel. max error vs dense):", errors)

  def save():
    result["wall_s"] = time.time() - started
    out.write_text(json.dumps(result, indent=1) + "\n")

  save()
  for t in lengths:
    cases = dict(_solvers(chunk, interpret))
    if not on_gpu:
      cases.pop("chunked")  # Covered by the CPU suite; keeps the dry run short.
    for name, solve in cases.items():
      row = {"t": t, "impl": name}
      dense_bytes = 6 * b * t * t * 4
      if time.time() - started > args.budget_s:
        row["skipped"] = "time budget spent"
      elif name == "dense" and on_gpu and dense_bytes > 0.8 * (
          jax.devices()[0].memory_stats() or {}).get("bytes_limit", 8 << 30):
        row["skipped"] = f"needs ~{dense_bytes / 2**30:.0f} GiB"
      else:
        try:
          row["seconds"], row["compile_s"] = _time(
              _value_and_grads(solve), _inputs(b, t, width, jnp.bfloat16))
        except Exception as e:  # pylint: disable=broad-except
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      result["timings"].append(row)
      print(row, flush=True)
      save()
    row = {"t": t, "impl": "cudnn_attention", "heads": heads}
    if not on_gpu:
      row["skipped"] = "cuDNN needs a GPU"
    elif time.time() - started > args.budget_s:
      row["skipped"] = "time budget spent"
    else:
      try:
        fn, fn_args = _attention(b, t, width, heads, jnp.bfloat16, "cudnn")
        row["seconds"], row["compile_s"] = _time(fn, fn_args)
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    result["timings"].append(row)
    print(row, flush=True)
    save()
  print(f"wrote {out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
  main()
