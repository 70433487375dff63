"""experiments/seed_batching.py: the vmapped N-seed step is N single steps."""

import jax
import numpy as np

from experiments import seed_batching

SEEDS = (0, 1)
STEPS = 2
LR = 1e-3
# Adam divides each gradient by its running RMS, so rounding in a near-zero
# gradient (vmapped matmuls sum in another order) moves that parameter by a
# few percent of one update: compare parameters to a tenth of the step size.
PARAM_ATOL = 0.1 * LR


def _tiny_setup():
  """A 1-layer Sessa LM on diffuse MQAR at T = 64, batch 2, float32."""
  return seed_batching.one_device_setup(seed_batching.point_config({
      "config": "configs/diffuse_mqar.py:sessa,tiny",
      "model.n_layers": 1, "model.d_model": 16, "model.n_heads": 2,
      "data.seq_len": 64, "data.num_pairs": 2, "data.max_lag": 14,
      "data.num_val": 2, "data.num_test": 2, "train.batch_size": 2,
      "train.steps": 10, "train.warmup_steps": 1, "train.lr": LR}))


def test_vmapped_seeds_train_as_separate_runs():
  resolved = _tiny_setup()
  spec, states = seed_batching.seed_states(resolved, SEEDS)
  single, batched = seed_batching.train_steps(resolved, spec)
  batches = [seed_batching.random_batches(resolved, seed, STEPS)
             for seed in SEEDS]
  together = seed_batching.stacked(states)  # Before the singles donate them.
  # Different seeds start from different parameters.
  assert not np.allclose(*[jax.tree.leaves(s["params"])[0] for s in states[:2]])
  separate = []  # Per seed: metrics stacked over steps.
  for i in range(len(SEEDS)):
    metrics = []
    for batch in batches[i]:
      states[i], step_metrics = single(states[i], batch)
      metrics.append(step_metrics)
    separate.append(seed_batching.stacked(metrics))
  together_metrics = []
  for step_batches in zip(*batches):
    together, step_metrics = batched(together,
                                     seed_batching.stacked(step_batches))
    together_metrics.append(step_metrics)
  together_metrics = seed_batching.stacked(together_metrics)  # (step, seed)
  for key in ("loss", "accuracy", "grad_norm", "lr"):
    np.testing.assert_allclose(together_metrics[key].T,
                               np.stack([m[key] for m in separate]),
                               rtol=1e-5, err_msg=key)
  for got, want in zip(jax.tree.leaves(together),
                       jax.tree.leaves(seed_batching.stacked(states))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=PARAM_ATOL)
