"""Decode attention over a KV cache (split along the sequence), beside its jnp reference."""

from pallas_kernels.attention.decode import DecodeAttentionBlocks, decode_attention
from pallas_kernels.attention.reference import decode_attention_ref, validate_decode_attention

__all__ = [
    "DecodeAttentionBlocks",
    "decode_attention",
    "decode_attention_ref",
    "validate_decode_attention",
]
