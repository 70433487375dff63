"""sessa_jax.train."""
