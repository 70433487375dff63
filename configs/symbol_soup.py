"""SymbolSoup: the Sessa paper's long-range 20-class style classification.

  python launch.py --config=configs/symbol_soup.py:sessa \
      --workdir=workdirs/ss_sessa
  python launch.py --config=configs/symbol_soup.py:mamba2,tiny \
      --workdir=workdirs/ss_m2

Examples are 401..599 tokens; the class is predicted at the final <label>
token (chance 1/20). `data.path` may name a directory of the published
generator's TSV files instead of generating examples.
"""

from sessa_jax.train.config import sized_config


def get_config(arg: str | None = None):
  """arg: '<mixer>,<size>' in any order; defaults 'sessa,small'."""
  return sized_config(
      arg, default_size="small",
      data=dict(task="symbol_soup", seq_len=600),
      train=dict(steps=10_000, batch_size=32, lr=1e-3, warmup_steps=500,
                 eval_every=1000, eval_batches=0, checkpoint_every=1000,
                 log_every=50))
