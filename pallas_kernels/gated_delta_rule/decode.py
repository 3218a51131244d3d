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
from pallas_kernels.gated_delta_rule.gates import softplus
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
    *refs,
    scale: float,
    l2norm: bool,
    n_tokens: int,
    has_final: bool,
    block_v: int | None,
    gates_in_kernel: bool,
):
    # q_ref, k_ref [T, K]  v_ref [T, BV]; then g_ref, beta_ref [T] fp32, or (gates_in_kernel)
    # ba_ref [T, 2R] (b | a of this value head's key-head group), a_log_ref, dt_ref [HV],
    # n_ref [B] int32 (real tokens per row); then s0_ref [K, BV] fp32.
    # out: o_ref [T, BV]; then ht_ref [K, BV] fp32 and/or all_ref [T, K, BV] fp32.
    # In place (block_v given): layer_ref [1] int32 follows s0_ref, and s0_ref / ht_ref are
    # the whole stack [L * B, HV, K, V] (one buffer): this program reads and writes its
    # [K, BV] block at row layer * B + b.
    if gates_in_kernel:
        ba_ref, a_log_ref, dt_ref, n_ref, s0_ref, *refs = refs
    else:
        g_ref, beta_ref, s0_ref, *refs = refs
        gates = lambda t: (g_ref[t], beta_ref[t])  # noqa: E731
    if block_v is None:
        o_ref, *state_refs = refs
        s = s0_ref[...].astype(jnp.float32)
    else:
        layer_ref, o_ref, *state_refs = refs
        row = layer_ref[0] * pl.num_programs(0) + pl.program_id(0)
        h, cols = pl.program_id(1), pl.ds(pl.program_id(2) * block_v, block_v)
        s = s0_ref[row, h, :, cols]
    if gates_in_kernel:  # (always in place)
        gates = functools.partial(_gates, ba_ref, a_log_ref, dt_ref, n_ref, layer_ref[0])
    ht_ref = state_refs[0] if has_final else None
    all_ref = state_refs[-1] if len(state_refs) > int(has_final) else None
    for t in range(n_tokens):  # static: T <= 8 in decode
        q = q_ref[t, :].astype(jnp.float32)
        k = k_ref[t, :].astype(jnp.float32)
        if l2norm:
            q = q * jax.lax.rsqrt(jnp.sum(q * q) + _L2_EPS)
            k = k * jax.lax.rsqrt(jnp.sum(k * k) + _L2_EPS)
        g, beta = gates(t)
        s = s * jnp.exp(g)  # 1) decay
        kv = jnp.sum(s * k[:, None], axis=0)  # [BV] = S^T k
        d = beta * (v_ref[t, :].astype(jnp.float32) - kv)  # 2) delta
        s = s + k[:, None] * d[None, :]  # 3) write
        o_ref[t, :] = jnp.sum(s * (q * scale)[:, None], axis=0).astype(o_ref.dtype)  # 4) read
        if all_ref is not None:
            all_ref[t, :, :] = s
    if ht_ref is not None:
        if block_v is None:
            ht_ref[...] = s
        else:
            ht_ref[row, h, :, cols] = s


