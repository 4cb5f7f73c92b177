"""e2etts_jax: end-to-end training of a discrete-token, LLM-based text-to-speech system in JAX/Flax."""

__version__ = "0.1.0"
