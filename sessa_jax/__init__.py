"""sessa_jax: train and compare long-context sequence models around Sessa.

Array names end in one letter per axis (`x_btd`: batch, time, model width);
docs/design.md#shape-letters is the legend of these letters, and the rest of
docs/design.md sets out the layer, the feedback solve, the FLOP convention
and the sharding rules.
"""

__version__ = "0.1.0"


def load(workdir, step=None, **kwargs):
  """A trained run's model, config and tokenizer (`sessa_jax.loading.load`)."""
  from sessa_jax import loading  # pylint: disable=g-import-not-at-top
  return loading.load(workdir, step, **kwargs)
