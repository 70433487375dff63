"""CPU benchmark of the feedback solve and of whole layers (`make bench`).

One run measures, each case in its own process so peak memory is its own:

* the machine's float32 matmul rate (a jitted 2048^3 product);
* `chunked` vs `dense` feedback solve, forward and forward+backward, for
  T = 512 ... 16384 (B = 2, K = D = 256): median wall time, peak resident
  memory above the process's baseline, achieved GFLOP/s;
* one MixerBlock per registered mixer (D = 256, 4 heads) forward+backward
  tokens/s and GFLOP/s against the matmul rate;
* decoding (`decode`): a 2-layer LanguageModel per mixer (D = 256, 4 heads),
  ms per generated token (one jitted `decode_step`, cache donated) with the
  cache filled to 1k, 4k and 16k tokens, B = 1 and 8, beside the forward
  pass's tokens/s over the same context (B = 1); cache bytes per token of
  context; and a step at position 64 with cache capacity 512 against 8192
  (equal cost when a step reads only the filled rows).

FLOPs follow docs/design.md#flop-convention (a multiply-add is 2 FLOPs,
causal products count the half they compute; backward = 2x forward). Cases
whose estimated memory does not fit are reported as skipped; a case that
fails (a missing mixer, out of memory) is reported with its error. Prints
tables and writes OUT_DIR/bench_cpu.json (solve, layer) and
OUT_DIR/bench_decode_cpu.json (decode); OUT_DIR defaults to workdirs/bench,
so only an explicit `--out_dir results` updates the committed
results.

Usage: python experiments/bench.py [--quick] [--parts solve,layer,decode]
           [--out_dir DIR]
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time
from typing import Sequence

from absl import flags

from sessa_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = ROOT / "workdirs" / "bench"
PARTS = ("solve", "layer", "decode")
B, D, HEADS = 2, 256, 4
SOLVE_T = (512, 1024, 2048, 4096, 8192, 16384)
LAYER_T = (2048, 4096)
# The official PyTorch Sessa layer on this machine (stated by the project's
# issue 3, not re-measured here): forward+backward tokens/s, B = 2, D = 256.
TORCH_REFERENCE_TOK_S = {2048: 3300.0, 4096: 1600.0}
# The feedback chunk the layers run with: the chunked solve's default, the
# fastest of 128/256/512 at T = 4096 on this machine.
LAYER_FEEDBACK_CHUNK = 256
# Decoding: the model, contexts, batches, steps timed per case, and the
# capacities of the same-position check.
DECODE_LAYERS = 2
DECODE_CONTEXTS = (1024, 4096, 16384)
DECODE_BATCHES = (1, 8)
DECODE_STEPS = 16
CAPACITY_CHECK = {"position": 64, "max_lens": (512, 8192)}
# T x T float32 arrays the dense solve keeps alive (measured: ~3.6 GiB for
# forward+backward at T = 8192).
DENSE_ARRAYS = {"fwd": 2, "fwd_bwd": 7}


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_status_bytes(field: str) -> int | None:
  """A memory field (VmRSS, VmHWM) of /proc/self/status, in bytes."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_peak() -> int | None:
  """Resets the kernel's peak-RSS mark (Linux); returns the current RSS."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return None
  return _proc_status_bytes("VmRSS")


def _time(fn, args, *, min_runs=3, max_runs=11, budget_s=15.0):
  """Times jitted fn(*args): median wall time and memory.

  Runs at least `min_runs` times, then more (up to `max_runs`) while the
  timed runs have taken under `budget_s` seconds, so fast cases get a
  median of many runs on a noisy machine.

  Returns a dict: `seconds` (median after a warm-up call), `compile_s`,
  `runs`, `xla_temp_bytes` (scratch the compiled program allocates) and
  `run_peak_bytes` (peak RSS during the timed runs above the RSS after
  compiling; freed compiler memory the allocator reuses can hide some).
  The peak-RSS mark is reset after compiling, so the caller's getrusage
  peak afterwards covers the timed runs only.
  """
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  fn = fn.lower(*args).compile()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  stats = fn.memory_analysis()
  rss_after_compile = _reset_peak()
  times = []
  while len(times) < max_runs and (len(times) < min_runs
                                   or sum(times) < budget_s):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  times.sort()
  hwm = _proc_status_bytes("VmHWM")
  return {"seconds": times[len(times) // 2], "compile_s": compile_s,
          "runs": len(times),
          "xla_temp_bytes": getattr(stats, "temp_size_in_bytes", None),
          "run_peak_bytes": (hwm - rss_after_compile
                             if hwm and rss_after_compile else None)}


def _child_matmul(spec):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = spec["n"]
  a = jnp.ones((n, n), jnp.float32) * 0.5
  timed = _time(jax.jit(lambda x, y: x @ y), (a, a), min_runs=5)
  return {"gflops": 2 * n ** 3 / timed["seconds"] / 1e9, **timed}


def _child_solve(spec):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sessa_jax.kernels import feedback_solve  # pylint: disable=g-import-not-at-top
  t, impl = spec["t"], spec["impl"]
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, t, D), jnp.float32)
  k = jax.random.normal(keys[1], (B, t, D), jnp.float32)
  gamma = 0.999 * jnp.tanh(jax.random.normal(keys[2], (B, t), jnp.float32))
  f = jax.random.normal(keys[3], (B, t, D), jnp.float32)
  jax.block_until_ready((q, k, gamma, f))
  baseline = _peak_rss_bytes()

  def solve(*a):
    return feedback_solve(*a, impl=impl, chunk=spec.get("chunk"))

  if spec["mode"] == "fwd":
    fn = jax.jit(solve)
  else:
    fn = jax.jit(jax.grad(lambda *a: jnp.sum(solve(*a) ** 2),
                          argnums=(0, 1, 2, 3)))
  timed = _time(fn, (q, k, gamma, f))
  return {**timed, "peak_bytes": _peak_rss_bytes() - baseline}


def _layer_flops(cfg, t):
  """Forward FLOPs per token of one block (budget.flops_per_token)."""
  from sessa_jax import budget  # pylint: disable=g-import-not-at-top
  one = cfg.replace(n_layers=1)
  return budget.flops_per_token(one, t) - 2.0 * cfg.d_model * cfg.vocab_size


def layer_step(cfg, batch, t, abstract=False):
  """A jitted MixerBlock forward+backward for `cfg` and its (params, x).

  The input is random in `cfg.dtype`; the loss is the float32 mean square of
  the block's output; gradients flow to the parameters and the input. With
  `abstract`, (params, x) are shapes only (for a compile).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sessa_jax.models import MixerBlock  # pylint: disable=g-import-not-at-top

  def make():
    return MixerBlock(cfg, rngs=nnx.Rngs(0))

  graphdef, params = nnx.split(nnx.eval_shape(make) if abstract else make())
  x = jax.ShapeDtypeStruct((batch, t, cfg.d_model), jnp.dtype(cfg.dtype))
  if not abstract:
    x = jax.random.normal(jax.random.key(1), x.shape, x.dtype)

  @jax.jit
  def step(params, x):
    def loss(p, x):
      return jnp.mean(nnx.merge(graphdef, p)(x).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1))(params, x)
  return step, (params, x)


