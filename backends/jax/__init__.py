"""The jax backend: ``session`` computes the reduction methods natively in jax."""
