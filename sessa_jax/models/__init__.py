"""sessa_jax.models."""
