"""Gated DeltaNet gates (spec 3.3), as plain jnp so XLA fuses them into the ops that feed the
kernels (the chunk wrapper's transpose and chunk-local cumsum of g): no extra pass over memory
when called inside the same jit. The decode kernel from the projections (`fused_gdn_decode`)
computes the same gates inside, with this softplus.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softplus(x: jax.Array, threshold: float = 20.0) -> jax.Array:
    """torch.nn.functional.softplus with beta=1: x above the threshold is returned as is."""
    return jnp.where(x > threshold, x, jnp.log1p(jnp.exp(jnp.minimum(x, threshold))))


def gdn_gates(a, b, A_log, dt_bias) -> tuple[jax.Array, jax.Array]:
    """a, b [B, T, HV]; A_log, dt_bias [HV]. Returns (g fp32 log-decay, beta in b's dtype).

    beta = sigmoid(b) in the model dtype (as HF computes it);
    g = -exp(A_log) * softplus(a + dt_bias), all in fp32."""
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"a and b must be [B, T, HV], got a {a.shape} and b {b.shape}")
    HV = a.shape[-1]
    if A_log.shape != (HV,) or dt_bias.shape != (HV,):
        raise ValueError(
            f"A_log and dt_bias must be [HV={HV}], got {A_log.shape} and {dt_bias.shape}"
        )
    beta = jax.nn.sigmoid(b)
    f32 = jnp.float32
    g = -jnp.exp(A_log.astype(f32)) * softplus(a.astype(f32) + dt_bias.astype(f32))
    return g, beta
