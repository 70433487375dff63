"""Memory influence: Jacobian norms and impulse responses against lag."""
