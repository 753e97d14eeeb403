"""lumina-jax: Lumina-Image 2.0 (Unified Next-DiT, Gemma-2 text encoder, FLUX VAE) in JAX/Flax."""

__version__ = "0.1.0"
