"""Activation layouts on 8 CPU devices: XLA keeps them, losses match one device.

Run as a script, this file compiles and runs train steps for each mixer on
each mesh, printing a `CASE` line to stderr before every compilation and the
losses as JSON lines to stdout. The tests run it in a subprocess (XLA's SPMD
partitioner reports a replication fallback only on the process's stderr, and
only when it compiles, so no compilation cache is used) and attribute every
"Involuntary full rematerialization" warning to the case that printed it.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sessa_jax import data as data_lib
from sessa_jax.models import partitioning
from sessa_jax.train import config as config_lib
from sessa_jax.train import sharding as sharding_lib
from sessa_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
WARNING = "Involuntary full rematerialization"
MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2))
MIXERS = ("sessa/gated", "attention/prenorm_mlp", "mamba2/prenorm_mlp",
          "mamba2/gated")
CONTROL = "control"  # A layout change XLA cannot do well: must warn.


def _run_cases(mixers, meshes) -> tuple[dict[str, list[float]], dict[str, str]]:
  """Runs this file as a script; returns (losses, stderr) by case name."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0",
             PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
  spec = json.dumps({"mixers": mixers, "meshes": meshes})
  proc = subprocess.run([sys.executable, __file__, spec], env=env,
                        capture_output=True, text=True, timeout=1200,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  losses = dict(json.loads(line).popitem() for line in proc.stdout.splitlines()
                if line.startswith("{"))
  logs, case = {}, None
  for line in proc.stderr.splitlines():
    if line.startswith("CASE "):
      case = line.split()[1]
      logs[case] = ""
    elif case is not None:
      logs[case] += line + "\n"
  return losses, logs


def _check(mixers, meshes):
  losses, logs = _run_cases(mixers, meshes)
  assert WARNING in logs[CONTROL], "the warning is not being captured"
  for mixer in mixers:
    one = losses[f"{mixer}@1x1x1"]
    assert len(set(one)) == len(one)  # The steps change the model.
    for shape in meshes:
      case = f"{mixer}@{'x'.join(map(str, shape))}"
      assert WARNING not in logs[case], f"{case}:\n{logs[case]}"
      assert losses[case] == pytest.approx(one, rel=1e-5), case


def test_constraints_apply_only_under_a_mesh():
  def embed(x_bd):
    return partitioning.constrain(x_bd, "batch", "embed")

  x = jnp.ones((8, 4))
  assert "sharding_constraint" not in jax.jit(embed).lower(x).as_text()
  mesh = sharding_lib.make_mesh(config_lib.MeshConfig(2, 2, 2),
                                jax.devices()[:8])
  hlo = jax.jit(sharding_lib.with_abstract_mesh(embed, mesh)).lower(x).as_text()
  assert 'sharding_constraint %arg0 <@mesh, [{"data", "fsdp"}, {}]>' in hlo


def test_no_replication_fallback_for_sessa_on_a_3d_mesh():
  _check(["sessa/gated"], [(2, 2, 2)])


@pytest.mark.slow
def test_no_replication_fallback_for_any_mixer_on_any_mesh():
  _check(list(MIXERS), [list(m) for m in MESHES])


def _main(spec):
  """Script body: the control case, then each mixer on one device and meshes."""

  def announce(case):
    print(f"CASE {case}", file=sys.stderr, flush=True)

  # Control: rows of a (tensor, fsdp)-split table gathered into a
  # batch-split result, the layout change the embedding lookup used to make.
  mesh = sharding_lib.make_mesh(config_lib.MeshConfig(2, 2, 2))
  rows = sharding_lib.batch_sharding(mesh)
  table = jax.device_put(jnp.ones((16, 32)),
                         NamedSharding(mesh, P("tensor", "fsdp")))
  tokens = jax.device_put(jnp.zeros((8, 16), jnp.int32), rows)
  announce(CONTROL)
  lookup = lambda w, t: jax.lax.with_sharding_constraint(
      jnp.take(w, t, axis=0), rows)
  jax.jit(lookup).lower(table, tokens).compile()

  for name in spec["mixers"]:
    mixer, block = name.split("/")
    exp = config_lib.validate(config_lib.base_config(
        model=dict(mixer=mixer, block=block, d_model=32, n_layers=1,
                   n_heads=4, ssm_head_dim=8, ssm_state=8, ssm_chunk=8),
        data=dict(task="mqar", seq_len=16, vocab_size=16, num_kv_pairs=2,
                  num_train=64, num_val=16, num_test=16),
        train=dict(steps=3, batch_size=8, lr=1e-2, warmup_steps=1)))
    task = data_lib.get_task(exp.data)
    train_iter = data_lib.make_iterator(task, "train", batch_size=8, seed=0)
    batches = [next(train_iter) for _ in range(3)]
    for shape in [(1, 1, 1), *map(tuple, spec["meshes"])]:
      case = f"{name}@{'x'.join(map(str, shape))}"
      devices = jax.devices()[:shape[0] * shape[1] * shape[2]]
      mesh = sharding_lib.make_mesh(config_lib.MeshConfig(*shape), devices)
      state_spec = trainer.make_state_spec(exp.model_config(task.vocab_size),
                                     exp.train, mesh)
      step = trainer.make_train_step(state_spec, exp.train, mesh)
      state, losses = state_spec.init(), []
      announce(case)
      for batch in batches:
        state, metrics = step(state, sharding_lib.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
      print(json.dumps({case: losses}), flush=True)


if __name__ == "__main__":
  _main(json.loads(sys.argv[1]))
