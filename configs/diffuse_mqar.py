"""Diffuse MQAR: associative recall past distractor keys that share a prefix.

  python launch.py --config=configs/diffuse_mqar.py:sessa \
      --workdir=workdirs/dm_sessa
  python launch.py --config=configs/diffuse_mqar.py:attention,tiny \
      --workdir=workdirs/dm_attn

The test split uses lags up to `data.test_lag_multiplier` times the longest
training lag; summary.json reports `test/accuracy_by_lag`.
"""

from sessa_jax.train.config import sized_config


def get_config(arg: str | None = None):
  """arg: '<mixer>,<size>' in any order; defaults 'sessa,small'."""
  return sized_config(
      arg, default_size="small",
      data=dict(task="diffuse_mqar", seq_len=256),
      train=dict(steps=10_000, batch_size=32, lr=1e-3, warmup_steps=500,
                 eval_every=1000, eval_batches=0, checkpoint_every=1000,
                 log_every=50))
