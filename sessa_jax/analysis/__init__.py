"""sessa_jax.analysis."""
