"""Chunked gated delta rule prefill as Pallas (Triton backend) kernels.

Two kernels, as the chunked form in reference.py splits the work:
  1. `_prep_kernel`, parallel over (batch, value head, chunk): the intra-chunk WY terms
       M = I + strict_tril(beta_i k_i.k_j exp(gamma_i - gamma_j))   [C, C]
       u = M^-1 (beta v)        [C, V]      w = M^-1 (beta exp(gamma) k)   [C, K]
     M^-1 by repeated squaring: M = I + L with L strictly lower (nilpotent), so
       M^-1 = (I - L)(I + L^2)(I + L^4)...(I + L^(C/2))   -- matmuls only, no row loop;
     or (ChunkBlocks.split_inverse) the two diagonal [C/2, C/2] blocks so, and the block
     below them from those.
     It also writes everything else that does not depend on the state, so the sequential pass
     is four matmuls per chunk: qd = q e^gamma, kd = k e^(gamma_C - gamma), attn = tril(q k^T D).
  2. `_state_kernel`, parallel over (batch x segment, value head, V block), sequential over the
     chunks of its segment: v_new = u - w S;  o = qd S + attn v_new;  S = e^gamma_C S + kd^T v_new.
     Products take bf16 operands for bf16 inputs (as fla; fp32 accumulation), TF32 for fp32.

Long single sequences under-fill the GPU (B * HV * V/BV programs), so the sequence can be split
into `num_segments` segments. A segment maps its initial state affinely, S -> P S + Bs, with
P [K, K]. P is found by the same state kernel: append K extra "value" columns with u = 0 and
initial state I (they evolve as P). Pass 1 runs every segment from [0 | I] in parallel; a short
scan over segments gives each segment's true initial state; pass 2 produces o.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._triton import compiler_params
from pallas_kernels.gated_delta_rule.reference import validate_inputs

HIGHEST = jax.lax.Precision.HIGHEST
_L2_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ChunkBlocks:
    """Block sizes. chunk: tokens per chunk (power of 2, >= 16; None: `_auto_chunk`);
    block_v: V columns per program; num_segments: sequence segments run in parallel (None:
    pick from the program count)."""

    chunk: int | None = None
    block_v: int = 64
    # One segment: on an H100 two segments cost +26% at B=1 T=32768 and four +58% at B=1
    # T=8192 (benchmarks/RESULTS.md, run BN); the segmented path stays for num_segments > 1
    # and None.
    num_segments: int | None = 1
    prep_warps: int = 4  # 8 warps: +54% on the prep kernel (run BM)
    state_warps: int = 4
    # The state pass's loads, 3 deep: -11% at B=1 T=8192, -12% at B=1 T=32768 against 2
    # (H100, each timed call on its own inputs; runs BN, BO)
    num_stages: int = 3
    max_programs: int = 132  # num_segments=None: one wave of the H200's 132 SMs ...
    min_chunks: int = 256  # ... and at least this many chunks per segment
    # The output apart from the sequential pass: the pass stores each chunk's starting state
    # and v_new (in the operand dtype, as its products read them), and a kernel parallel over
    # chunks forms o = qd S + attn v_new. The walk over chunks then does two products per
    # chunk, not four, for a [B, HV, T / chunk, K, V] array written and read back. The same
    # products of the same operands as the fused pass (equal outputs in bf16; fp32 within
    # rounding). +24% at B=1 T=8192 on an H100 (run BK): off.
    o_apart: bool = False
    o_block_v: int = 128  # V columns per program of the output kernel
    # The prep kernel inverts M = I + L by halves of the chunk (`_wy_halves`): its squarings,
    # most of its TF32 work, on [C/2, C/2] blocks (a quarter of the products, one round
    # fewer). Not yet timed on a GPU: off.
    split_inverse: bool = False


def _inv_norm(x):  # [C, K] -> [C] fp32: 1 / |row|, as reference.l2norm scales rows
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.sum(xf * xf, axis=1) + _L2_EPS)


def _tri(c: int, strict: bool):
    i = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return i > j if strict else i >= j


def _decay_matrix(g_rows, g_cols, mask=None):
    """D_ij = exp(gamma_i - gamma_j) where mask (lower triangle), else 0; masked before exp.
    mask None: the block lies wholly below the diagonal (gamma_i <= gamma_j, no overflow)."""
    diff = g_rows[:, None] - g_cols[None, :]
    if mask is None:
        return jnp.exp(diff)
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _dot(a, b):  # fp32 accumulate; fp32 operands run as TF32 on the GPU
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a^T b
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):  # a b^T
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _unit_lower_inverse(lower):
    """(I + L)^-1 for L [n, n] strictly lower (nilpotent, L^n = 0) by repeated squaring:
    (I - L)(I + L^2)(I + L^4)...(I + L^(n/2)), matmuls only."""
    n = lower.shape[0]
    minv = jnp.where(_tri(n, strict=False) & ~_tri(n, strict=True), 1.0, 0.0) - lower
    power, m = lower, 2
    while m < n:
        power = _dot(power, power)
        minv = minv + _dot(minv, power)
        m *= 2
    return minv


def _lower_block(ka, kb, ra, rb, ga, gb, beta_a, mask=None):
    """Block of L: beta_i (k_i . k_j) / (|k_i| |k_j|) exp(gamma_i - gamma_j) at rows a, columns b
    (mask as `_decay_matrix`'s)."""
    kk = _dot_nt(ka, kb) * ra[:, None] * rb[None, :]
    return beta_a[:, None] * kk * _decay_matrix(ga, gb, mask)


def _prep_kernel(
    q_ref,
    k_ref,
    v_ref,
    gam_ref,
    beta_ref,
    w_ref,
    u_ref,
    qd_ref,
    kd_ref,
    attn_ref,
    *,
    scale: float,
    l2norm: bool,
    split_inverse: bool,
):
    # q_ref, k_ref [C, K]  v_ref [C, V] in the operand dtype  gam_ref, beta_ref [C] fp32
    # -> w_ref, qd_ref, kd_ref [C, K], u_ref [C, V], attn_ref [C, C] (all in the operand dtype)
    #
    # The l2 norm, the query scale, beta and the decays all scale rows of q, k or v. The
    # products take q, k, v as loaded and the row scales go onto the [C, C] results (or into
    # M^-1's columns), so no fp32 [C, K] copy of q, k or v stays live in registers.
    c = k_ref.shape[0]
    cdt = u_ref.dtype  # operand dtype of the tensor-core products
    inv_norm = _inv_norm if l2norm else lambda x: jnp.ones((x.shape[0],), jnp.float32)
    q, k = q_ref[...], k_ref[...]
    rq, rk = inv_norm(q) * scale, inv_norm(k)
    gam = gam_ref[...]
    if split_inverse:
        _wy_halves(k_ref, v_ref, gam_ref, beta_ref, w_ref, u_ref, inv_norm)
    else:
        _wy_whole(k, rk, gam, beta_ref[...], v_ref, w_ref, u_ref)
    # Everything the sequential pass needs that does not depend on the state:
    g_last = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1, gam, 0.0))
    attn = _dot_nt(q, k) * rq[:, None] * rk[None, :] * _decay_matrix(gam, gam, _tri(c, False))
    attn_ref[...] = attn.astype(cdt)  # tril(q k^T D)
    qd_scale = rq * jnp.exp(gam)  # reads the chunk-start state
    qd_ref[...] = (q.astype(jnp.float32) * qd_scale[:, None]).astype(cdt)
    kd_scale = rk * jnp.exp(g_last - gam)  # writes the chunk-end state
    kd_ref[...] = (k.astype(jnp.float32) * kd_scale[:, None]).astype(cdt)


