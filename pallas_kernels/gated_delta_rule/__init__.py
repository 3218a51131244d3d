"""Gated delta rule: pure-jnp references and Pallas kernels (chunked prefill, fused decode)."""

from pallas_kernels.gated_delta_rule.chunk import ChunkBlocks, chunk_gated_delta_rule
from pallas_kernels.gated_delta_rule.decode import (
    DecodeBlocks,
    fused_gdn_decode,
    fused_recurrent_gated_delta_rule,
)
from pallas_kernels.gated_delta_rule.gates import gdn_gates, softplus
from pallas_kernels.gated_delta_rule.reference import (
    chunk_gated_delta_rule_ref,
    l2norm,
    recurrent_gated_delta_rule,
    validate_inputs,
)

__all__ = [
    "ChunkBlocks",
    "DecodeBlocks",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_ref",
    "fused_gdn_decode",
    "fused_recurrent_gated_delta_rule",
    "gdn_gates",
    "l2norm",
    "recurrent_gated_delta_rule",
    "softplus",
    "validate_inputs",
]
