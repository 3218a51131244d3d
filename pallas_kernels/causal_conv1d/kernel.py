"""Causal depthwise conv1d (+ SiLU) as Pallas (Triton backend) kernels, for prefill with an
initial conv state and for the decode update (T <= 8 new tokens).

Prefill: one program owns `block_t` time rows x `block_c` channels. It loads the block_t + W - 1
input rows it needs one row at a time: rows before the sequence start come from the conv state,
so the caller never concatenates state and input (no extra pass over x), and rows past T are
never stored. The W taps are unrolled; the sum is fp32, as the causal_conv1d CUDA kernel does.

Decode update: one program owns a row's T tokens x `block_c` channels and also writes the new
conv state (the W - 1 inputs ending at the row's last real token), optionally into a stack of
layers' states in place, so a decode step spends no XLA ops on the conv state.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._triton import compiler_params
from pallas_kernels.causal_conv1d.reference import validate_conv_inputs, validate_n_valid


@dataclasses.dataclass(frozen=True)
class ConvBlocks:
    """block_t: time rows per program (prefill); block_c: channels per program (power of 2)."""

    block_t: int = 16
    block_c: int = 256
    num_warps: int = 4


def _conv_kernel(x_ref, w_ref, s0_ref, y_ref, *, block_t: int, activation: str | None):
    # x_ref [T, BC]  w_ref [W, BC]  s0_ref [W-1, BC]  ->  y_ref [T, BC]
    T = x_ref.shape[0]
    W = w_ref.shape[0]
    t0 = pl.program_id(1) * block_t
    taps = [w_ref[j, :].astype(jnp.float32) for j in range(W)]
    rows = []  # x_ext rows t0 - (W-1) .. t0 + block_t - 1, fp32 [BC] each
    for r in range(block_t + W - 1):
        t = t0 + (r - (W - 1))
        from_x = x_ref[jnp.clip(t, 0, T - 1), :].astype(jnp.float32)
        from_state = s0_ref[jnp.clip(t + W - 1, 0, W - 2), :].astype(jnp.float32)
        rows.append(jnp.where(t >= 0, from_x, from_state))
    for i in range(block_t):
        y = taps[0] * rows[i]
        for j in range(1, W):
            y = y + taps[j] * rows[i + j]
        if activation == "silu":
            y = y * jax.nn.sigmoid(y)

        @pl.when(t0 + i < T)
        def _store(i=i, y=y):
            y_ref[t0 + i, :] = y.astype(y_ref.dtype)


def _conv_call(x, weight, state, *, activation, block_t, blocks: ConvBlocks, interpret):
    B, T, C = x.shape
    W = weight.shape[0]
    BC = min(blocks.block_c, C & -C)  # a power of two that divides C (C=384 -> 128)
    if BC & (BC - 1):
        raise ValueError(f"block_c={blocks.block_c} must be a power of 2")
    if W < 2:
        raise ValueError(f"weight must have W >= 2 taps, got shape {tuple(weight.shape)}")
    kernel = functools.partial(_conv_kernel, block_t=block_t, activation=activation)
    return pl.pallas_call(
        kernel,
        grid=(B, pl.cdiv(T, block_t), C // BC),
        in_specs=[
            pl.BlockSpec((None, T, BC), lambda b, n, c: (b, 0, c)),
            pl.BlockSpec((W, BC), lambda b, n, c: (0, c)),
            pl.BlockSpec((None, W - 1, BC), lambda b, n, c: (b, 0, c)),
        ],
        out_specs=pl.BlockSpec((None, T, BC), lambda b, n, c: (b, 0, c)),
        out_shape=jax.ShapeDtypeStruct((B, T, C), x.dtype),
        compiler_params=compiler_params(blocks.num_warps, 1),
        interpret=interpret,
        name="causal_conv1d",
    )(x, weight, state)


def _final_state(x, state):
    """The last W-1 rows of concat(state, x): [B, W-1, C] in x's dtype."""
    Wm1 = state.shape[1]
    if x.shape[1] >= Wm1:
        return x[:, x.shape[1] - Wm1 :]
    return jnp.concatenate([state.astype(x.dtype), x], axis=1)[:, -Wm1:]


def _check_activation(activation):
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")


@functools.partial(jax.jit, static_argnames=("activation", "interpret", "blocks"))
def causal_conv1d(
    x,
    weight,
    initial_state=None,
    *,
    activation="silu",
    interpret=False,
    blocks: ConvBlocks = ConvBlocks(),
):
    """Prefill conv. x [B, T, C], weight [W, C], initial_state [B, W-1, C] or None (zeros).

    Returns (y [B, T, C] in x's dtype, final_state [B, W-1, C]: the last W-1 inputs)."""
    validate_conv_inputs(x, weight, initial_state)
    _check_activation(activation)
    B, T, C = x.shape
    W = weight.shape[0]
    if initial_state is None:
        initial_state = jnp.zeros((B, W - 1, C), x.dtype)
    y = _conv_call(
        x,
        weight,
        initial_state,
        activation=activation,
        block_t=min(blocks.block_t, T),
        blocks=blocks,
        interpret=interpret,
    )
    return y, _final_state(x, initial_state)


