"""reset-jax: accurate, fast NVFP4 reasoning-model decoding in JAX."""

__version__ = "0.1.0"
