"""SymbolSoup: the Sessa paper's long-range 20-class style classification.

  python launch.py --config=configs/symbol_soup.py:sessa --workdir=workdirs/ss_sessa
  python launch.py --config=configs/symbol_soup.py:mamba2,tiny --workdir=workdirs/ss_m2

Examples are 401..599 tokens; the class is predicted at the final <label>
token (chance 1/20). `data.path` may name a directory of the published
generator's TSV files instead of generating examples.
"""

from sessa_jax.train.config import MODEL_SIZES, base_config, parse_arg


def get_config(arg: str | None = None):
  """arg: '<mixer>,<size>' in any order; defaults 'sessa,small'."""
  mixer, size = parse_arg(arg, MODEL_SIZES, default_size="small")
  return base_config(
      model=dict(mixer=mixer, **MODEL_SIZES[size]),
      data=dict(task="symbol_soup", seq_len=600),
      train=dict(steps=10_000, batch_size=32, lr=1e-3, warmup_steps=500,
                 eval_every=1000, eval_batches=0, checkpoint_every=1000,
                 log_every=50))