def _gates(ba_ref, a_log_ref, dt_ref, n_ref, layer, t):
    """Token t's (g, beta) of this program's value head from the projections:
    beta = sigmoid(b) (rounded to b's dtype, as the model computes it), g = -exp(A_log) *
    softplus(a + dt_bias) in fp32; both 0 past the row's real tokens (the state passes).
    A_log and dt_bias are [HV], or [L, HV] stacked like the state (read at `layer`)."""
    h = pl.program_id(1)
    R = ba_ref.shape[-1] // 2
    row = ba_ref[t, :]  # [2R] = b_0 .. b_{R-1} | a_0 .. a_{R-1} of the key-head group
    col = jnp.arange(2 * R)
    b = jnp.sum(jnp.where(col == h % R, row, 0).astype(jnp.float32))
    a = jnp.sum(jnp.where(col == R + h % R, row, 0).astype(jnp.float32))
    beta = jax.nn.sigmoid(b).astype(ba_ref.dtype).astype(jnp.float32)
    at = (layer, h) if len(a_log_ref.shape) == 2 else (h,)
    a_log, dt_bias = a_log_ref[at].astype(jnp.float32), dt_ref[at].astype(jnp.float32)
    g = -jnp.exp(a_log) * softplus(a + dt_bias)
    real = t < n_ref[pl.program_id(0)]
    return jnp.where(real, g, 0.0), jnp.where(real, beta, 0.0)


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
    V = v.shape[3]
    BV = _block_v(blocks, B, v.shape[2], K, V)
    per_token = lambda b, h, j: (b, 0, h)  # noqa: E731
    operands = [
        (q, pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h // R, 0))),
        (k, pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h // R, 0))),
        (v, pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))),
        (g.astype(jnp.float32), pl.BlockSpec((None, T, None), per_token)),
        (beta.astype(jnp.float32), pl.BlockSpec((None, T, None), per_token)),
    ]
    return _decode_call(
        operands,
        (B, T, v.shape[2], K, V, BV),
        v.dtype,
        initial_state if stack is None else None,
        stack,
        state_layer,
        scale=K**-0.5 if scale is None else float(scale),
        l2norm=use_qk_l2norm,
        output_final_state=output_final_state,
        return_all_states=return_all_states,
        gates_in_kernel=False,
        num_warps=blocks.num_warps,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("key_dim", "scale", "interpret", "blocks"))
