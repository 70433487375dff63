"""Memory-influence measurements (Jacobian norms and impulse responses vs lag)."""
