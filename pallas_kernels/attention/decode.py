"""Decode attention over a KV cache, split along the sequence (flash decoding).

A decode step (T = 1..8 queries per sequence: one token, or a speculative verify pass) reads
the whole cache row once: memory-bound. One program owns one (sequence, KV head, split): the
T * G query rows of its KV head (G = H // KVH, never repeated K/V) against its slice of keys,
with an online softmax in fp32. Splits let a single long sequence use every SM; a few XLA ops
then merge the splits by their log-sum-exps.

The cache may be the stack of all layers [L, B, S, KVH, D] with the layer's index: the kernel
reads the layer in place (a slice of the stack as a kernel operand would be copied first).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._triton import MIN_DOT, compiler_params
from pallas_kernels.attention.reference import validate_decode_attention


@dataclasses.dataclass(frozen=True)
class DecodeAttentionBlocks:
    """block_s: keys per loop step (a power of 2 >= 16 dividing S; capped at the largest such
    divisor); num_splits: key splits per (sequence, KV head); None picks enough for ~2 waves
    of the H200's 132 SMs, each split at least one block."""

    block_s: int = 64
    num_splits: int | None = None
    target_programs: int = 264
    num_warps: int = 4
    num_stages: int = 2


def _kernel(
    q_ref, pos_ref, layer_ref, k_ref, v_ref, o_ref, lse_ref, *, batch, split, block_s, scale
):
    # q_ref [R, D] the query rows of one (sequence, KV head); pos_ref [R] int32 their positions
    # (< 0: padding, sees nothing); layer_ref [1] int32; k_ref, v_ref the whole cache
    # [L * B, S, KVH, D]. out: o_ref [R, D] fp32 (normalised over this split's keys) and
    # lse_ref [R] fp32 (-inf where the split held no visible key).
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = layer_ref[0] * batch + b
    q = q_ref[...]
    pos = pos_ref[...]
    start = sp * split
    # keys past the last query's position are seen by no query
    stop = jnp.minimum(jnp.minimum(start + split, jnp.max(pos) + 1), k_ref.shape[1])
    n_blocks = jnp.maximum(stop - start + block_s - 1, 0) // block_s

    def body(i, carry):
        m, l, acc = carry
        s0 = pl.multiple_of(start + i * block_s, block_s)
        k = k_ref[row, pl.ds(s0, block_s), h, :]  # [BS, D]
        v = v_ref[row, pl.ds(s0, block_s), h, :]
        s = jax.lax.dot_general(
            q, k.astype(q.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        keys = s0 + jnp.arange(block_s)
        s = jnp.where(keys[None, :] <= pos[:, None], s * scale, -jnp.inf)  # [R, BS]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        base = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
        p = jnp.exp(s - base[:, None])
        alpha = jnp.exp(m - base)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(
            p.astype(q.dtype), v.astype(q.dtype), preferred_element_type=jnp.float32
        )
        return m_new, l, acc

    R, D = q.shape
    init = (
        jnp.full((R,), -jnp.inf, jnp.float32),
        jnp.zeros((R,), jnp.float32),
        jnp.zeros((R, D), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    seen = l > 0
    o_ref[...] = acc / jnp.where(seen, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "blocks"))
def decode_attention(
    q,
    k_cache,
    v_cache,
    q_pos,
    *,
    layer=None,
    scale=None,
    interpret=False,
    blocks: DecodeAttentionBlocks = DecodeAttentionBlocks(),
):
    """As `decode_attention_ref`: q [B, T, H, D]; k_cache, v_cache [B, S, KVH, D] or the layer
    stack [L, B, S, KVH, D] with `layer` (an int32 scalar, clamped into [0, L)); q_pos [B, T]
    (query t sees keys s <= q_pos[b, t]). Returns o [B, T, H, D] in q's dtype. S must be a
    multiple of 16."""
    L, S, KVH = validate_decode_attention(q, k_cache, v_cache, q_pos, layer)
    B, T, H, D = q.shape
    G = H // KVH
    BS = min(blocks.block_s, S & -S)
    if blocks.block_s < MIN_DOT or blocks.block_s & (blocks.block_s - 1) or BS < MIN_DOT:
        raise ValueError(
            f"block_s={blocks.block_s} must be a power of 2 >= {MIN_DOT}, and the cache length "
            f"S={S} a multiple of {MIN_DOT}"
        )
    if D < MIN_DOT or D & (D - 1):
        raise ValueError(f"head dim D={D} must be a power of 2 >= {MIN_DOT}")
    n_blocks = S // BS
    NS = blocks.num_splits or max(1, blocks.target_programs // (B * KVH))
    NS = max(1, min(NS, n_blocks))
    split = -(-n_blocks // NS) * BS  # keys per split, whole blocks
    NS = -(-S // split)

    # query rows per (sequence, KV head): t * G + g, padded to a power of 2 >= 16
    R = max(MIN_DOT, pl.next_power_of_2(T * G))
    rows = q.reshape(B, T, KVH, G, D).transpose(0, 2, 1, 3, 4).reshape(B, KVH, T * G, D)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, R - T * G), (0, 0)))
    pos = jnp.repeat(q_pos.astype(jnp.int32), G, axis=1)  # [B, T * G]
    pos = jnp.pad(pos, ((0, 0), (0, R - T * G)), constant_values=-1)
    layer = jnp.zeros((1,), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
    layer = jnp.clip(layer, 0, L - 1).reshape(1)
    k_flat, v_flat = (c.reshape(L * B, S, KVH, D) for c in (k_cache, v_cache))  # no copy

    whole = pl.BlockSpec()
    o, lse = pl.pallas_call(
        functools.partial(
            _kernel, batch=B, split=split, block_s=BS, scale=D**-0.5 if scale is None else scale
        ),
        grid=(B, KVH, NS),
        in_specs=[
            pl.BlockSpec((None, None, R, D), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, R), lambda b, h, s: (b, 0)),
            whole,
            whole,
            whole,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, R, D), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, R), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, KVH, NS, R, D), jnp.float32),
            jax.ShapeDtypeStruct((B, KVH, NS, R), jnp.float32),
        ],
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="attention_decode",
    )(rows, pos, layer, k_flat, v_flat)

    # merge the splits: softmax weights from their log-sum-exps
    top = jnp.max(lse, axis=2, keepdims=True)
    w = jnp.exp(lse - jnp.where(top == -jnp.inf, 0.0, top))  # [B, KVH, NS, R]; 0 where unseen
    total = jnp.sum(w, axis=2)
    out = jnp.sum(o * w[..., None], axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    out = out[:, :, : T * G].reshape(B, KVH, T, G, D).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, T, H, D).astype(q.dtype)
