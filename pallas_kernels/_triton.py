"""What every kernel here passes to the Pallas Triton backend, and the block sizes it takes."""

from __future__ import annotations


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters for a pallas_call (None where this jax has no Triton
    backend: interpret mode ignores them)."""
    try:
        from jax.experimental.pallas import triton as plt

        return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    except (ImportError, AttributeError):  # pragma: no cover - older / newer jax
        return None


MIN_DOT = 16  # tl.dot needs every operand dimension >= 16


def dot_block(name: str, want: int, dim: int, dim_name: str) -> int:
    """A block of `dim` fed to tl.dot: `want` (a power of 2) capped at the largest power of 2
    dividing dim. ValueError, naming the block and the dim, where that is not a legal block."""
    if want < 1 or want & (want - 1):
        raise ValueError(f"{name}={want} must be a power of 2")
    b = min(want, dim & -dim)
    if b < MIN_DOT:
        raise ValueError(
            f"{name}: {dim_name}={dim} must be a multiple of {MIN_DOT} (the smallest tl.dot "
            f"shape); a block of {b} would divide it"
        )
    return b