def _wy_whole(k, rk, gam, beta, v_ref, w_ref, u_ref):
    """u = M^-1 diag(beta) v,  w = M^-1 diag(beta e^gamma / |k|) k, M^-1 of the whole chunk."""
    cdt = u_ref.dtype
    minv = _unit_lower_inverse(_lower_block(k, k, rk, rk, gam, gam, beta, _tri(k.shape[0], True)))
    u_ref[...] = _dot((minv * beta[None, :]).astype(cdt), v_ref[...]).astype(cdt)
    w_scale = beta * jnp.exp(gam) * rk
    w_ref[...] = _dot((minv * w_scale[None, :]).astype(cdt), k).astype(cdt)


def _wy_halves(k_ref, v_ref, gam_ref, beta_ref, w_ref, u_ref, inv_norm):
    """The same u and w with M = [[I + L11, 0], [L21, I + L22]] inverted by halves:
    M^-1 = [[A, 0], [X, D]], A = (I + L11)^-1, D = (I + L22)^-1, X = -D L21 A. The squarings
    run on [C/2, C/2] blocks: a quarter of the whole chunk's products, one round fewer."""
    cdt = u_ref.dtype
    h = k_ref.shape[0] // 2
    top, bot = pl.ds(0, h), pl.ds(h, h)
    k1, k2 = k_ref[top, :], k_ref[bot, :]
    r1, r2 = inv_norm(k1), inv_norm(k2)
    g1, g2 = gam_ref[top], gam_ref[bot]
    b1, b2 = beta_ref[top], beta_ref[bot]
    strict = _tri(h, strict=True)
    a = _unit_lower_inverse(_lower_block(k1, k1, r1, r1, g1, g1, b1, strict))
    d = _unit_lower_inverse(_lower_block(k2, k2, r2, r2, g2, g2, b2, strict))
    x = -_dot(_dot(d, _lower_block(k2, k1, r2, r1, g2, g1, b2)), a)

    def rows(cols1, cols2, y1, y2):  # [cols1 | cols2] of M^-1 with column scales, times y
        top_rows = _dot((a * cols1[None, :]).astype(cdt), y1)
        bot_rows = _dot((x * cols1[None, :]).astype(cdt), y1) + _dot(
            (d * cols2[None, :]).astype(cdt), y2
        )
        return top_rows.astype(cdt), bot_rows.astype(cdt)

    u_ref[top, :], u_ref[bot, :] = rows(b1, b2, v_ref[top, :], v_ref[bot, :])
    w_ref[top, :], w_ref[bot, :] = rows(b1 * jnp.exp(g1) * r1, b2 * jnp.exp(g2) * r2, k1, k2)


