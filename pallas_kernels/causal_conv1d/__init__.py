from pallas_kernels.causal_conv1d.reference import causal_conv1d_ref, validate_conv_inputs

__all__ = ["causal_conv1d_ref", "validate_conv_inputs"]
