"""reset-jax: accurate, fast NVFP4 reasoning-model decoding in JAX."""

__version__ = "0.1.0"

# Bound here, after the submodule import, so `reset_jax.generate` is the function
# (as the README uses it) whichever of the two is imported first.
from reset_jax.generate import GenerationResult, generate, reset_config_for

__all__ = ["GenerationResult", "__version__", "generate", "reset_config_for"]
