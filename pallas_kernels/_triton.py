"""What every kernel here passes to the Pallas Triton backend."""

from __future__ import annotations


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters for a pallas_call (None where this jax has no Triton
    backend: interpret mode ignores them)."""
    try:
        from jax.experimental.pallas import triton as plt

        return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    except (ImportError, AttributeError):  # pragma: no cover - older / newer jax
        return None
