"""Causal depthwise conv1d (+ SiLU): pure-jnp reference and Pallas kernels (prefill, decode)."""

from pallas_kernels.causal_conv1d.kernel import ConvBlocks, causal_conv1d, causal_conv1d_update
from pallas_kernels.causal_conv1d.reference import (
    causal_conv1d_ref,
    conv_state_after,
    validate_conv_inputs,
)

__all__ = [
    "ConvBlocks",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "conv_state_after",
    "validate_conv_inputs",
]
