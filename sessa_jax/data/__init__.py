"""sessa_jax.data."""