def _child_layer(spec):
  import jax  # pylint: disable=g-import-not-at-top
  from sessa_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  t = spec["t"]
  cfg = ModelConfig(mixer=spec["mixer"], d_model=D, n_heads=HEADS,
                    n_layers=1, feedback_impl="auto")
  if spec.get("chunk"):
    cfg = cfg.replace(feedback_chunk=spec["chunk"])
  step, args = layer_step(cfg, B, t)
  jax.block_until_ready(args)
  baseline = _peak_rss_bytes()

  timed = _time(step, args)
  flops = 3 * _layer_flops(cfg, t) * B * t
  return {**timed, "tokens_per_s": B * t / timed["seconds"],
          "gflops": flops / timed["seconds"] / 1e9,
          "peak_bytes": _peak_rss_bytes() - baseline}


def _decode_model(mixer):
  """The decode benchmark's LanguageModel (float32, D = 256, 4 heads)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sessa_jax.models import LanguageModel, ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(mixer=mixer, d_model=D, n_heads=HEADS,
                    n_layers=DECODE_LAYERS, vocab_size=256)
  return LanguageModel(cfg, rngs=nnx.Rngs(0))


def _filled_cache(model, batch, position, max_len):
  """Empty caches of capacity max_len marked as holding `position` tokens.

  A step's cost does not depend on the cached values, only on how many rows
  it reads, so the cache is not prefilled.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def make():
    caches = [block.init_cache(batch, max_len) for block in model.blocks]
    return [dict(c, pos=jnp.asarray(position, jnp.int32)) for c in caches]
  return jax.jit(make)()


