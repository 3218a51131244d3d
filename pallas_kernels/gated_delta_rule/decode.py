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

from pallas_kernels._triton import compiler_params
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
    *refs,
    scale: float,
    l2norm: bool,
    n_tokens: int,
    has_final: bool,
    block_v: int | None,
):
    # q_ref, k_ref [T, K]  v_ref [T, BV]  g_ref, beta_ref [T] fp32  s0_ref [K, BV] fp32
    # out: o_ref [T, BV]; then ht_ref [K, BV] fp32 and/or all_ref [T, K, BV] fp32.
    # In place (block_v given): layer_ref [1] int32 follows s0_ref, and s0_ref / ht_ref are
    # the whole stack [L * B, HV, K, V] (one buffer): this program reads and writes its
    # [K, BV] block at row layer * B + b.
    if block_v is None:
        o_ref, *state_refs = refs
        s = s0_ref[...].astype(jnp.float32)
    else:
        layer_ref, o_ref, *state_refs = refs
        row = layer_ref[0] * pl.num_programs(0) + pl.program_id(0)
        h, cols = pl.program_id(1), pl.ds(pl.program_id(2) * block_v, block_v)
        s = s0_ref[row, h, :, cols]
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
        if block_v is None:
            ht_ref[...] = s
        else:
            ht_ref[row, h, :, cols] = s


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
    state_layer=None,
    output_final_state=True,
    use_qk_l2norm=False,
    return_all_states=False,
    interpret=False,
    blocks: DecodeBlocks = DecodeBlocks(),
):
    """Token-by-token gated delta rule in one kernel (decode and speculative verify).

    Args: as `recurrent_gated_delta_rule`: q, k [B, T, H, K]; v [B, T, HV, V]; g, beta
      [B, T, HV]; initial_state [B, HV, K, V] (None: zeros).
      Or, with state_layer (an int32 scalar, clamped into [0, L)), initial_state is a stack
      of layers' states [L, B, HV, K, V] fp32, read at state_layer and updated there in place:
      the returned final state is the whole stack. In a scan over layers this keeps the state
      out of copies (a slice of the stack as a kernel operand would be copied in and out).
    Returns: (o [B, T, HV, V] in v's dtype, final state [B, HV, K, V] fp32 or None), plus
      all_states [B, T, HV, K, V] fp32 (the state after each position) when return_all_states.
    """
    stack = None
    if state_layer is not None:
        stack = _check_stack(initial_state, output_final_state)
        initial_state = jax.ShapeDtypeStruct(stack.shape[1:], stack.dtype)
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

    state_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    extra, aliases = [], {}
    if stack is not None:
        L = stack.shape[0]
        state_spec = pl.BlockSpec()  # the whole [L * B, ...] stack: the kernel finds its row
        initial_state = stack.reshape(L * B, HV, K, V)  # merges leading dims: no copy
        extra = [jnp.clip(jnp.asarray(state_layer, jnp.int32), 0, L - 1).reshape(1)]
        aliases = {5: 1}  # the final state is written into the stack's buffer

    out_specs = [pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))]
    out_shape = [jax.ShapeDtypeStruct((B, T, HV, V), v.dtype)]
    if output_final_state:
        out_specs.append(state_spec)
        out_shape.append(jax.ShapeDtypeStruct(initial_state.shape, jnp.float32))
    if return_all_states:
        out_specs.append(pl.BlockSpec((None, T, None, K, BV), lambda b, h, j: (b, 0, h, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((B, T, HV, K, V), jnp.float32))
    kernel = functools.partial(
        _decode_kernel,
        scale=scale,
        l2norm=use_qk_l2norm,
        n_tokens=T,
        has_final=output_final_state,
        block_v=None if stack is None else BV,
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
            state_spec,
            *(pl.BlockSpec() for _ in extra),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=compiler_params(blocks.num_warps, 1),
        interpret=interpret,
        name="gdn_decode",
    )(q, k, v, g, beta, initial_state.astype(jnp.float32), *extra)
    o = outs[0]
    final = outs[1] if output_final_state else None
    if stack is not None:
        final = final.reshape(stack.shape)
    if return_all_states:
        return o, final, outs[-1]
    return o, final


def _check_stack(stack, output_final_state):
    """The state stack of the in-place form: [L, B, HV, K, V] fp32, updated and returned."""
    if stack is None or stack.ndim != 5 or stack.dtype != jnp.float32:
        shape = None if stack is None else tuple(stack.shape)
        dtype = None if stack is None else stack.dtype
        raise ValueError(
            "with state_layer, initial_state must be the fp32 stack [L, B, HV, K, V], got "
            f"shape {shape} dtype {dtype}"
        )
    if not output_final_state:
        raise ValueError(
            "state_layer updates the stack in place, so it needs output_final_state=True"
        )
    return stack
