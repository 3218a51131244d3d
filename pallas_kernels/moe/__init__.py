"""Routed experts (MoE): pure-jnp reference and the grouped Pallas kernels (decode and prefill)."""

from pallas_kernels.moe.grouped import (
    MAX_TOKENS,
    PREFILL_BLOCKS,
    MoEBlocks,
    moe_experts_decode,
    moe_experts_prefill,
)
from pallas_kernels.moe.reference import moe_experts_decode_ref, validate_moe_inputs

__all__ = [
    "MAX_TOKENS",
    "MoEBlocks",
    "PREFILL_BLOCKS",
    "moe_experts_decode",
    "moe_experts_decode_ref",
    "moe_experts_prefill",
    "validate_moe_inputs",
]