def cache_bytes(model, max_len):
  """Bytes of one sequence's decode cache of capacity max_len (all layers)."""
  import jax  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: _filled_cache(model, 1, 0, max_len))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def decode_step_ms(model, batch, position, max_len, steps=DECODE_STEPS):
  """Median ms of one jitted, cache-donating decode step from `position`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c),
                 donate_argnums=2)
  token = jnp.zeros((batch,), jnp.int32)
  cache = _filled_cache(model, batch, position, max_len)
  start = time.perf_counter()
  logits, cache = step(state, token, cache)  # Compiles.
  jax.block_until_ready(logits)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    logits, cache = step(state, token, cache)
    jax.block_until_ready(logits)
    times.append(time.perf_counter() - start)
  return {"ms_per_token": 1e3 * sorted(times)[len(times) // 2],
          "compile_s": compile_s, "steps": steps}


def _child_decode(spec):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = _decode_model(spec["mixer"])
  position, batch = spec["position"], spec["batch"]
  max_len = spec.get("max_len") or position + DECODE_STEPS + 2
  out = decode_step_ms(model, batch, position, max_len)
  if spec.get("forward"):
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, position), jnp.int32)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    timed = _time(forward, (state, tokens), budget_s=10.0)
    out["forward_tokens_per_s"] = position / timed["seconds"]
  return out


CHILDREN = {"matmul": _child_matmul, "solve": _child_solve,
            "layer": _child_layer, "decode": _child_decode}


def _run_child(spec, timeout_s):
  """Runs one case in a fresh process; returns its result dict."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # One real CPU device.
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child",
         json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
  if proc.returncode < 0:
    return {"error": f"killed by signal {-proc.returncode}"}
  return {"error": tail[0][:300]}


def _matmul_rate() -> float | None:
  """The float32 2048^3 matmul rate in GFLOP/s, measured in a fresh process."""
  return _run_child({"kind": "matmul", "n": 2048}, 300).get("gflops")


def _available_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 8 << 30


def _solve_flops(t):
  """Forward FLOPs of one solve: two causal products (logits, A s)."""
  return 2 * (2.0 * B * t * t / 2 * D)


def _mixers() -> tuple[str, ...]:
  """The registered mixers (imported only when a part runs them)."""
  from sessa_jax.models import mixers  # pylint: disable=g-import-not-at-top
  return mixers.names()


def _fmt(x, spec="{:.3f}"):
  return "-" if x is None else spec.format(x)


