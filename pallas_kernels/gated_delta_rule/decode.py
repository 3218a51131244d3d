"""Fused recurrent gated delta rule for decode: T = 1..8 tokens per sequence (T > 1 is the
speculative-decoding verify pass), fp32 state in and out, optionally the state after every
position so a caller can roll back to the last accepted token.

Memory-bound: each program owns one [K, block_v] slice of one (sequence, value head) state,
reads it once, applies the T token updates in registers and writes it back once
(2 * B * HV * K * V * 4 bytes per call plus the small q/k/v/o traffic).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta_rule.reference import validate_inputs

_L2_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    """block_v: V columns of the state per program (power of 2 dividing V); None picks 32 for
    few sequences (more programs: B=1 ran 14 us vs 18 at 16) and 64 from B * HV >= 512 on
    (B=64: 98 us vs 101 at 32 and 108 at 128, on the H200)."""

    block_v: int | None = None
    num_warps: int = 4


def _decode_kernel(
    q_ref,
    k_ref,
    v_ref,
    g_ref,
    beta_ref,
    s0_ref,
    o_ref,
    *state_refs,
    scale: float,
    l2norm: bool,
    n_tokens: int,
    has_final: bool,
):
    # q_ref, k_ref [T, K]  v_ref [T, BV]  g_ref, beta_ref [T] fp32  s0_ref [K, BV] fp32
    # out: o_ref [T, BV]; then ht_ref [K, BV] fp32 and/or all_ref [T, K, BV] fp32
    s = s0_ref[...].astype(jnp.float32)
    ht_ref = state_refs[0] if has_final else None
    all_ref = state_refs[-1] if len(state_refs) > int(has_final) else None
    for t in range(n_tokens):  # static: T <= 8 in decode
        q = q_ref[t, :].astype(jnp.float32)
        k = k_ref[t, :].astype(jnp.float32)
        if l2norm:
            q = q * jax.lax.rsqrt(jnp.sum(q * q) + _L2_EPS)
            k = k * jax.lax.rsqrt(jnp.sum(k * k) + _L2_EPS)
        s = s * jnp.exp(g_ref[t])  # 1) decay
        kv = jnp.sum(s * k[:, None], axis=0)  # [BV] = S^T k
        d = beta_ref[t] * (v_ref[t, :].astype(jnp.float32) - kv)  # 2) delta
        s = s + k[:, None] * d[None, :]  # 3) write
        o_ref[t, :] = jnp.sum(s * (q * scale)[:, None], axis=0).astype(o_ref.dtype)  # 4) read
        if all_ref is not None:
            all_ref[t, :, :] = s
    if ht_ref is not None:
        ht_ref[...] = s


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "output_final_state",
        "use_qk_l2norm",
        "return_all_states",
        "interpret",
        "blocks",
    ),
)
def fused_recurrent_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=True,
    use_qk_l2norm=False,
    return_all_states=False,
    interpret=False,
    blocks: DecodeBlocks = DecodeBlocks(),
):
    """Token-by-token gated delta rule in one kernel (decode and speculative verify).

    Args: as `recurrent_gated_delta_rule`: q, k [B, T, H, K]; v [B, T, HV, V]; g, beta
      [B, T, HV]; initial_state [B, HV, K, V] (None: zeros).
    Returns: (o [B, T, HV, V] in v's dtype, final state [B, HV, K, V] fp32 or None), plus
      all_states [B, T, HV, K, V] fp32 (the state after each position) when return_all_states.
    """
    H, R = validate_inputs(q, k, v, g, beta, initial_state)
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BV = blocks.block_v or (64 if B * HV >= 512 else 32)
    BV = min(BV, V)
    if T < 1:
        raise ValueError(f"T must be >= 1, got q {tuple(q.shape)}")
    if V % BV or BV & (BV - 1) or K & (K - 1):
        raise ValueError(f"block_v={BV} must be a power of 2 dividing V={V}; K={K} a power of 2")
    scale = K**-0.5 if scale is None else float(scale)
    if initial_state is None:
        initial_state = jnp.zeros((B, HV, K, V), jnp.float32)
    g = g.astype(jnp.float32)
    beta = beta.astype(jnp.float32)

    out_specs = [pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))]
    out_shape = [jax.ShapeDtypeStruct((B, T, HV, V), v.dtype)]
    if output_final_state:
        out_specs.append(pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((B, HV, K, V), jnp.float32))
    if return_all_states:
        out_specs.append(pl.BlockSpec((None, T, None, K, BV), lambda b, h, j: (b, 0, h, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((B, T, HV, K, V), jnp.float32))
    try:
        from jax.experimental.pallas import triton as plt

        params = plt.CompilerParams(num_warps=blocks.num_warps, num_stages=1)
    except (ImportError, AttributeError):  # pragma: no cover
        params = None
    kernel = functools.partial(
        _decode_kernel,
        scale=scale,
        l2norm=use_qk_l2norm,
        n_tokens=T,
        has_final=output_final_state,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(B, HV, V // BV),
        in_specs=[
            pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h // R, 0)),
            pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h // R, 0)),
            pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j)),
            pl.BlockSpec((None, T, None), lambda b, h, j: (b, 0, h)),
            pl.BlockSpec((None, T, None), lambda b, h, j: (b, 0, h)),
            pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name="gdn_decode",
    )(q, k, v, g, beta, initial_state.astype(jnp.float32))
    o = outs[0]
    final = outs[1] if output_final_state else None
    if return_all_states:
        return o, final, outs[-1]
    return o, final
