r"""Compiles the accelerator paths for GPUs and TPU slices, on this CPU.

`make test-targets` runs it in the two compiler environments and merges:

  .venv-cuda/bin/python experiments/compile_targets.py --targets=h200,a100 \
      --out=workdirs/targets/gpu.json
  .venv-tpu/bin/python experiments/compile_targets.py \
      --targets=v5e:2x2,v6e:2x2 --out=workdirs/targets/tpu.json
  python experiments/compile_targets.py --merge workdirs/targets/gpu.json \
      workdirs/targets/tpu.json --out_dir results

Per target, each a deviceless compile with the target's own compiler
(`sessa_jax.train.target_compile`):
* the feedback solve forward+backward (B = 2, K = D = 256), float32 and
  bfloat16, T = 1024, 1500, 4096, 32768;
* GPU: the solve at K = D = 128, 384, 512 too, and each Triton kernel's
  shared memory (bytes requested, read from a compile against the same
  chip with no shared memory, against the chip's limit);
* one MixerBlock forward+backward per mixer and a two-block hybrid
  (bfloat16, T = 4096, D = 256);
* the train step of a 6-layer bfloat16 Sessa LM at T = 4096 (the `base`
  size, MQAR, batch 8) on one chip with `model.remat=block`, and on four
  chips (h200x4, a100x4, the 2x2 TPU slices) with fsdp = 2, tensor = 2;
* a negative control that must fail: on GPU a tile too large for shared
  memory, on TPU a 4096 x 4096 float32 block (too large for VMEM), so
  that a green table shows the compiler ran.
Writes `targets.json` (target x case: ok, compile seconds, peak bytes per
device, shared memory) and `targets.md`; exits 1 on any failure.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import re
import sys
import time
import traceback
from typing import Sequence

from absl import flags

from sessa_jax import cli
from sessa_jax import targets

ROOT = pathlib.Path(__file__).resolve().parents[1]
B, WIDTH, HEADS = 2, 256, 4
SOLVE_LENGTHS = (1024, 1500, 4096, 32768)
GPU_WIDTHS = (128, 384, 512)
LAYER_T = 4096
TRAIN_CONFIG = "configs/mqar.py:sessa,base"
TRAIN_OVERRIDES = {"data.seq_len": 4096, "train.batch_size": 8,
                   "train.dtype": "bfloat16", "model.feedback_impl": "auto"}
# One chip: blocks rematerialised (on a v5e, 16 GiB, the step's XLA
# attention scores need 27.8 GiB without); four chips: fsdp x tensor.
ONE_CHIP = {"model.remat": "block"}
SHARDED = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}


def _sharding(device):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.sharding.SingleDeviceSharding(device)


def _abstract(tree, device):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=_sharding(device)), tree)


def solve_step(t, width, dtype, device, **kwargs):
  """The Pallas feedback solve's forward+backward, abstract inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sessa_jax.kernels.feedback import pallas  # pylint: disable=g-import-not-at-top

  def loss(q, k, gamma, f):
    s = pallas.feedback_solve_pallas(q, k, gamma, f, **kwargs)
    return jnp.sum(s.astype(jnp.float32))
  shapes = [(B, t, width), (B, t, width), (B, t), (B, t, width)]
  args = [jax.ShapeDtypeStruct(s, jnp.dtype(dtype)) for s in shapes]
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), _abstract(args,
                                                                  device)


def block_step(mixer, device):
  """One MixerBlock (or a 2-block hybrid LM's blocks) forward+backward."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sessa_jax.models import MixerBlock, ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(mixer=mixer, d_model=WIDTH, n_heads=HEADS,
                    n_layers=len(mixer.split(",")), dtype="bfloat16")
  blocks = [MixerBlock(cfg.layer(i), rngs=nnx.Rngs(0))
            for i in range(cfg.n_layers)]
  graphdef, params = nnx.split(nnx.List(blocks))

  def loss(p, x):
    for block in nnx.merge(graphdef, p):
      x = block(x)
    return jnp.mean(x.astype(jnp.float32) ** 2)
  params = jax.eval_shape(lambda: params)
  x = jax.ShapeDtypeStruct((B, LAYER_T, WIDTH), jnp.bfloat16)
  return (jax.jit(jax.grad(loss, argnums=(0, 1))),
          _abstract((params, x), device))


def vmem_control(device):
  """A TPU kernel whose 4096 x 4096 float32 blocks cannot fit VMEM."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0
  call = targets.traced("vmem_control (tpu)", pl.pallas_call(
      kernel, grid=(1,),
      in_specs=[pl.BlockSpec((4096, 4096), lambda i: (0, 0))],
      out_specs=pl.BlockSpec((4096, 4096), lambda i: (0, 0)),
      out_shape=jax.ShapeDtypeStruct((4096, 4096), jnp.float32)))
  return jax.jit(call), _abstract(
      [jax.ShapeDtypeStruct((4096, 4096), jnp.float32)], device)


