"""Projections of a few rows (decode): pure-jnp reference and the Pallas kernel."""

from pallas_kernels.linear.kernel import (
    MAX_ROWS,
    LinearBlocks,
    kernel_applies,
    linear,
    linear_many,
    plan,
    plan_many,
)
from pallas_kernels.linear.reference import linear_ref, validate_linear_inputs

__all__ = [
    "MAX_ROWS",
    "LinearBlocks",
    "kernel_applies",
    "linear",
    "linear_many",
    "linear_ref",
    "plan",
    "plan_many",
    "validate_linear_inputs",
]
