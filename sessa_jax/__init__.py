"""sessa_jax: train and compare long-context sequence models around Sessa."""

__version__ = "0.1.0"


def load(workdir, step=None, **kwargs):
  """A trained run's model, config and tokenizer (`sessa_jax.loading.load`)."""
  from sessa_jax import loading  # pylint: disable=g-import-not-at-top
  return loading.load(workdir, step, **kwargs)