def kernel_smem(device_probe):
  """Shared memory each kernel traced for the active target asks for, by
  compiling it alone for the same chip with no shared memory to give."""
  from sessa_jax.train import target_compile  # pylint: disable=g-import-not-at-top
  out = {}
  for name, error in target_compile.compile_traced_kernels(device_probe):
    if error is None:
      out[name] = 0
      continue
    found = re.search(r"requested (\d+)", str(error))
    out[name] = int(found.group(1)) if found else str(error).splitlines()[0]
  return out


def _compile_case(target, build, device, smem_probe=None):
  from sessa_jax.train import compiled as compiled_lib  # pylint: disable=g-import-not-at-top
  from sessa_jax.train import target_compile  # pylint: disable=g-import-not-at-top
  row = {}
  start = time.time()
  with target_compile.compiling(target, device):
    fn, args = build()
    compiled = fn.lower(*args).compile()
    row["compile_s"] = time.time() - start
    row["peak_bytes"] = compiled_lib.analyze(compiled)["peak_bytes"]
    if smem_probe is not None:
      row["smem"] = kernel_smem(smem_probe)
  return row


def _train_case(target_name, sharded):
  from sessa_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sessa_jax.train import trainer  # pylint: disable=g-import-not-at-top
  overrides = dict(TRAIN_OVERRIDES, **(SHARDED if sharded else ONE_CHIP))
  config = config_lib.apply_overrides(config_lib.load_config(TRAIN_CONFIG),
                                      overrides)
  info = trainer.dry_run(config, None, overrides=overrides,
                         target=target_name)
  return {"compile_s": info["compile_s"],
          "peak_bytes": info["compiled"]["peak_bytes"],
          "fits": info["fits"]}


def run_target(name):
  """Every case of one target: {case: row}."""
  from sessa_jax.train import target_compile  # pylint: disable=g-import-not-at-top
  target = targets.parse(name)
  target_compile.prepare(target)
  device = target_compile.devices(target)[0]
  probe = None
  if target.platform == "gpu":
    spec = targets.GPUS[target.name]
    probe_spec = dataclasses.replace(spec, smem_per_block_optin=1)
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    probe = topologies.get_topology_desc(
        platform="cuda", topology="1x1x1",
        target_config=target_compile.gpu_target_config(probe_spec)).devices[0]
  cases = {}
  for dtype in ("float32", "bfloat16"):
    for t in SOLVE_LENGTHS:
      cases[f"solve {dtype} T={t}"] = (
          lambda t=t, dtype=dtype: solve_step(t, WIDTH, dtype, device),
          probe if t == 1024 else None)
    if target.platform == "gpu":
      for width in GPU_WIDTHS:
        cases[f"solve {dtype} T=1024 K=D={width}"] = (
            lambda w=width, dtype=dtype: solve_step(1024, w, dtype, device),
            probe)
  from sessa_jax.models import mixers  # pylint: disable=g-import-not-at-top
  for mixer in (*mixers.names(), "sessa,attention"):
    cases[f"block {mixer} bf16 T={LAYER_T}"] = (
        lambda mixer=mixer: block_step(mixer, device), None)
  results = {}
  for case, (build, smem_probe) in cases.items():
    results[case] = _run(lambda: _compile_case(target, build, device,
                                               smem_probe))
  multi = (f"{target.name}x4" if target.platform == "gpu"
           else target.name)
  one_chip = (target.name if target.platform == "gpu"
              else f"{target.name.split(':')[0]}:1x1")
  results[f"train 6-layer bf16 T=4096, {one_chip} remat=block"] = _run(
      lambda: _train_case(one_chip, False))
  results[f"train 6-layer bf16 T=4096, {multi} fsdp=2 tensor=2"] = _run(
      lambda: _train_case(multi, True))

  def control():
    if target.platform == "gpu":
      return solve_step(1024, WIDTH, "float32", device, tile=128)
    return vmem_control(device)

  row = _run(lambda: _compile_case(target, control, device))
  row["expected"] = "failure"
  row["ok"] = "error" in row and ("shared memory" in row["error"]
                                  or "VMEM" in row["error"])
  results["negative control (must fail)"] = row
  return {"target": target.name, "platform": target.platform,
          "smem_limit": target.smem_bytes, "memory_bytes":
          target.memory_bytes, "cases": results}


