"""GPU check of the Pallas feedback solve: compile, compare, time, in one call.

The one prepared GPU script, meant to finish within 5 minutes on one
H100/H200:

  python experiments/gpu_check.py                    # -> workdirs/gpu_check/
  python experiments/gpu_check.py --out_dir results  # commit it

1. Compiles the GPU (Triton) Pallas kernels for real and compares values and
   the gradients of all four inputs with the dense float32 oracle: float32
   inputs at a T that is a power of two and at one that is not (T = 1500
   pads to 6 chunks, so rectangles are cut short by the end of the
   sequence), and bfloat16 inputs (the oracle sees the same rounded values;
   the chunked solve's error is recorded beside the Pallas one). float32
   dots may use TF32, hence the loose tolerances.
2. Times forward+backward in bfloat16 for T = 4k, 16k, 32k (B = 2, K = D =
   256) for `pallas` (with its compile time), `chunked` (plain JAX) and
   `dense`, and cuDNN causal attention of the same width as yardsticks: 4
   heads of 64, and 1 head of 256 (the feedback's shape) where cuDNN takes
   it.
3. Times one MixerBlock forward+backward (D = 256, 4 heads, bfloat16
   compute) at T = 4k and 16k for Sessa with the Pallas and the chunked
   solve, attention (cuDNN) and Mamba-2: tokens/s.
4. Writes `gpu_check.json` after each case (a timeout keeps what was
   measured; a failing case records its error and the rest still run), then
   `gpu_check.md` (tables), and prints the ratios the targets are stated in:
   Pallas / cuDNN (4 x 64) time per T, Sessa / attention MixerBlock
   tokens/s per T, and the Pallas compile time at the longest T and its
   ratio to the shortest's.

Before any of that it compiles the Pallas solve (forward+backward, float32
and bfloat16) and the Sessa MixerBlock for the GPU it runs on, with the
kernel tiles chosen for that GPU (`pallas.kernel_tilings`), and
stops at once if one fails, so a lent GPU is not spent finding that out.
`--target=h200` runs only that step, as a deviceless compile on a CPU with
the CUDA compiler installed (`.venv-cuda`, made by `make dry-run`): run it
before renting the GPU.

`--dry_run` runs the same code on CPU with tiny shapes, the kernels in
interpret mode and cuDNN skipped; the test suite uses it.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
import traceback
from typing import Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench
from sessa_jax import cli
from sessa_jax import targets
from sessa_jax.kernels.feedback import chunked as feedback_chunked
from sessa_jax.kernels.feedback import defaults
from sessa_jax.kernels.feedback import pallas
from sessa_jax.kernels.feedback import reference
from sessa_jax.models import ModelConfig, mixers

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = ROOT / "workdirs" / "gpu_check"
# Relative max error allowed against the dense float32 oracle, by input
# dtype (float32 dots may use TF32; bfloat16 keeps 8 bits of mantissa).
TOLERANCE = {"float32": 2e-2, "bfloat16": 5e-2}
NAMES = ("s", "dq", "dk", "dgamma", "df")


def _input_shapes(b, t, width, dtype):
  """The (q, k, gamma, f, cotangent) shapes of `_inputs`."""
  return [jax.ShapeDtypeStruct(s, dtype) for s in
          [(b, t, width), (b, t, width), (b, t), (b, t, width),
           (b, t, width)]]


def _inputs(b, t, width, dtype, seed=0):
  shapes = _input_shapes(b, t, width, jnp.float32)
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  q, k, gamma, f, cot = [jax.random.normal(key, x.shape, x.dtype)
                         for key, x in zip(keys, shapes)]
  gamma = 0.999 * jnp.tanh(gamma)
  return [x.astype(dtype) for x in (q, k, gamma, f, cot)]


def _value_and_grads(solve):
  def run(q, k, gamma, f, cot):
    s, vjp = jax.vjp(solve, q, k, gamma, f)
    return [s, *vjp(cot)]
  return jax.jit(run)


def _time(fn, args, runs=3):
  """(median seconds of `runs` calls, seconds of the first, compiling call)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), compile_s


