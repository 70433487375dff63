"""Zoology's multi-query associative recall (MQAR).

  python launch.py --config=configs/mqar.py:attention,small \
      --workdir=workdirs/mqar
"""

from sessa_jax.train.config import sized_config


def get_config(arg: str | None = None):
  """arg: '<mixer>,<size>' in any order; defaults 'sessa,tiny'."""
  return sized_config(
      arg, default_size="tiny",
      data=dict(task="mqar", seq_len=128, vocab_size=64, num_kv_pairs=8),
      train=dict(steps=2000, batch_size=32, lr=3e-3, warmup_steps=100,
                 eval_every=500, checkpoint_every=500, log_every=50))
