"""t5x_lite: a small, readable JAX/Flax codebase for T5-style and decoder-only transformers."""

__version__ = '0.1.0'
