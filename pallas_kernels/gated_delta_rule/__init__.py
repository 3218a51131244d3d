from pallas_kernels.gated_delta_rule.reference import (
    chunk_gated_delta_rule_ref,
    l2norm,
    recurrent_gated_delta_rule,
    validate_inputs,
)

__all__ = ["chunk_gated_delta_rule_ref", "l2norm", "recurrent_gated_delta_rule", "validate_inputs"]