def _run(fn):
  try:
    row = fn()
    row.setdefault("ok", row.get("fits") is not False)
  except Exception as e:  # pylint: disable=broad-except
    lines = str(e).strip().splitlines() or [repr(e)]
    row = {"ok": False, "error": f"{type(e).__name__}: {lines[0][:500]}",
           "traceback": traceback.format_exc()[-2000:]}
  print({k: v for k, v in row.items() if k != "traceback"}, flush=True)
  return row


def _mib(n):
  return "" if n is None else f"{n / 2**20:,.1f}"


def markdown(result) -> str:
  """targets.md: one table per target, then the GPU kernels' shared
  memory."""
  lines = ["# Deviceless compiles for GPU and TPU targets", "",
           f"`make test-targets` on {result['machine']}, JAX "
           f"{result['jax']}; {result['wall_s']:.0f} s in all. Each row is "
           "a compile by the target's own compiler on this CPU (nothing "
           "ran); peak is XLA's memory per device (arguments + outputs + "
           "temporaries - aliased).", ""]
  for entry in result["targets"]:
    lines += [f"## {entry['target']}", "",
              "| case | ok | compile s | peak MiB/device | note |",
              "| --- | --- | --- | --- | --- |"]
    for case, row in entry["cases"].items():
      note = row.get("error", "")[:160].replace("|", "/")
      lines.append(f"| {case} | {'yes' if row['ok'] else 'NO'} | "
                   f"{row.get('compile_s', 0):.1f} | "
                   f"{_mib(row.get('peak_bytes'))} | {note} |")
    lines.append("")
  gpu = [e for e in result["targets"] if e["platform"] == "gpu"]
  if gpu:
    lines += ["## Shared memory per GPU kernel (bytes requested / limit)",
              ""]
    for entry in gpu:
      lines += [f"{entry['target']} (limit {entry['smem_limit']:,}):", "",
                "| case | kernel (tile rows, stages) | requested |",
                "| --- | --- | --- |"]
      for case, row in entry["cases"].items():
        for kernel, need in sorted(row.get("smem", {}).items()):
          lines.append(f"| {case} | {kernel} | {need:,} |"
                       if isinstance(need, int) else
                       f"| {case} | {kernel} | {need} |")
      lines.append("")
  return "\n".join(lines)


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("targets", "", "comma-separated targets to compile for",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "JSON file of this environment's targets",
                      flag_values=fv)
  flags.DEFINE_bool("merge", False,
                    "merge the JSON files FILE ... into --out_dir's tables",
                    flag_values=fv)
  flags.DEFINE_string("out_dir", str(ROOT / "workdirs" / "targets"),
                      "where --merge writes targets.json and targets.md",
                      flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  args, files = cli.parse(argv, _define_flags, __doc__.splitlines()[0],
                          positional="[FILE ...]")
  if files and not args.merge:
    cli.error(f"{' '.join(files)}: files are read only with --merge")
  started = time.time()
  if args.merge:
    entries = []
    for path in files:
      part = json.loads(pathlib.Path(path).read_text())
      entries += part["targets"]
    import jax  # pylint: disable=g-import-not-at-top
    result = {"machine": f"{platform.machine()} CPU", "jax": jax.__version__,
              "wall_s": sum(json.loads(pathlib.Path(p).read_text())["wall_s"]
                            for p in files),
              "targets": entries}
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "targets.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "targets.md").write_text(markdown(result))
    failed = [f"{e['target']}: {case}" for e in entries
              for case, row in e["cases"].items() if not row["ok"]]
    print(f"wrote {out_dir}/targets.{{json,md}}; "
          + (f"{len(failed)} failed: {'; '.join(failed)}" if failed
             else "every case ok"))
    return 1 if failed else 0
  entries = [run_target(name) for name in args.targets.split(",") if name]
  out = pathlib.Path(args.out or f"workdirs/targets/{args.targets}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"wall_s": time.time() - started,
                             "targets": entries}, indent=1) + "\n")
  return 1 if any(not row["ok"] for e in entries
                  for row in e["cases"].values()) else 0


if __name__ == "__main__":
  sys.exit(main())
