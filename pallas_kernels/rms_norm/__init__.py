"""The zero-centred RMSNorm (with the residual add before it) of decode-sized inputs: pure-jnp
reference and the Pallas kernel."""

from pallas_kernels.rms_norm.kernel import MAX_ROWS, kernel_applies, rms_norm
from pallas_kernels.rms_norm.reference import rms_norm_ref, validate_rms_norm_inputs

__all__ = ["MAX_ROWS", "kernel_applies", "rms_norm", "rms_norm_ref", "validate_rms_norm_inputs"]
