"""Byte-level language modelling on local text files (Austen-6 by default).

  python launch.py --config=configs/text_lm.py:sessa --workdir=workdirs/lm_sessa
  python launch.py --config=configs/text_lm.py:attention,base \
      --config.data.path='/data/my_corpus/*.txt' --workdir=workdirs/lm_attn

`data.path` is a glob of training files, relative to the directory launch.py
runs in; the default points at the Austen corpus beside this checkout.
Reports loss, perplexity, bits per byte and accuracy.
"""

from sessa_jax.train.config import sized_config


def get_config(arg: str | None = None):
  """arg: '<mixer>,<size>' in any order; defaults 'sessa,small'."""
  return sized_config(
      arg, default_size="small",
      data=dict(task="text", path="../shared/data/austen/*.txt", seq_len=256,
                tokenizer="byte"),
      train=dict(steps=5000, batch_size=32, lr=1e-3, warmup_steps=200,
                 eval_every=500, eval_batches=50, test_batches=0,
                 checkpoint_every=500, log_every=50))
