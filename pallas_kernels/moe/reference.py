"""Pure-jnp reference for the routed experts of one MoE layer: the spec the Pallas kernel is
checked against.

Shapes (E experts on this device, F expert ffw width, k experts per token):
  x          [N, D]       tokens, bf16 or fp32
  experts    [N, k]       int32 ids; an id outside [0, E) (E: the expert lives on another
                          device) contributes a zero row
  w_gate_up  [E, D, 2F]   gate | up along the last axis
  w_down     [E, F, D]

For each (n, j) with e = experts[n, j] in [0, E):
  h[n, j] = (silu(x[n] @ Wg[e]) * (x[n] @ Wu[e])) @ Wd[e]
Products in x.dtype, sums in fp32; silu(gate) * up is rounded to x.dtype before the down
projection (the operand the down matmul reads in x.dtype); h is returned in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def validate_moe_inputs(x, experts, w_gate_up, w_down) -> tuple[int, int, int]:
    """Check the shape contract; returns (E, D, F). Raises ValueError naming the argument."""
    for name, a, rank in (("x", x, 2), ("experts", experts, 2), ("w_gate_up", w_gate_up, 3)):
        if a.ndim != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {tuple(a.shape)}")
    N, D = x.shape
    if experts.shape[0] != N:
        raise ValueError(f"experts must be [N={N}, k], got {tuple(experts.shape)}")
    E, _, F2 = w_gate_up.shape
    if w_gate_up.shape[1] != D or F2 % 2:
        raise ValueError(
            f"w_gate_up must be [E, D={D}, 2F] (gate | up), got {tuple(w_gate_up.shape)}"
        )
    F = F2 // 2
    if w_down.shape != (E, F, D):
        raise ValueError(
            f"w_down must be [E, F, D] = {(E, F, D)} (from w_gate_up {tuple(w_gate_up.shape)}),"
            f" got {tuple(w_down.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating dtype (bf16 or fp32), got {x.dtype}")
    if not jnp.issubdtype(experts.dtype, jnp.integer):
        raise ValueError(f"experts must be an integer dtype, got {experts.dtype}")
    return E, D, F


def moe_experts_decode_ref(x, experts, w_gate_up, w_down) -> jax.Array:
    """Each token's k experts gathered and applied (reads only the touched experts).

    Returns h [N, k, D] fp32, zero rows where the id is outside [0, E)."""
    E, _, F = validate_moe_inputs(x, experts, w_gate_up, w_down)
    here = (experts >= 0) & (experts < E)  # [N, k]
    e = jnp.clip(experts, 0, E - 1)
    f32 = jnp.float32
    gu = jnp.einsum("nd,nkdf->nkf", x, w_gate_up[e].astype(x.dtype), preferred_element_type=f32)
    act = (jax.nn.silu(gu[..., :F]) * gu[..., F:]).astype(x.dtype)  # [N, k, F]
    h = jnp.einsum("nkf,nkfd->nkd", act, w_down[e].astype(x.dtype), preferred_element_type=f32)
    return jnp.where(here[..., None], h, 0.0)


def shared_expert_ref(x, w_gate, w_up, w_down) -> jax.Array:
    """The shared expert as the decode kernel's extra tile computes it: x [N, D], w_gate /
    w_up [D, Fs], w_down [Fs, D] -> [N, D] fp32 (products in x.dtype, fp32 sums, silu(gate) *
    up rounded to x.dtype, as the routed experts)."""
    f32 = jnp.float32
    gate = jnp.dot(x, w_gate.astype(x.dtype), preferred_element_type=f32)
    up = jnp.dot(x, w_up.astype(x.dtype), preferred_element_type=f32)
    act = (jax.nn.silu(gate) * up).astype(x.dtype)
    return jnp.dot(act, w_down.astype(x.dtype), preferred_element_type=f32)
