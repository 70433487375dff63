"""model.remat: rematerialised blocks give the loss and gradients of none."""

import jax
import numpy as np
import pytest
from flax import nnx

from sessa_jax import data as data_lib
from sessa_jax.kernels.feedback import pallas as feedback_pallas
from sessa_jax.models import LanguageModel, ModelConfig
from sessa_jax.models.config import REMATS
from sessa_jax.train import config as config_lib
from sessa_jax.train import evaluate
from sessa_jax.train import sharding as sharding_lib
from sessa_jax.train import trainer
from sessa_jax.train import workdir_files
from test_train_loop import tiny_config

MIXERS = ("sessa", "attention", "mamba2", "sessa,attention")
B, T, V = 2, 32, 64


def _cfg(mixer, remat):
  return ModelConfig(mixer=mixer, remat=remat, d_model=32, n_layers=2,
                     n_heads=2, vocab_size=V, ssm_head_dim=16, ssm_state=8,
                     ssm_chunk=8)


def _batch():
  tokens = np.random.default_rng(0).integers(0, V, (B, T + 1), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((B, T), np.float32)}


def _loss_and_grad(cfg):
  """The mean token loss of a fresh model on `_batch()` and its gradient."""
  graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)))

  def loss(params, batch):
    logits_btv = nnx.merge(graphdef, params)(batch["inputs"])
    return evaluate.token_stats(logits_btv, batch)["loss_sum"] / (B * T)

  return jax.value_and_grad(loss), params


@pytest.mark.parametrize("mixer", MIXERS)
def test_remat_keeps_loss_and_gradients(mixer):
  batch = _batch()
  fn, params = _loss_and_grad(_cfg(mixer, "none"))
  loss, grads = jax.jit(fn)(params, batch)
  for remat in REMATS[1:]:
    fn, remat_params = _loss_and_grad(_cfg(mixer, remat))
    remat_loss, remat_grads = jax.jit(fn)(remat_params, batch)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-5, err_msg=remat)
    for (path, g), r in zip(jax.tree.leaves_with_path(grads),
                            jax.tree.leaves(remat_grads)):
      where = f"{remat} {jax.tree_util.keystr(path)}"
      np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-6, err_msg=where)


def test_block_remat_rematerialises():
  batch = _batch()
  jaxprs = {remat: str(jax.make_jaxpr(fn)(params, batch))
            for remat in ("none", "block")
            for fn, params in [_loss_and_grad(_cfg("sessa", remat))]}
  # JAX names the jax.checkpoint primitive `remat2`.
  assert "remat" not in jaxprs["none"]
  assert "remat" in jaxprs["block"]


def test_pallas_solve_rematerialises():
  """The Pallas solve's custom VJP inside `jax.checkpoint` (as in a block).

  GPU kernels, interpreted: the TPU interpreter (the CPU default) runs its
  kernels through IO callbacks, which `jax.checkpoint` refuses.
  """
  rng = np.random.default_rng(0)
  q, k, f = (rng.standard_normal((B, T, 16)).astype(np.float32)
             for _ in range(3))
  gamma = np.full((B, T), 0.9, np.float32)

  def loss(*args):
    return feedback_pallas.feedback_solve_pallas(
        *args, chunk=16, backend="gpu", interpret=True).sum()

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, gamma, f)
  remat_grads = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3)))(
      q, k, gamma, f)
  for r, g in zip(remat_grads, grads):
    np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_remat_train_step_on_a_sharded_mesh():
  """A train step on a (2, 2, 2) mesh: constrain, the per-shard solve."""
  mesh = sharding_lib.make_mesh(config_lib.MeshConfig(2, 2, 2),
                                jax.devices()[:8])
  runs = []
  for remat in ("none", "block"):
    exp = config_lib.validate(config_lib.apply_overrides(
        tiny_config(), {"model.remat": remat}))
    task = data_lib.get_task(exp.data)
    spec = trainer.make_state_spec(exp.model_config(task.vocab_size),
                                   exp.train, mesh)
    batch = next(data_lib.make_iterator(task, "train", batch_size=8, seed=0))
    runs.append(trainer.make_train_step(spec, exp.train, mesh)(
        spec.init(), sharding_lib.global_batch(batch, mesh)))
  (state, metrics), (remat_state, remat_metrics) = runs
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(remat_metrics[key], metrics[key], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(remat_state["params"]),
                  jax.tree.leaves(state["params"])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_unknown_remat_lists_the_choices():
  with pytest.raises(ValueError, match=r"model\.remat='all' is not one of: "
                     r"none, block, save_dots, save_dots_no_batch"):
    ModelConfig(remat="all")


def test_a_run_resumes_with_another_remat(tmp_path):
  (tmp_path / "config.json").write_text(
      '{"model": {"mixer": "sessa"}, "data": {"task": "mqar"}}')
  raw = {"model": {"mixer": "sessa", "remat": "block"},
         "data": {"task": "mqar"}}
  assert workdir_files.check_resume(tmp_path, raw, force=False) == []
  raw["model"]["mixer"] = "attention"
  with pytest.raises(ValueError, match="model.mixer"):
    workdir_files.check_resume(tmp_path, raw, force=False)