def _update_kernel(x_ref, w_ref, s_ref, layer_ref, n_ref, y_ref, out_ref, *, activation):
    # x_ref [T, BC]  w_ref [W, BC], or the whole weight stack [L, W, C]
    # n_ref [B] int32: real tokens per row (left aligned)
    # s_ref, out_ref: the whole state stack [L * B, W-1, C] (one buffer); this program reads
    # and rewrites its [W-1, BC] block at row layer * B + b  ->  y_ref [T, BC]
    T, W = x_ref.shape[0], w_ref.shape[-2]
    b = pl.program_id(0)
    row = layer_ref[0] * pl.num_programs(0) + b
    bc = x_ref.shape[1]
    cols = pl.ds(pl.program_id(1) * bc, bc)
    if len(w_ref.shape) == 3:  # stacked like the state: this layer's taps
        taps = [w_ref[layer_ref[0], j, cols].astype(jnp.float32) for j in range(W)]
    else:
        taps = [w_ref[j, :].astype(jnp.float32) for j in range(W)]
    ext = [s_ref[row, i, cols].astype(jnp.float32) for i in range(W - 1)]
    ext += [x_ref[t, :].astype(jnp.float32) for t in range(T)]  # concat(state, x), fp32 rows
    for t in range(T):
        y = taps[0] * ext[t]
        for j in range(1, W):
            y = y + taps[j] * ext[t + j]
        if activation == "silu":
            y = y * jax.nn.sigmoid(y)
        y_ref[t, :] = y.astype(y_ref.dtype)
    n = n_ref[b]
    for i in range(W - 1):  # new state row i = ext row n + i (n in 0..T: a select chain)
        new = ext[i]
        for c in range(1, T + 1):
            new = jnp.where(n == c, ext[i + c], new)
        out_ref[row, i, cols] = new.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("activation", "interpret", "blocks"))
def causal_conv1d_update(
    x,
    weight,
    state,
    *,
    state_layer=None,
    n_valid=None,
    activation="silu",
    interpret=False,
    blocks: ConvBlocks = ConvBlocks(),
):
    """Decode update for T = 1..8 new tokens. x [B, T, C], weight [W, C], state [B, W-1, C].

    n_valid [B] int32 (None: all T): rows are right-padded, and the new state of row b ends at
    its n_valid[b]-th token (0: unchanged). y is computed for every position.
    With state_layer (an int32 scalar, clamped into [0, L)), state is a stack of layers' conv
    states [L, B, W-1, C], read at state_layer and updated there in place: the returned state is
    the whole stack (inside a scan over layers this keeps the state out of slice copies). The
    weight may then be stacked over the same layers too, [L, W, C] (read at state_layer in
    place: a sliced kernel operand is a copy, which also splits XLA's command buffers).

    Returns (y [B, T, C] in x's dtype, new state [B, W-1, C] or the stack, in state's dtype)."""
    if state is None:
        raise ValueError("state must be given for the decode update")
    stack = state if state_layer is not None else state[None]
    if stack.ndim != 4:
        raise ValueError(
            f"with state_layer, state must be the stack [L, B, W-1, C], got {tuple(state.shape)}"
        )
    stacked_weight = weight.ndim == 3
    if stacked_weight and (state_layer is None or weight.shape[0] != stack.shape[0]):
        raise ValueError(
            f"a weight stack {tuple(weight.shape)} needs state_layer and the state stack's "
            f"layers ({tuple(state.shape)})"
        )
    validate_conv_inputs(x, weight[0] if stacked_weight else weight, stack[0])
    _check_activation(activation)
    B, T, C = x.shape
    if not 1 <= T <= 8:
        raise ValueError(f"causal_conv1d_update takes 1..8 tokens, got x {tuple(x.shape)}")
    validate_n_valid(n_valid, B)
    L, W = stack.shape[0], weight.shape[-2]
    BC = min(blocks.block_c, C & -C)
    if BC & (BC - 1):
        raise ValueError(f"block_c={blocks.block_c} must be a power of 2")
    layer = jnp.clip(jnp.asarray(0 if state_layer is None else state_layer, jnp.int32), 0, L - 1)
    n = jnp.full((B,), T, jnp.int32) if n_valid is None else n_valid.astype(jnp.int32)
    whole = pl.BlockSpec()
    y, new = pl.pallas_call(
        functools.partial(_update_kernel, activation=activation),
        grid=(B, C // BC),
        in_specs=[
            pl.BlockSpec((None, T, BC), lambda b, c: (b, 0, c)),
            whole if stacked_weight else pl.BlockSpec((W, BC), lambda b, c: (0, c)),
            whole,
            whole,
            whole,
        ],
        out_specs=[pl.BlockSpec((None, T, BC), lambda b, c: (b, 0, c)), whole],
        out_shape=[
            jax.ShapeDtypeStruct((B, T, C), x.dtype),
            jax.ShapeDtypeStruct((L * B, W - 1, C), stack.dtype),
        ],
        input_output_aliases={2: 1},  # the state written into its own buffer
        compiler_params=compiler_params(blocks.num_warps, 1),
        interpret=interpret,
        name="causal_conv1d_update",
    )(x, weight, stack.reshape(L * B, W - 1, C), layer.reshape(1), jnp.clip(n, 0, T))
    new = new.reshape(stack.shape)
    return y, (new if state_layer is not None else new[0])