def fused_gdn_decode(
    qkv,
    ba,
    A_log,
    dt_bias,
    state_stack,
    state_layer,
    *,
    key_dim: int,
    n_valid=None,
    scale=None,
    interpret=False,
    blocks: DecodeBlocks = DecodeBlocks(),
):
    """The decode step of a Gated DeltaNet layer straight from its projections, in one kernel:
    q, k and v read in place from the conv output, the gates computed in the kernel, the
    state stack updated in place (as `fused_recurrent_gated_delta_rule` with state_layer),
    q and k L2-normalised.

    Args:
      qkv: [B, T, H, 2K + R*V], per key head h: q_h | k_h | v of its R value heads h*R ..
        h*R + R - 1 (the checkpoint's grouping; the conv output of the layer).
      ba: [B, T, H, 2R], per key head: b of its R value heads | a of them.
      A_log, dt_bias: [HV], or [L, HV] stacked like the state (read at state_layer in place:
        a slice would be a copy). beta = sigmoid(b) in ba's dtype; g = -exp(A_log) *
        softplus(a + dt_bias) in fp32.
      state_stack: [L, B, HV, K, V] fp32; state_layer: int32 scalar (clamped into [0, L)).
      key_dim: K. n_valid: [B] int32, real tokens per right-padded row (None: all T); past
        them g = beta = 0, so the state passes unchanged.
    Returns: (o [B, T, HV, V] in qkv's dtype, the updated stack).
    """
    stack = _check_stack(state_stack, True)
    L, B, HV, K, V = stack.shape
    if qkv.ndim != 4 or ba.ndim != 4 or qkv.shape[:3] != ba.shape[:3]:
        raise ValueError(
            f"qkv [B, T, H, 2K + R*V] and ba [B, T, H, 2R] must share B, T, H, got qkv "
            f"{tuple(qkv.shape)} and ba {tuple(ba.shape)}"
        )
    _, T, H, width = qkv.shape
    R = HV // H if H and HV % H == 0 else 0
    if (qkv.shape[0], K) != (B, key_dim) or not R or width != 2 * K + R * V:
        raise ValueError(
            f"qkv {tuple(qkv.shape)} must be [B={B}, T, H, 2K + R*V] with K={key_dim} and "
            f"H dividing the stack's HV={HV} (stack {tuple(stack.shape)})"
        )
    heads = (HV,) if A_log.ndim < 2 else (L, HV)
    if ba.shape[3] != 2 * R or A_log.shape != heads or dt_bias.shape != heads:
        raise ValueError(
            f"ba must be [B, T, H, 2R={2 * R}] and A_log, dt_bias [HV={HV}] or [L={L}, HV], got ba "
            f"{tuple(ba.shape)}, A_log {tuple(A_log.shape)}, dt_bias {tuple(dt_bias.shape)}"
        )
    if n_valid is not None and n_valid.shape != (B,):
        raise ValueError(f"n_valid must be [B={B}], got {tuple(n_valid.shape)}")
    BV = _block_v(blocks, B, HV, K, V)
    if (2 * K) % BV:
        raise ValueError(f"block_v={BV} must divide 2K={2 * K} (v's offset in qkv)")
    v_block = lambda b, h, j: (b, 0, h // R, (2 * K + (h % R) * V) // BV + j)  # noqa: E731
    n = jnp.full((B,), T, jnp.int32) if n_valid is None else n_valid.astype(jnp.int32)
    whole = pl.BlockSpec()
    operands = [
        (qkv, pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h // R, 0))),
        (qkv, pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h // R, 1))),
        (qkv, pl.BlockSpec((None, T, None, BV), v_block)),
        (ba, pl.BlockSpec((None, T, None, 2 * R), lambda b, h, j: (b, 0, h // R, 0))),
        (A_log, whole),
        (dt_bias, whole),
        (n, whole),
    ]
    return _decode_call(
        operands,
        (B, T, HV, K, V, BV),
        qkv.dtype,
        None,
        stack,
        state_layer,
        scale=K**-0.5 if scale is None else float(scale),
        l2norm=True,
        output_final_state=True,
        return_all_states=False,
        gates_in_kernel=True,
        num_warps=blocks.num_warps,
        interpret=interpret,
    )


def _block_v(blocks: DecodeBlocks, B: int, HV: int, K: int, V: int) -> int:
    BV = min(blocks.block_v or (64 if B * HV >= 512 else 32), V)
    if V % BV or BV & (BV - 1) or K & (K - 1):
        raise ValueError(f"block_v={BV} must be a power of 2 dividing V={V}; K={K} a power of 2")
    return BV


def _decode_call(
    operands,
    dims,
    o_dtype,
    initial_state,
    stack,
    state_layer,
    *,
    scale,
    l2norm,
    output_final_state,
    return_all_states,
    gates_in_kernel,
    num_warps,
    interpret,
):
    """The decode pallas_call over (B, HV, V // BV): `operands` are (array, BlockSpec) pairs of
    q, k, v and the gate inputs, in the kernel's order; then the state (initial_state [B, HV,
    K, V] or None for zeros, or the stack [L, B, HV, K, V] updated in place at state_layer)."""
    B, T, HV, K, V, BV = dims
    if T < 1:
        raise ValueError(f"T must be >= 1, got T={T}")
    state_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    extra, aliases = [], {}
    if stack is not None:
        L = stack.shape[0]
        state_spec = pl.BlockSpec()  # the whole [L * B, ...] stack: the kernel finds its row
        initial_state = stack.reshape(L * B, HV, K, V)  # merges leading dims: no copy
        extra = [jnp.clip(jnp.asarray(state_layer, jnp.int32), 0, L - 1).reshape(1)]
        aliases = {len(operands): 1}  # the final state is written into the stack's buffer
    elif initial_state is None:
        initial_state = jnp.zeros((B, HV, K, V), jnp.float32)

    out_specs = [pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))]
    out_shape = [jax.ShapeDtypeStruct((B, T, HV, V), o_dtype)]
    if output_final_state:
        out_specs.append(state_spec)
        out_shape.append(jax.ShapeDtypeStruct(initial_state.shape, jnp.float32))
    if return_all_states:
        out_specs.append(pl.BlockSpec((None, T, None, K, BV), lambda b, h, j: (b, 0, h, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((B, T, HV, K, V), jnp.float32))
    kernel = functools.partial(
        _decode_kernel,
        scale=scale,
        l2norm=l2norm,
        n_tokens=T,
        has_final=output_final_state,
        block_v=None if stack is None else BV,
        gates_in_kernel=gates_in_kernel,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(B, HV, V // BV),
        in_specs=[spec for _, spec in operands] + [state_spec] + [pl.BlockSpec() for _ in extra],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="gdn_decode",
    )(*(a for a, _ in operands), initial_state.astype(jnp.float32), *extra)
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