def _state_kernel(
    qd_ref,
    kd_ref,
    w_ref,
    u_ref,
    attn_ref,
    gam_ref,
    h0_ref,
    *out_refs,
    chunk: int,
    n_v_blocks: int,
    write_o: bool,
    write_h: bool,
):
    # qd_ref, kd_ref, w_ref [Ts, K]  u_ref [Ts, BV]  attn_ref [Ts, C]  gam_ref [Ts] fp32
    # h0_ref [K, BV] fp32.  out: o_ref [Ts, BV] (when write_o), or (when write_h) hs_ref
    # [Ts / C, K, BV] and vn_ref [Ts, BV], each chunk's starting state and v_new in the
    # operand dtype; then ht_ref [K, BV] fp32
    ht_ref = out_refs[-1]
    o_ref = out_refs[0] if write_o else None
    hs_ref, vn_ref = (out_refs[0], out_refs[1]) if write_h else (None, None)
    cdt = u_ref.dtype
    n_chunks = qd_ref.shape[0] // chunk
    # Programs past the real V blocks carry the transition columns: their u is zero.
    u_on = (pl.program_id(2) < n_v_blocks).astype(jnp.float32)

    def body(n, s):  # s [K, BV] fp32: state before chunk n
        start = pl.multiple_of(n * chunk, chunk)
        rows = pl.ds(start, chunk)
        decay = jnp.exp(gam_ref[start + chunk - 1])  # whole-chunk decay
        s_c = s.astype(cdt)
        v_new = u_ref[rows, :].astype(jnp.float32) * u_on - _dot(w_ref[rows, :], s_c)
        v_c = v_new.astype(cdt)  # [C, BV]
        if write_o:
            o = _chunk_output(qd_ref[rows, :], s_c, attn_ref[rows, :], v_c)
            o_ref[rows, :] = o.astype(o_ref.dtype)
        if write_h:
            hs_ref[n] = s_c
            vn_ref[rows, :] = v_c
        return s * decay + _dot_tn(kd_ref[rows, :], v_c)

    ht_ref[...] = jax.lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(jnp.float32))


def _chunk_output(qd, s_c, attn, v_c):
    """o = qd S + attn v_new for one chunk: [C, K] x [K, BV] + [C, C] x [C, BV], fp32."""
    return _dot(qd, s_c) + _dot(attn, v_c)


