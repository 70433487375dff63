"""sessa_jax: train and compare long-context sequence models around Sessa."""

__version__ = "0.1.0"