def run_decode(quick: bool) -> dict:
  """Decode cases (each in its own process), printed as they finish."""
  contexts = [c for c in DECODE_CONTEXTS if not quick or c <= 1024]
  rows = []
  for mixer in _mixers():
    for context in contexts:
      for batch in DECODE_BATCHES:
        row = {"mixer": mixer, "context": context, "batch": batch}
        row.update(_run_child({"kind": "decode", "mixer": mixer,
                               "position": context, "batch": batch,
                               "forward": batch == 1}, 900))
        rows.append(row)
        print(f"  decode {mixer:9s} context {context:5d} B={batch} "
              f"{_fmt(row.get('ms_per_token'), '{:.2f}')} ms/token "
              f"{row.get('error', '')}", flush=True)
  capacity = []
  for mixer in _mixers():
    row = {"mixer": mixer, "position": CAPACITY_CHECK["position"]}
    for max_len in CAPACITY_CHECK["max_lens"]:
      result = _run_child({"kind": "decode", "mixer": mixer, "batch": 1,
                           "position": CAPACITY_CHECK["position"],
                           "max_len": max_len}, 900)
      row[f"ms_at_max_len_{max_len}"] = result.get("ms_per_token")
    small, large = (row[f"ms_at_max_len_{n}"]
                    for n in CAPACITY_CHECK["max_lens"])
    row["ratio"] = large / small if small and large else None
    capacity.append(row)
  bytes_per_token = {}
  import jax  # pylint: disable=g-import-not-at-top
  with jax.default_device(jax.devices("cpu")[0]):
    for mixer in _mixers():
      model = _decode_model(mixer)
      small, large = cache_bytes(model, 1024), cache_bytes(model, 2048)
      bytes_per_token[mixer] = {"per_token": (large - small) / 1024,
                                "fixed": small - (large - small)}

  print(f"\nDecoding, float32, {DECODE_LAYERS}-layer LM, D={D}, {HEADS} "
        "heads: median ms per generated token (one jitted decode_step, cache "
        "donated) with the cache\nfilled to the context; forward = tokens/s "
        "of the full forward over that context (B=1); cache = bytes per "
        "token of context (per sequence)")
  by = {(r["mixer"], r["context"], r["batch"]): r for r in rows}
  header = " ".join(f"{f'{c // 1024}k B={b}':>10}" for c in contexts
                    for b in DECODE_BATCHES)
  fwd_header = f"fwd tok/s {contexts[-1] // 1024}k"
  print(f"{'mixer':>9} {header} | {fwd_header:>12} {'cache B/tok':>11}")
  for mixer in _mixers():
    cells = " ".join(
        f"{_fmt(by[(mixer, c, b)].get('ms_per_token'), '{:.2f}'):>10}"
        for c in contexts for b in DECODE_BATCHES)
    fwd = by[(mixer, contexts[-1], 1)].get("forward_tokens_per_s")
    print(f"{mixer:>9} {cells} | {_fmt(fwd, '{:.0f}'):>12} "
          f"{bytes_per_token[mixer]['per_token']:>11.0f}")
  small_n, large_n = CAPACITY_CHECK["max_lens"]
  print(f"\nSame position ({CAPACITY_CHECK['position']}), B=1: ms per step "
        f"with cache capacity {small_n} vs {large_n}")
  for row in capacity:
    small, large = (_fmt(row[f"ms_at_max_len_{n}"], "{:.2f}")
                    for n in (small_n, large_n))
    print(f"{row['mixer']:>9} {small:>7} {large:>7}  ratio "
          f"{_fmt(row['ratio'], '{:.2f}')}")
  return {"config": {"layers": DECODE_LAYERS, "d_model": D, "heads": HEADS,
                     "dtype": "float32", "steps_timed": DECODE_STEPS,
                     "decode_block": _decode_block()},
          "decode": rows, "capacity_check": capacity,
          "cache_bytes_per_token": bytes_per_token}


def _decode_block() -> int:
  from sessa_jax.kernels import cached_attention  # pylint: disable=g-import-not-at-top
  return cached_attention.DECODE_BLOCK


def _write(out_dir: pathlib.Path, name: str, result: dict) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / name
  path.write_text(json.dumps(result, indent=1) + "\n")
  print(f"\nwrote {path} in {result['wall_s']:.0f} s")


