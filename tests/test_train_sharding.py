"""The jitted train step on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sessa_jax import data as data_lib
from sessa_jax.train import config as config_lib
from sessa_jax.train import sharding as sharding_lib
from sessa_jax.train import trainer
from test_train_loop import tiny_config


def _two_steps(mesh_cfg, devices, **train):
  """Losses and final state of two steps of the tiny Sessa model on a mesh."""
  exp = config_lib.validate(tiny_config(**train))
  task = data_lib.get_task(exp.data)
  mesh = sharding_lib.make_mesh(mesh_cfg, devices)
  layout = trainer.create_layout(exp.model_config(task.vocab_size), exp.train, mesh)
  step = trainer.make_train_step(layout, exp.train, mesh)
  batches = data_lib.make_iterator(task, "train", batch_size=8, seed=0)
  state, losses = layout.init(), []
  for _ in range(2):
    state, metrics = step(state, sharding_lib.global_batch(next(batches), mesh))
    losses.append(float(metrics["loss"]))
  return state, losses


def _assert_close(tree_a, tree_b, atol):
  """Adam divides by sqrt(v): summation-order noise in tiny gradients moves
  parameters by up to ~1e-2 of the learning rate (1e-2), hence atol 1e-4."""
  for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_step_matches_one_device_and_shards_by_the_rules():
  state_1, losses_1 = _two_steps(config_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
  state_8, losses_8 = _two_steps(config_lib.MeshConfig(2, 2, 2), jax.devices()[:8])
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  _assert_close(state_8["params"], state_1["params"], atol=1e-4)

  params = state_8["params"]
  block = params["blocks"][0]
  expected = {
      "embedding (vocab, embed)": (params["embedding"], P("tensor", "fsdp")),
      "in_proj (embed, hidden)": (block["in_proj"]["kernel"], P("fsdp", "tensor")),
      "out_proj (hidden, embed)": (block["out_proj"]["kernel"], P("tensor", "fsdp")),
      "in_proj bias (hidden,)": (block["in_proj"]["bias"], P("tensor")),
      "norm scale (embed,)": (block["norm"]["scale"], P("fsdp")),
      "gamma_bias ()": (block["mixer"]["gamma_bias"], P()),
  }
  for name, (array, spec) in expected.items():
    assert array.sharding.spec == spec, name
  # A (16, 16) embedding split 2 x 2 holds an (8, 8) block on each device.
  assert {s.data.shape for s in params["embedding"].addressable_shards} == {(8, 8)}
  # Adam moments follow their parameters; the step counter is replicated.
  mu = state_8["opt_state"][1][0].mu
  assert mu["embedding"].sharding.spec == P("tensor", "fsdp")
  assert state_8["step"].sharding.spec == P()


def test_gradient_accumulation_matches_the_full_batch():
  devices = jax.devices()[:1]
  state_full, losses_full = _two_steps(config_lib.MeshConfig(1, 1, 1), devices)
  state_acc, losses_acc = _two_steps(config_lib.MeshConfig(1, 1, 1), devices,
                                     grad_accum=4)
  np.testing.assert_allclose(losses_acc, losses_full, rtol=1e-5)
  _assert_close(state_acc["params"], state_full["params"], atol=1e-4)


def test_bfloat16_compute_keeps_float32_parameters():
  devices = jax.devices()[:1]
  _, losses_f32 = _two_steps(config_lib.MeshConfig(1, 1, 1), devices)
  state, losses_bf16 = _two_steps(config_lib.MeshConfig(1, 1, 1), devices,
                                  dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(state["opt_state"])
          if x.ndim} == {np.dtype("float32")}
  np.testing.assert_allclose(losses_bf16, losses_f32, rtol=3e-2)
