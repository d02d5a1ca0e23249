"""SpeciaRL in JAX."""