def _machine() -> dict:
  return {"platform": platform.platform(), "cpus": os.cpu_count(),
          "load_avg_at_start": os.getloadavg()}


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("child", None, "a case's JSON spec (a child process)",
                      flag_values=fv)
  flags.DEFINE_string("out_dir", str(DEFAULT_OUT_DIR),
                      "where the JSON files go (default workdirs/bench; "
                      "results updates the committed ones)", flag_values=fv)
  flags.DEFINE_string("parts", ",".join(PARTS),
                      f"comma-separated subset of {', '.join(PARTS)}",
                      flag_values=fv)
  flags.DEFINE_bool("quick", False,
                    "T up to 2048, decode contexts up to 1k (a smoke run)",
                    flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
  args, _ = cli.parse(argv, _define_flags, __doc__.splitlines()[0],
                      hidden=("child",))
  if args.child:
    spec = json.loads(args.child)
    print("RESULT " + json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)
    return
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    cli.error(f"--parts: unknown {', '.join(unknown)}; choose from "
                 f"{', '.join(PARTS)}")
  if "solve" in parts or "layer" in parts:
    started = time.time()
    result = run_solve_and_layer(args.quick, "solve" in parts,
                                 "layer" in parts)
    result["wall_s"] = time.time() - started
    _write(pathlib.Path(args.out_dir), "bench_cpu.json", result)
  if "decode" in parts:
    started = time.time()
    result = {"machine": _machine(), **run_decode(args.quick)}
    result["wall_s"] = time.time() - started
    _write(pathlib.Path(args.out_dir), "bench_decode_cpu.json", result)


def run_solve_and_layer(quick: bool, do_solve: bool, do_layer: bool) -> dict:
  """The feedback-solve and layer cases; prints their tables."""
  solve_ts = [t for t in SOLVE_T if (not quick or t <= 2048) and do_solve]
  layer_ts = [t for t in LAYER_T if (not quick or t <= 2048) and do_layer]
  rate = _matmul_rate()
  print(f"float32 matmul (2048^3, jitted): {_fmt(rate, '{:.1f}')} GFLOP/s")

  solves = []
  for t in solve_ts:
    for impl in ("chunked", "dense"):
      for mode in ("fwd", "fwd_bwd"):
        row = {"t": t, "impl": impl, "mode": mode}
        need = DENSE_ARRAYS[mode] * B * t * t * 4 if impl == "dense" else 0
        if need > 0.5 * _available_bytes():
          row["skipped"] = (f"needs ~{need / 2**30:.0f} GiB for T x T arrays, "
                            f"{_available_bytes() / 2**30:.0f} GiB available")
        else:
          row.update(_run_child({"kind": "solve", "t": t, "impl": impl,
                                 "mode": mode}, 900))
        if "seconds" in row:
          flops = _solve_flops(t) * (1 if mode == "fwd" else 3)
          row["gflops"] = flops / row["seconds"] / 1e9
        solves.append(row)
        mib = row.get("peak_bytes") and row["peak_bytes"] / 2**20
        print(f"  solve T={t:5d} {impl:7s} {mode:7s} "
              f"{_fmt(row.get('seconds'))} s  {_fmt(mib, '{:.0f}')} MiB "
              f"{row.get('skipped', row.get('error', ''))}", flush=True)

  layers = []
  before = rate
  for t in layer_ts:
    for mixer in _mixers():
      row = {"t": t, "mixer": mixer}
      row.update(_run_child({"kind": "layer", "t": t, "mixer": mixer,
                             "chunk": LAYER_FEEDBACK_CHUNK}, 900))
      # The machine's speed drifts (other tenants): hold each layer against
      # the matmul rate measured right before and right after it.
      after = _matmul_rate()
      local = [r for r in (before, after) if r]
      row["matmul_gflops"] = sum(local) / len(local) if local else None
      before = after
      if row["matmul_gflops"] and "gflops" in row:
        row["fraction_of_matmul_rate"] = row["gflops"] / row["matmul_gflops"]
        # The tokens/s if every §7 FLOP ran at the measured matmul rate.
        row["matmul_bound_tokens_per_s"] = (
            row["tokens_per_s"] / row["fraction_of_matmul_rate"])
        ref = TORCH_REFERENCE_TOK_S.get(t) if mixer == "sessa" else None
        if ref:
          row["fraction_of_matmul_rate_for_3x_torch"] = (
              3 * ref / row["matmul_bound_tokens_per_s"])
      layers.append(row)
      print(f"  layer T={t:5d} {mixer:9s} "
            f"{_fmt(row.get('tokens_per_s'), '{:.0f}')} tok/s "
            f"{row.get('error', '')}", flush=True)

  if solves:
    by = {(r["t"], r["impl"], r["mode"]): r for r in solves}
    print("\nFeedback solve, float32, B=2, K=D=256: median seconds; memory = "
          "peak RSS in MiB during the timed\nruns above the RSS before "
          "compiling (XLA's scratch for the compiled program in brackets);\n"
          "ratio = chunked/dense")
    print(f"{'T':>6} | {'fwd chunked':>11} {'dense':>8} {'ratio':>6} | "
          f"{'f+b chunked':>11} {'dense':>8} {'ratio':>6} | "
          f"{'MiB chunked':>12} {'dense':>12} {'ratio':>6} | {'GFLOP/s':>7}")
    for t in solve_ts:
      cells = []
      for mode in ("fwd", "fwd_bwd"):
        c, d = by[(t, "chunked", mode)], by[(t, "dense", mode)]
        cs, ds = c.get("seconds"), d.get("seconds")
        cells += [_fmt(cs), _fmt(ds), _fmt(cs / ds if cs and ds else None,
                                            "{:.2f}")]
      c, d = by[(t, "chunked", "fwd_bwd")], by[(t, "dense", "fwd_bwd")]
      cm, dm = c.get("peak_bytes"), d.get("peak_bytes")

      def mib(r):
        return (f"{r['peak_bytes'] / 2**20:.0f}"
                f"({r['xla_temp_bytes'] / 2**20:.0f})"
                if r.get("peak_bytes") else "-")

      cells += [mib(c), mib(d), _fmt(cm / dm if cm and dm else None, "{:.2f}"),
                _fmt(c.get("gflops"), "{:.1f}")]
      print(f"{t:>6} | {cells[0]:>11} {cells[1]:>8} {cells[2]:>6} | "
            f"{cells[3]:>11} {cells[4]:>8} {cells[5]:>6} | "
            f"{cells[6]:>12} {cells[7]:>12} {cells[8]:>6} | {cells[9]:>7}")

  if layers:
    print("\nOne MixerBlock forward+backward, float32, B=2, D=256, 4 heads. "
          "matmul = the 2048^3 rate measured\njust before and after each "
          "case (mean); bound = tokens/s with every §7 FLOP at that rate;\n"
          "3x torch = the share of it that 3x the stated PyTorch tokens/s "
          "needs")
    print(f"{'T':>6} {'mixer':>9} {'tok/s':>8} {'GFLOP/s':>8} {'matmul':>7} "
          f"{'share':>6} {'bound':>7} {'MiB':>6} {'vs torch (stated)':>18} "
          f"{'3x torch':>9}")
    for r in layers:
      ref = TORCH_REFERENCE_TOK_S.get(r["t"]) if r["mixer"] == "sessa" else None
      tok, bound = r.get("tokens_per_s"), r.get("matmul_bound_tokens_per_s")
      peak_mib = r.get("peak_bytes") and r["peak_bytes"] / 2**20
      third = r.get("fraction_of_matmul_rate_for_3x_torch")
      print(f"{r['t']:>6} {r['mixer']:>9} {_fmt(tok, '{:.0f}'):>8} "
            f"{_fmt(r.get('gflops'), '{:.1f}'):>8} "
            f"{_fmt(r.get('matmul_gflops'), '{:.0f}'):>7} "
            f"{_fmt(r.get('fraction_of_matmul_rate'), '{:.0%}'):>6} "
            f"{_fmt(bound, '{:.0f}'):>7} "
            f"{_fmt(peak_mib, '{:.0f}'):>6} "
            f"{_fmt(tok / ref if tok and ref else None, '{:.2f}x'):>18} "
            f"{_fmt(third, '{:.0%}'):>9}"
            f"  {r.get('error', '')}")

  return {
      "machine": _machine(),
      "config": {"batch": B, "d_model": D, "feedback_dim": D, "heads": HEADS,
                 "dtype": "float32", "solve_chunk": "default (256)",
                 "layer_feedback_chunk": LAYER_FEEDBACK_CHUNK},
      "matmul_gflops": rate,
      "flop_convention": "docs/design.md#flop-convention: multiply-add = "
                         "2 FLOPs, causal products count half; backward = 2x "
                         "forward",
      "solve": solves,
      "layer": layers,
      "torch_reference_tokens_per_s": {
          "note": "official PyTorch Sessa layer fwd+bwd on this machine as "
                  "stated in issue 3 (baseline, not measured by this script)",
          **{str(t): v for t, v in TORCH_REFERENCE_TOK_S.items()}},
  }


if __name__ == "__main__":
  main()