def _error(e: Exception) -> str:
  """The exception and the innermost frames of its traceback, shortened."""
  text = "".join(traceback.format_exception(e))
  return text if len(text) < 3000 else text[:1000] + " ... " + text[-2000:]


def _time_into(row, build):
  """Times the (fn, args) that build() returns into row, or its error."""
  try:
    fn, args = build()
    row["seconds"], row["compile_s"] = _time(fn, args)
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = _error(e)


def _solvers(chunk, interpret):
  return {
      "pallas": lambda *a: pallas.feedback_solve_pallas(
          *a, chunk=chunk, backend="gpu", interpret=interpret),
      "chunked": lambda *a: feedback_chunked.feedback_solve_chunked(
          *a, chunk=chunk),
      "dense": reference.feedback_solve_dense,
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


def check_correctness(b, t, width, chunk, interpret, dtype, impl="pallas"):
  """Relative max errors of `impl` vs dense, values and the four gradients."""
  args = _inputs(b, t, width, dtype, seed=t)
  got = _value_and_grads(_solvers(chunk, interpret)[impl])(*args)
  want = _value_and_grads(reference.feedback_solve_dense)(
      *[x.astype(jnp.float32) for x in args])
  errors = {}
  for name, x, y in zip(NAMES, got, want):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    errors[name] = float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
  return errors


def preflight(b, t, width, heads, chunk, target=None) -> list:
  """Compiles the Pallas solve and a Sessa MixerBlock, as the check will.

  Args:
    b, t, width, heads, chunk: the check's shapes.
    target: compile deviceless for this target name (on a CPU with the
      CUDA compiler) instead of the local GPU.

  Returns:
    One row per case: `case`, `ok`, `compile_s` or `error` (one line).
  """
  from sessa_jax.train import target_compile  # pylint: disable=g-import-not-at-top
  chip = targets.parse(target) if target else targets.local()
  device = sharding = None
  if target:
    target_compile.prepare(chip)
    device = target_compile.devices(chip)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

  def abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  cases = {f"pallas solve {dtype} T={t}": lambda dtype=dtype: (
      _value_and_grads(_solvers(chunk, False)["pallas"]),
      _input_shapes(b, t, width, jnp.dtype(dtype)))
           for dtype in TOLERANCE}
  cases[f"sessa block bfloat16 T={t}"] = lambda: bench.layer_step(
      ModelConfig(mixer="sessa", d_model=width, n_heads=heads, n_layers=1,
                  dtype="bfloat16", feedback_impl="pallas",
                  feedback_chunk=chunk), b, t, abstract=True)
  rows = []
  for case, build in cases.items():
    row = {"case": case, "target": chip.name}
    start = time.perf_counter()
    try:
      with target_compile.compiling(chip, device):
        fn, args = build()
        fn.lower(*jax.tree.map(abstract, args)).compile()
      row["ok"], row["compile_s"] = True, time.perf_counter() - start
    except Exception as e:  # pylint: disable=broad-except
      lines = str(e).strip().splitlines() or [repr(e)]
      row["ok"], row["error"] = False, f"{type(e).__name__}: {lines[0]}"
    print(row, flush=True)
    rows.append(row)
  return rows


def check_remat(b, t, width, heads, feedback_impl) -> dict:
  """Relative max difference of loss and gradients under each `model.remat`
  from `none`, for a 2-block float32 Sessa LM (the solve's custom VJP
  inside `jax.checkpoint`, as in training)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sessa_jax.models import LanguageModel  # pylint: disable=g-import-not-at-top
  from sessa_jax.models.config import REMATS  # pylint: disable=g-import-not-at-top
  tokens = jax.random.randint(jax.random.key(0), (b, t), 0, 256)

  def loss_and_grads(remat):
    cfg = ModelConfig(mixer="sessa", d_model=width, n_heads=heads,
                      n_layers=2, vocab_size=256, remat=remat,
                      feedback_impl=feedback_impl)
    graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)))

    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.jit(jax.value_and_grad(loss))(params)

  base = jax.tree.leaves(loss_and_grads("none"))
  out = {}
  for remat in REMATS[1:]:
    other = jax.tree.leaves(loss_and_grads(remat))
    out[remat] = max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
              / max(float(np.max(np.abs(np.asarray(y)))), 1e-30))
        for x, y in zip(other, base))
  return out


def ratios(result) -> dict:
  """The figures the targets are stated in, from a result's rows."""
  times = {(r["t"], r["impl"], r.get("heads")): r["seconds"]
           for r in result["timings"] if "seconds" in r}
  heads = result["config"]["heads"]
  out = {"pallas_over_cudnn": {}, "sessa_over_attention_tokens": {},
         "pallas_compile_s": {}}
  for r in result["timings"]:
    if r["impl"] == "pallas" and "compile_s" in r:
      out["pallas_compile_s"][r["t"]] = r["compile_s"]
      cudnn = times.get((r["t"], "cudnn_attention", heads))
      if cudnn:
        out["pallas_over_cudnn"][r["t"]] = r["seconds"] / cudnn
  tokens = {(r["t"], r["mixer"], r.get("feedback_impl")): r["tokens_per_s"]
            for r in result["layers"] if "tokens_per_s" in r}
  for (t, mixer, impl), rate in tokens.items():
    attention = tokens.get((t, "attention", None))
    if mixer == "sessa" and impl == "pallas" and attention:
      out["sessa_over_attention_tokens"][t] = rate / attention
  compiles = out["pallas_compile_s"]
  if len(compiles) > 1:
    out["compile_longest_over_shortest"] = (compiles[max(compiles)]
                                            / compiles[min(compiles)])
  return out


def _ms(row):
  if "seconds" in row:
    return f"{row['seconds'] * 1e3:.3g} ms"
  return "error" if "error" in row else row.get("skipped", "")


def markdown(result) -> str:
  """The result as markdown tables."""
  cfg = result["config"]
  lines = [f"# GPU check on {result['device']} (JAX {result['jax']})", "",
           f"`python experiments/gpu_check.py{result['argv']}`; B = "
           f"{cfg['batch']}, K = D = {cfg['width']}, chunk {cfg['chunk']}; "
           f"{result['wall_s']:.0f} s in all.", "",
           "Kernel tiles (rows / Triton pipeline stages): " + "; ".join(
               f"{dtype}: " + ", ".join(f"{k} {t}/{s}" for k, (t, s)
                                         in tilings.items())
               for dtype, tilings in cfg["tile"].items()) + ".", "",
           "## Correctness against the dense float32 oracle", "",
           "Relative max error of the Pallas solve (chunked in brackets).",
           "", "| inputs | T | " + " | ".join(NAMES) + " | ok |",
           "| --- | --- |" + " --- |" * (len(NAMES) + 1)]
  for row in result["correctness"]:
    errors = row.get("rel_max_error", {})
    chunked = row.get("chunked_rel_max_error", {})
    cells = [f"{errors[n]:.1e}" + (f" ({chunked[n]:.1e})" if n in chunked
                                   else "") if n in errors else "error"
             for n in NAMES]
    lines.append(f"| {row['dtype']} | {row['t']} | " + " | ".join(cells)
                 + f" | {row['ok']} |")
  if result.get("preflight"):
    lines += ["", "Compiled first: " + "; ".join(
        f"{r['case']} " + (f"{r['compile_s']:.1f} s" if r["ok"]
                           else f"FAILED ({r['error']})")
        for r in result["preflight"]) + "."]
  if result.get("remat"):
    lines += ["", "`model.remat` vs `none` (2-block float32 Sessa LM, loss and "
              "gradients, relative max difference): " + ", ".join(
                  f"{k} {v:.1e}" if isinstance(v, float) else f"{k}: {v}"
                  for k, v in result["remat"].items())]
  impls = list(dict.fromkeys(
      (r["impl"], r.get("heads")) for r in result["timings"]))
  head = [impl if h is None else f"{impl} {h} x {cfg['width'] // h}"
          for impl, h in impls]
  lines += ["", "## Feedback solve forward+backward, bfloat16", "",
            "| T | " + " | ".join(head) + " | pallas compile |",
            "| --- |" + " --- |" * (len(head) + 1)]
  for t in dict.fromkeys(r["t"] for r in result["timings"]):
    rows = {(r["impl"], r.get("heads")): r for r in result["timings"]
            if r["t"] == t}
    compile_s = rows.get(("pallas", None), {}).get("compile_s")
    lines.append(f"| {t} | " + " | ".join(
        _ms(rows.get(key, {})) for key in impls) + " | "
        + (f"{compile_s:.1f} s" if compile_s else "") + " |")
  lines += ["", "## One MixerBlock forward+backward, bfloat16, tokens/s", "",
            "| T | mixer | tokens/s |", "| --- | --- | --- |"]
  for row in result["layers"]:
    name = row["mixer"] + (f" ({row['feedback_impl']})"
                           if "feedback_impl" in row else "")
    rate = (f"{row['tokens_per_s']:.3g}" if "tokens_per_s" in row
            else _ms(row))
    lines.append(f"| {row['t']} | {name} | {rate} |")
  lines += ["", "## Ratios", "", "```",
            json.dumps(result["ratios"], indent=1), "```", ""]
  return "\n".join(lines)


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("out_dir", str(DEFAULT_OUT_DIR),
                      "where gpu_check.json and gpu_check.md go (results to "
                      "update the committed ones)", flag_values=fv)
  flags.DEFINE_bool("dry_run", False,
                    "tiny shapes on CPU, kernels in interpret mode",
                    flag_values=fv)
  flags.DEFINE_string("lengths", None,
                      "comma-separated T values to time the solve at",
                      flag_values=fv)
  flags.DEFINE_string("layer_lengths", None,
                      "comma-separated T values to time layers at",
                      flag_values=fv)
  flags.DEFINE_float("budget_s", 240.0,
                     "stop starting new timings after this many seconds",
                     flag_values=fv)
  flags.DEFINE_string("target", None,
                      "only compile the check's kernels for this GPU (h200, "
                      "h100, a100) on this CPU, then exit", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse(argv, _define_flags, __doc__.splitlines()[0])

  if args.target:
    from sessa_jax.train import target_compile  # pylint: disable=g-import-not-at-top
    try:
      rows = preflight(2, 1024, 256, 4, None, target=args.target)
    except (target_compile.CompilerMissing, ValueError) as e:
      print(f"gpu_check.py: error: {e}", file=sys.stderr)
      return 1
    print("every case compiles" if all(r["ok"] for r in rows)
          else "a case does not compile")
    return 0 if all(r["ok"] for r in rows) else 1
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.dry_run:
    cli.error("no GPU found; use --dry_run to exercise the script on CPU, "
              "or --target=h200 to compile for one")
  if args.dry_run:
    b, width, heads, chunk = 1, 32, 4, 16
    checks = [(40, "float32"), (37, "float32"), (64, "bfloat16")]
    lengths, layer_lengths = [64, 128], [48]
  else:
    # chunk None: each solve's default (256-row chunks; each Pallas
    # kernel's tile and stages fit the GPU's shared memory: `kernel_tilings`).
    b, width, heads, chunk = 2, 256, 4, None
    checks = [(1024, "float32"), (1500, "float32"), (1024, "bfloat16")]
    lengths = [4096, 16384, 32768]
    layer_lengths = [4096, 16384]
  if args.lengths is not None:
    lengths = [int(x) for x in args.lengths.split(",") if x]
  if args.layer_lengths is not None:
    layer_lengths = [int(x) for x in args.layer_lengths.split(",") if x]
  interpret = not on_gpu
  pallas_chunk = defaults.DEFAULT_CHUNK if chunk is None else chunk
  tiles = {dtype: pallas.kernel_tilings(
      "gpu", pallas_chunk, width, jnp.dtype(dtype), jnp.float32)
           for dtype in TOLERANCE}
  started = time.time()
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  result = {
      "device": str(jax.devices()[0].device_kind),
      "jax": jax.__version__,
      "argv": "".join(" " + a for a in (argv or sys.argv[1:])),
      "dry_run": args.dry_run,
      "config": {"batch": b, "width": width, "heads": heads,
                 "chunk": pallas_chunk, "tile": tiles,
                 "timing_dtype": "bfloat16", "tolerance": TOLERANCE},
      "preflight": [],
      "remat": {},
      "correctness": [],
      "timings": [],
      "layers": [],
  }

  def save():
    result["wall_s"] = time.time() - started
    result["ratios"] = ratios(result)
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1)
                                            + "\n")

  def record(section, row):
    result[section].append(row)
    print(row, flush=True)
    save()

  def over_budget():
    return time.time() - started > args.budget_s

  if on_gpu:
    result["preflight"] = preflight(b, 1024, width, heads, chunk)
    save()
    if not all(r["ok"] for r in result["preflight"]):
      print("a case does not compile for this GPU; see gpu_check.json")
      return 1

  try:
    result["remat"] = check_remat(b, 256 if on_gpu else 32, width, heads,
                                  "pallas" if on_gpu else "chunked")
  except Exception as e:  # pylint: disable=broad-except
    result["remat"] = {"error": _error(e)}
  print("remat vs none, relative max difference:", result["remat"],
        flush=True)
  save()

  for t, dtype in checks:
    row = {"t": t, "dtype": dtype}
    try:
      row["rel_max_error"] = check_correctness(b, t, width, chunk, interpret,
                                               jnp.dtype(dtype))
      row["ok"] = max(row["rel_max_error"].values()) < TOLERANCE[dtype]
      if dtype == "bfloat16":  # What bfloat16 costs the plain-JAX solve.
        row["chunked_rel_max_error"] = check_correctness(
            b, t, width, chunk, interpret, jnp.dtype(dtype), impl="chunked")
    except Exception as e:  # pylint: disable=broad-except
      row["error"], row["ok"] = _error(e), False
    record("correctness", row)

  memory_limit = (jax.devices()[0].memory_stats() or {}).get(
      "bytes_limit", 8 << 30)
  for t in lengths:
    cases = dict(_solvers(chunk, interpret))
    if not on_gpu:
      cases.pop("chunked")  # Covered by the CPU suite; keeps the dry run short.
    for name, solve in cases.items():
      row = {"t": t, "impl": name}
      dense_bytes = 6 * b * t * t * 4
      if over_budget():
        row["skipped"] = "time budget spent"
      elif name == "dense" and on_gpu and dense_bytes > 0.8 * memory_limit:
        row["skipped"] = f"needs ~{dense_bytes / 2**30:.0f} GiB"
      else:
        _time_into(row, lambda: (_value_and_grads(solve),
                                 _inputs(b, t, width, jnp.bfloat16)))
      record("timings", row)
    for n_heads in (heads, 1):
      row = {"t": t, "impl": "cudnn_attention", "heads": n_heads}
      if not on_gpu:
        row["skipped"] = "cuDNN needs a GPU"
      elif over_budget():
        row["skipped"] = "time budget spent"
      else:
        _time_into(row, lambda: _attention(b, t, width, n_heads,
                                           jnp.bfloat16, "cudnn"))
      record("timings", row)

  # Sessa with both feedback solves; every other registered mixer once.
  layer_cases = [("sessa", "pallas"), ("sessa", "chunked"),
                 *((m, "auto") for m in mixers.names() if m != "sessa")]
  for t in layer_lengths:
    for mixer, feedback_impl in layer_cases:
      row = {"t": t, "mixer": mixer}
      if mixer == "sessa":
        row["feedback_impl"] = feedback_impl
      if over_budget():
        row["skipped"] = "time budget spent"
      else:
        _time_into(row, lambda: bench.layer_step(ModelConfig(
            mixer=mixer, d_model=width, n_heads=heads, n_layers=1,
            dtype="bfloat16", feedback_impl=feedback_impl,
            feedback_chunk=chunk), b, t))
        if "seconds" in row:
          row["tokens_per_s"] = b * t / row["seconds"]
      record("layers", row)
  save()
  (out_dir / "gpu_check.md").write_text(markdown(result))
  print("ratios:", json.dumps(result["ratios"], indent=1))
  print(f"wrote {out_dir}/gpu_check.{{json,md}} in "
        f"{time.time() - started:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
