"""The embedded default (`make run`): a tiny Sessa model on MQAR, on CPU.

A tiny Sessa model (2 blocks, width 64) on MQAR with 64-token sequences and
4 key-value pairs, sized to finish in a few minutes on a 2-core CPU. Chance
is 1/32 (values come from 32 tokens). The model first learns to answer with
one of the values in its context (eval accuracy about 0.3 at step 500), then
binds each key to its value (about 0.9 at step 2000, 0.97 at step 3000).

  python launch.py --config=configs/default.py --workdir=workdirs/default
"""

from sessa_jax.train.config import MODEL_SIZES, base_config


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"configs/default.py takes no argument, got {arg!r}")
  return base_config(
      model=dict(mixer="sessa", **MODEL_SIZES["tiny"]),
      data=dict(task="mqar", seq_len=64, vocab_size=64, num_kv_pairs=4),
      train=dict(steps=3000, batch_size=32, lr=3e-3, warmup_steps=50,
                 eval_every=500, eval_batches=8, test_batches=16,
                 checkpoint_every=500, log_every=50))
