"""The jitted train step on a (data=2, fsdp=2, tensor=2) mesh of 8 CPUs."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sessa_jax import data as data_lib
from sessa_jax.train import config as config_lib
from sessa_jax.train import sharding as sharding_lib
from sessa_jax.train import trainer
from test_train_loop import tiny_config


def _steps(mesh_cfg, devices, **train):
  """Metrics and final state of three tiny Sessa model steps on a mesh."""
  exp = config_lib.validate(tiny_config(**train))
  task = data_lib.get_task(exp.data)
  mesh = sharding_lib.make_mesh(mesh_cfg, devices)
  state_spec = trainer.make_state_spec(exp.model_config(task.vocab_size),
                                       exp.train, mesh)
  step = trainer.make_train_step(state_spec, exp.train, mesh)
  batches = data_lib.make_iterator(task, "train", batch_size=8, seed=0)
  state, history = state_spec.init(), []
  for _ in range(3):
    state, metrics = step(state, sharding_lib.global_batch(next(batches), mesh))
    history.append([float(metrics["loss"]), float(metrics["grad_norm"])])
  return state, np.array(history)


def _assert_same_run(run_a, run_b):
  """Same losses and gradient norms (steps 2 and 3 see the updated params).

  Parameters are compared loosely: Adam divides by sqrt(v), so summation-order
  noise in near-zero gradients can move single entries by a good part of the
  learning rate (1e-2) while the losses agree to 1e-5.
  """
  (state_a, history_a), (state_b, history_b) = run_a, run_b
  np.testing.assert_allclose(history_a, history_b, rtol=1e-5)
  _assert_close(state_a["params"], state_b["params"], atol=2e-3)


def _assert_close(tree_a, tree_b, atol):
  for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_step_matches_one_device_and_shards_by_the_rules():
  one = _steps(config_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
  eight = _steps(config_lib.MeshConfig(2, 2, 2), jax.devices()[:8])
  _assert_same_run(eight, one)
  state_8 = eight[0]

  params = state_8["params"]
  block = params["blocks"][0]
  expected = {
      "embedding (vocab, embed)": (params["embedding"], P("tensor", "fsdp")),
      "in_proj (embed, hidden)": (block["in_proj"]["kernel"],
                                  P("fsdp", "tensor")),
      "out_proj (hidden, embed)": (block["out_proj"]["kernel"],
                                   P("tensor", "fsdp")),
      "in_proj bias (hidden,)": (block["in_proj"]["bias"], P("tensor")),
      "norm scale (embed,)": (block["norm"]["scale"], P("fsdp")),
      "gamma_bias ()": (block["mixer"]["gamma_bias"], P()),
  }
  for name, (array, spec) in expected.items():
    assert array.sharding.spec == spec, name
  # A (16, 16) embedding split 2 x 2 holds an (8, 8) block on each device.
  assert {s.data.shape
          for s in params["embedding"].addressable_shards} == {(8, 8)}
  # Adam moments follow their parameters; the step counter is replicated.
  mu = state_8["opt_state"][1][0].mu
  assert mu["embedding"].sharding.spec == P("tensor", "fsdp")
  assert state_8["step"].sharding.spec == P()


def test_gradient_accumulation_matches_the_full_batch():
  devices = jax.devices()[:1]
  full = _steps(config_lib.MeshConfig(1, 1, 1), devices)
  accumulated = _steps(config_lib.MeshConfig(1, 1, 1), devices, grad_accum=4)
  _assert_same_run(accumulated, full)


def test_bfloat16_compute_keeps_float32_parameters():
  devices = jax.devices()[:1]
  _, history_f32 = _steps(config_lib.MeshConfig(1, 1, 1), devices)
  state, history_bf16 = _steps(config_lib.MeshConfig(1, 1, 1), devices,
                               dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {
      np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(state["opt_state"])
          if x.ndim} == {np.dtype("float32")}
  np.testing.assert_allclose(history_bf16[:, 0], history_f32[:, 0], rtol=3e-2)
