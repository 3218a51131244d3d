"""Pallas kernels for Qwen3-Next hot ops, each beside its pure-jnp reference.

Kernels take arrays, not model configs: nothing here imports qnext_jax."""
