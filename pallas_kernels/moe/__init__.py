"""Routed experts (MoE): pure-jnp references, the router's top-k kernel and the grouped Pallas
kernels (decode and prefill)."""

from pallas_kernels.moe.grouped import (
    DECODE_BLOCKS,
    MAX_TOKENS,
    PREFILL_BLOCKS,
    MoEBlocks,
    moe_experts_decode,
    moe_experts_prefill,
    shared_tile_applies,
)
from pallas_kernels.moe.reference import (
    moe_experts_decode_ref,
    shared_expert_ref,
    validate_moe_inputs,
)
from pallas_kernels.moe.routing import (
    route_kernel_applies,
    route_topk,
    route_topk_ref,
    validate_route_inputs,
)

__all__ = [
    "DECODE_BLOCKS",
    "MAX_TOKENS",
    "MoEBlocks",
    "PREFILL_BLOCKS",
    "moe_experts_decode",
    "moe_experts_decode_ref",
    "moe_experts_prefill",
    "route_kernel_applies",
    "route_topk",
    "route_topk_ref",
    "shared_expert_ref",
    "shared_tile_applies",
    "validate_moe_inputs",
    "validate_route_inputs",
]
