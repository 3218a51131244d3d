"""Norms of decode-sized inputs, pure-jnp references and Pallas kernels: the zero-centred
RMSNorm with the residual add before it, and the Gated DeltaNet output norm."""

from pallas_kernels.rms_norm.kernel import (
    MAX_ROWS,
    gated_kernel_applies,
    gated_rms_norm,
    kernel_applies,
    rms_norm,
)
from pallas_kernels.rms_norm.reference import (
    gated_rms_norm_ref,
    rms_norm_ref,
    validate_gated_norm_inputs,
    validate_rms_norm_inputs,
)

__all__ = [
    "MAX_ROWS",
    "gated_kernel_applies",
    "gated_rms_norm",
    "gated_rms_norm_ref",
    "kernel_applies",
    "rms_norm",
    "rms_norm_ref",
    "validate_gated_norm_inputs",
    "validate_rms_norm_inputs",
]
