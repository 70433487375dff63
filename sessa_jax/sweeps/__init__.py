"""sessa_jax.sweeps: many runs from one sweep file, in-process or on Ray."""