def _output_kernel(qd_ref, hs_ref, attn_ref, vn_ref, o_ref):
    # qd_ref [C, K]  hs_ref [K, BV]  attn_ref [C, C]  vn_ref [C, BV]  ->  o_ref [C, BV]
    o = _chunk_output(qd_ref[...], hs_ref[...], attn_ref[...], vn_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)


def _output_pass(prep, hs, vn, *, blocks, o_dtype, interpret):
    """o [B, Tp, HV, V] from each chunk's starting state hs [B, HV, Tp / C, K, V] and v_new
    vn [B, HV, Tp, V], parallel over (batch, value head, chunk, V block)."""
    _, _, qd, _, attn = prep
    B, HV, Tp, K = qd.shape
    V, C = vn.shape[3], attn.shape[3]
    BV = min(blocks.o_block_v, V)
    if V % BV or BV & (BV - 1):
        raise ValueError(f"o_block_v={blocks.o_block_v} must be a power of 2 dividing V={V}")
    return pl.pallas_call(
        _output_kernel,
        grid=(B, HV, Tp // C, V // BV),
        in_specs=[
            pl.BlockSpec((None, None, C, K), lambda b, h, n, j: (b, h, n, 0)),
            pl.BlockSpec((None, None, None, K, BV), lambda b, h, n, j: (b, h, n, 0, j)),
            pl.BlockSpec((None, None, C, C), lambda b, h, n, j: (b, h, n, 0)),
            pl.BlockSpec((None, None, C, BV), lambda b, h, n, j: (b, h, n, j)),
        ],
        out_specs=pl.BlockSpec((None, C, None, BV), lambda b, h, n, j: (b, n, h, j)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, HV, V), o_dtype),
        compiler_params=compiler_params(blocks.prep_warps, 1),
        interpret=interpret,
        name="gdn_chunk_output",
    )(qd, hs, attn, vn)


