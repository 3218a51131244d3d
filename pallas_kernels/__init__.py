"""Pallas kernels for Qwen3-Next hot ops, each beside its pure-jnp reference.

Kernels take arrays, not model configs: nothing here imports qnext_jax. Every kernel runs on the
CPU with interpret=True (tests) and through the Pallas Triton backend on NVIDIA GPUs.
"""

from pallas_kernels.attention import (
    DecodeAttentionBlocks,
    decode_attention,
    decode_attention_ref,
    validate_decode_attention,
)
from pallas_kernels.causal_conv1d import (
    ConvBlocks,
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    validate_conv_inputs,
)
from pallas_kernels.gated_delta_rule import (
    ChunkBlocks,
    DecodeBlocks,
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule,
    gdn_gates,
    l2norm,
    recurrent_gated_delta_rule,
    validate_inputs,
)
from pallas_kernels.moe import (
    MoEBlocks,
    moe_experts_decode,
    moe_experts_decode_ref,
    moe_experts_prefill,
)
from pallas_kernels.rms_norm import rms_norm, rms_norm_ref

__all__ = [
    "ChunkBlocks",
    "ConvBlocks",
    "DecodeAttentionBlocks",
    "DecodeBlocks",
    "MoEBlocks",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_ref",
    "decode_attention",
    "decode_attention_ref",
    "fused_recurrent_gated_delta_rule",
    "gdn_gates",
    "l2norm",
    "moe_experts_decode",
    "moe_experts_decode_ref",
    "moe_experts_prefill",
    "recurrent_gated_delta_rule",
    "rms_norm",
    "rms_norm_ref",
    "validate_conv_inputs",
    "validate_decode_attention",
    "validate_inputs",
]
