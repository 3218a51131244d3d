"""Routed experts (MoE): pure-jnp reference and the decode Pallas kernels (grouped by expert)."""

from pallas_kernels.moe.grouped_gemv import MAX_TOKENS, MoEBlocks, moe_experts_decode
from pallas_kernels.moe.reference import moe_experts_decode_ref, validate_moe_inputs

__all__ = [
    "MAX_TOKENS",
    "MoEBlocks",
    "moe_experts_decode",
    "moe_experts_decode_ref",
    "validate_moe_inputs",
]