def _prep(q, k, v, gam, beta, *, R, scale, blocks, l2norm, interpret):
    """-> w, qd, kd [B, HV, Tp, K], u [B, HV, Tp, V], attn [B, HV, Tp, C] in v's dtype."""
    B, Tp, _, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    C = blocks.chunk
    kernel = functools.partial(
        _prep_kernel, scale=scale, l2norm=l2norm, split_inverse=blocks.split_inverse
    )
    per_head = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n: (b, h, n, 0))
    shape = lambda d: jax.ShapeDtypeStruct((B, HV, Tp, d), v.dtype)
    return pl.pallas_call(
        kernel,
        grid=(B, HV, Tp // C),
        in_specs=[
            pl.BlockSpec((None, C, None, K), lambda b, h, n: (b, n, h // R, 0)),
            pl.BlockSpec((None, C, None, K), lambda b, h, n: (b, n, h // R, 0)),
            pl.BlockSpec((None, C, None, V), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, None, C), lambda b, h, n: (b, h, n)),
            pl.BlockSpec((None, None, C), lambda b, h, n: (b, h, n)),
        ],
        out_specs=[per_head(K), per_head(V), per_head(K), per_head(K), per_head(C)],
        out_shape=[shape(K), shape(V), shape(K), shape(K), shape(C)],
        compiler_params=compiler_params(blocks.prep_warps, blocks.num_stages),
        interpret=interpret,
        name="gdn_chunk_prep",
    )(q, k, v, gam, beta)


def _state_pass(prep, gam, h0, *, NS, blocks, write_o, o_dtype, interpret):
    """Sequential pass over the chunks of each of NS segments.

    h0 [B*NS, HV, K, Vh] fp32 (Vh = V, or V + K with the transition columns). Returns
    (o [B, Tp, HV, V] or None, final [B*NS, HV, K, Vh] fp32). With blocks.o_apart the pass
    stores each chunk's starting state and v_new instead of o, and `_output_pass` forms o."""
    w, u, qd, kd, attn = prep
    B, HV, Tp, K = w.shape
    V, C = u.shape[3], attn.shape[3]
    Vh = h0.shape[-1]
    BV = blocks.block_v
    Ts = Tp // NS
    NV = V // BV
    grid = (B * NS, HV, Vh // BV)

    write_h = write_o and blocks.o_apart
    kernel = functools.partial(
        _state_kernel,
        chunk=blocks.chunk,
        n_v_blocks=NV,
        write_o=write_o and not write_h,
        write_h=write_h,
    )
    seg = lambda d: pl.BlockSpec((None, None, Ts, d), lambda i, h, j: (i // NS, h, i % NS, 0))
    in_specs = [
        seg(K),
        seg(K),
        seg(K),
        pl.BlockSpec(
            (None, None, Ts, BV), lambda i, h, j: (i // NS, h, i % NS, jnp.minimum(j, NV - 1))
        ),
        seg(C),
        pl.BlockSpec((None, None, Ts), lambda i, h, j: (i // NS, h, i % NS)),
        pl.BlockSpec((None, None, K, BV), lambda i, h, j: (i, h, 0, j)),
    ]
    out_specs = [pl.BlockSpec((None, None, K, BV), lambda i, h, j: (i, h, 0, j))]
    out_shape = [jax.ShapeDtypeStruct((B * NS, HV, K, Vh), jnp.float32)]
    if write_h:  # each chunk's starting state [B, HV, Tp / C, K, V] and v_new [B, HV, Tp, V]
        Ns = Ts // C
        out_specs[:0] = [
            pl.BlockSpec((None, None, Ns, K, BV), lambda i, h, j: (i // NS, h, i % NS, 0, j)),
            pl.BlockSpec((None, None, Ts, BV), lambda i, h, j: (i // NS, h, i % NS, j)),
        ]
        out_shape[:0] = [
            jax.ShapeDtypeStruct((B, HV, Tp // C, K, V), u.dtype),
            jax.ShapeDtypeStruct((B, HV, Tp, V), u.dtype),
        ]
    elif write_o:
        out_specs.insert(
            0, pl.BlockSpec((None, Ts, None, BV), lambda i, h, j: (i // NS, i % NS, h, j))
        )
        out_shape.insert(0, jax.ShapeDtypeStruct((B, Tp, HV, V), o_dtype))
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(blocks.state_warps, blocks.num_stages),
        interpret=interpret,
        name="gdn_chunk_state" if write_o else "gdn_chunk_transition",
    )(qd, kd, w, u, attn, gam, h0)
    if write_h:
        hs, vn, final = outs
        o = _output_pass(prep, hs, vn, blocks=blocks, o_dtype=o_dtype, interpret=interpret)
        return o, final
    return (outs[0], outs[1]) if write_o else (None, outs[0])


def _num_segments(B, HV, V, N, blocks: ChunkBlocks) -> int:
    """Segments double the work of the state pass (pass 1 also carries P [K, K]) to gain
    parallelism, so split only while the programs fill less than one wave of SMs and each
    segment keeps min_chunks chunks (num_segments=None). Timed with every call on the same
    inputs, 2 segments looked faster at B=1 T=32768 on the H200; timed with each call on its
    own inputs on an H100 they are slower (benchmarks/RESULTS.md, run BN), hence one."""
    if blocks.num_segments is not None:
        return max(1, min(blocks.num_segments, N))
    ns, programs = 1, B * HV * (V // blocks.block_v)
    while programs * ns * 2 <= blocks.max_programs and N // (2 * ns) >= blocks.min_chunks:
        ns *= 2
    return ns


def _auto_chunk(B, HV, V, block_v) -> int:
    """64 while the state pass has fewer than 256 programs, else 32. A shorter chunk halves
    the prep kernel's [C, C] work, which pays once the sequential pass has programs enough to
    fill the GPU (H100, runs BN, BO: chunk 32 at B=4 T=8192 -19%, B=2 +1%, B=1 +13%)."""
    return 64 if B * HV * (V // block_v) < 256 else 32


def _check_blocks(K, V, blocks: ChunkBlocks):
    C, BV = blocks.chunk, blocks.block_v
    if C < 16 or C & (C - 1):
        raise ValueError(f"chunk must be a power of 2 >= 16, got {C}")
    if V % BV or K % BV or BV & (BV - 1):
        raise ValueError(f"block_v={BV} must be a power of 2 dividing V={V} and K={K}")
    if blocks.split_inverse and C < 32:
        raise ValueError(f"split_inverse needs chunk >= 32 (halves >= 16 rows), got chunk {C}")
    if K & (K - 1) or V & (V - 1) or K < 16:
        raise ValueError(f"K={K} and V={V} must be powers of 2 >= 16 for the Triton kernels")


@functools.partial(
    jax.jit,
    static_argnames=("scale", "output_final_state", "use_qk_l2norm", "interpret", "blocks"),
)
def chunk_gated_delta_rule(
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
    interpret=False,
    blocks: ChunkBlocks = ChunkBlocks(),
):
    """Chunked gated delta rule (prefill), Pallas kernels.

    Args:
      q, k: [B, T, H, K]; v: [B, T, HV, V] (HV a multiple of H; value head j reads key head
        j // (HV // H)); g: [B, T, HV] log-decay; beta: [B, T, HV].
      scale: query scale, default K**-0.5. initial_state: [B, HV, K, V] or None (zeros).
      use_qk_l2norm: l2-normalise q and k inside the kernels (eps 1e-6).
    Returns:
      o [B, T, HV, V] in v's dtype, and the final state [B, HV, K, V] fp32 (None unless
      output_final_state).
    """
    H, R = validate_inputs(q, k, v, g, beta, initial_state)
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if T < 1:
        raise ValueError(f"T must be >= 1, got q {tuple(q.shape)}")
    # block_v is capped at the largest power of 2 dividing K and V (small test heads)
    blocks = dataclasses.replace(blocks, block_v=min(blocks.block_v, K & -K, V & -V))
    if blocks.chunk is None:
        blocks = dataclasses.replace(blocks, chunk=_auto_chunk(B, HV, V, blocks.block_v))
    _check_blocks(K, V, blocks)
    scale = K**-0.5 if scale is None else float(scale)
    C = blocks.chunk
    NS = _num_segments(B, HV, V, -(-T // C), blocks)
    Tp = -(-T // (C * NS)) * C * NS
    out_dtype = v.dtype
    cdt = v.dtype if v.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32

    def pad_t(x):  # zero tokens are exact no-ops: g = 0 (no decay), beta = 0 (no write)
        return jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))

    q, k, v = pad_t(q.astype(cdt)), pad_t(k.astype(cdt)), pad_t(v.astype(cdt))
    # [B, HV, Tp] fp32: chunk-local cumulative log decay, and beta.
    g = pad_t(g.astype(jnp.float32)).transpose(0, 2, 1)
    gam = jnp.cumsum(g.reshape(B, HV, Tp // C, C), axis=-1).reshape(B, HV, Tp)
    beta = pad_t(beta.astype(jnp.float32)).transpose(0, 2, 1)

    prep = _prep(
        q,
        k,
        v,
        gam,
        beta,
        R=R,
        scale=scale,
        blocks=blocks,
        l2norm=use_qk_l2norm,
        interpret=interpret,
    )
    if initial_state is None:
        s0 = jnp.zeros((B, HV, K, V), jnp.float32)
    else:
        s0 = initial_state.astype(jnp.float32)
    common = dict(NS=NS, blocks=blocks, o_dtype=out_dtype, interpret=interpret)
    if NS == 1:
        o, final = _state_pass(prep, gam, s0, write_o=True, **common)
    else:
        # Pass 1: every segment from [0 | I] -> [Bs | P] (S_end = P S_start + Bs).
        eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B * NS, HV, K, K))
        aug0 = jnp.concatenate([jnp.zeros((B * NS, HV, K, V), jnp.float32), eye], axis=-1)
        _, aug = _state_pass(prep, gam, aug0, write_o=False, **common)
        aug = aug.reshape(B, NS, HV, K, V + K)

        def step(s, seg):  # s [B, HV, K, V]: state entering this segment
            bs, p = seg[..., :V], seg[..., V:]
            return jnp.einsum("bhij,bhjv->bhiv", p, s, precision=HIGHEST) + bs, s

        final, starts = jax.lax.scan(step, s0, jnp.moveaxis(aug, 1, 0))
        starts = jnp.moveaxis(starts, 0, 1).reshape(B * NS, HV, K, V)
        o, _ = _state_pass(prep, gam, starts, write_o=True, **common)
    o = o[:, :T]
    return o, (final if output_final_state else None)
