"""Pure-jnp references for the gated delta rule: the spec the Pallas kernels are checked against.

Shapes (value head j reads key head j // (HV // H); no repeated copy of q/k is built):
  q, k   [B, T, H, K]       v  [B, T, HV, V]
  g      [B, T, HV]  log-decay (alpha_t = exp(g_t)), fp32
  beta   [B, T, HV]  write strength in (0, 1)
  state  [B, HV, K, V] fp32, K-major as in HF / fla.

Recurrence per (batch, value head), all in fp32:
  S   = S * exp(g_t)                 # 1) decay first
  d   = beta_t * (v_t - S^T k_t)     # 2) delta against the decayed state
  S   = S + k_t d^T                  # 3) rank-1 write
  o_t = S^T (scale * q_t)            # 4) read after the write
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x * rsqrt(sum(x^2) + eps) over the last axis, fp32 (eps inside the root, as fla)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def validate_inputs(q, k, v, g, beta, initial_state=None) -> tuple[int, int]:
    """Check the shape contract; returns (H, HV // H). Raises ValueError naming the argument."""
    for name, x, rank in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3), ("beta", beta, 3)):
        if x.ndim != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q {q.shape} and k {k.shape}")
    B, T, H, K = q.shape
    if v.shape[:2] != (B, T):
        raise ValueError(
            f"v must be [B={B}, T={T}, HV, V], got {tuple(v.shape)} (q {tuple(q.shape)})"
        )
    HV = v.shape[2]
    if HV % H:
        raise ValueError(f"v heads HV={HV} must be a multiple of q/k heads H={H} (v {v.shape})")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}, got {tuple(x.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    if initial_state is not None and initial_state.shape != (B, HV, K, v.shape[3]):
        raise ValueError(
            f"initial_state must be [B, HV, K, V] = {(B, HV, K, v.shape[3])}, "
            f"got {tuple(initial_state.shape)}"
        )
    return H, HV // H


def _prepare(q, k, v, g, beta, scale, initial_state, use_qk_l2norm):
    """fp32 inputs grouped by key head: v-like arrays get an [H, R] head split."""
    H, R = validate_inputs(q, k, v, g, beta, initial_state)
    B, T, _, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    v = v.astype(jnp.float32).reshape(B, T, H, R, V)
    g = g.astype(jnp.float32).reshape(B, T, H, R)
    beta = beta.astype(jnp.float32).reshape(B, T, H, R)
    if initial_state is None:
        s0 = jnp.zeros((B, H, R, K, V), jnp.float32)
    else:
        s0 = initial_state.astype(jnp.float32).reshape(B, H, R, K, V)
    return q, k, v, g, beta, s0


def recurrent_gated_delta_rule(
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
):
    """Token-by-token recurrence. Returns (o [B,T,HV,V] in v.dtype, final state or None),
    plus the state after every position [B, T, HV, K, V] when return_all_states."""
    B, T, HV, V = v.shape
    out_dtype = v.dtype
    q, k, v, g, beta, s0 = _prepare(q, k, v, g, beta, scale, initial_state, use_qk_l2norm)

    def step(s, xs):  # s [B,H,R,K,V]
        q_t, k_t, v_t, g_t, b_t = xs  # [B,H,K] [B,H,K] [B,H,R,V] [B,H,R] [B,H,R]
        s = s * jnp.exp(g_t)[..., None, None]
        kv = jnp.einsum("bhk,bhrkv->bhrv", k_t, s, precision=HIGHEST)
        d = b_t[..., None] * (v_t - kv)
        s = s + jnp.einsum("bhk,bhrv->bhrkv", k_t, d, precision=HIGHEST)
        o_t = jnp.einsum("bhk,bhrkv->bhrv", q_t, s, precision=HIGHEST)
        return s, (o_t, s if return_all_states else None)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    s, (o, all_s) = jax.lax.scan(step, s0, xs)
    o = jnp.moveaxis(o, 0, 1).reshape(B, T, HV, V).astype(out_dtype)
    final = s.reshape(B, HV, *s.shape[-2:]) if output_final_state else None
    if return_all_states:
        all_s = jnp.moveaxis(all_s, 0, 1).reshape(B, T, HV, *s.shape[-2:])
        return o, final, all_s
    return o, final


def unit_lower_inverse(m: jax.Array) -> jax.Array:
    """Inverse of unit lower-triangular matrices m [..., C, C], by doubling the block size:
    the inverse of [[A, 0], [X, D]] is [[A^-1, 0], [-D^-1 X A^-1, D^-1]], so log2(C) rounds
    of batched matmuls, no LAPACK call. (jax.scipy.linalg.solve_triangular is a LAPACK custom
    call on the CPU whose batch loop waits on XLA's intra-op thread pool: two such calls
    running at once on a 2-thread pool each wait for the other's thread, forever.)"""
    C, batch = m.shape[-1], m.shape[:-2]
    P = 1 << max(C - 1, 0).bit_length()  # padded to a power of 2 with an identity block
    if P != C:
        pad = jnp.zeros((*batch, P, P), m.dtype).at[..., :C, :C].set(m)
        m = pad + jnp.diag(jnp.arange(P) >= C).astype(m.dtype)
    tiles = jnp.ones((*batch, P, 1, 1), m.dtype)  # inverses of the 1 x 1 diagonal blocks
    s = 1
    while s < P:  # tiles: the inverses of the P / s diagonal blocks of size s
        nb = P // (2 * s)
        blocks = m.reshape(*batch, nb, 2, s, nb, 2, s)
        x = jnp.diagonal(blocks, axis1=-6, axis2=-3)[..., 1, :, 0, :, :]  # [..., s, s, nb]
        x = jnp.moveaxis(x, -1, -3)  # [..., nb, s, s]: block (2j+1, 2j)
        a, d = tiles[..., 0::2, :, :], tiles[..., 1::2, :, :]
        off = -jnp.einsum("...ij,...jk,...kl->...il", d, x, a, precision=HIGHEST)
        top = jnp.concatenate([a, jnp.zeros_like(off)], axis=-1)
        tiles = jnp.concatenate([top, jnp.concatenate([off, d], axis=-1)], axis=-2)
        s *= 2
    return tiles[..., 0, :C, :C]


def chunk_gated_delta_rule_ref(
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
    chunk_size=64,
):
    """Chunked WY form (the algorithm the prefill kernels implement), fp32 at HIGHEST precision.

    Within a chunk of C tokens with cumulative log-decay gamma:
      D_ij = exp(gamma_i - gamma_j) for i >= j (upper triangle masked BEFORE exp: it overflows)
      M    = I + strict_tril(beta_i k_i.k_j D_ij)      (unit lower triangular)
      U    = M^-1 (beta v),  W = M^-1 (beta k exp(gamma))
    then across chunks, sequentially:
      v_new = U - W S;  o = (q exp(gamma)) S + tril(q k^T D) v_new
      S     = exp(gamma_C) S + (k exp(gamma_C - gamma))^T v_new
    Zero padding of the tail (g = beta = 0) is an exact no-op on the state.
    """
    B, T, HV, V = v.shape
    out_dtype = v.dtype
    q, k, v, g, beta, s0 = _prepare(q, k, v, g, beta, scale, initial_state, use_qk_l2norm)
    H, R, K = k.shape[2], v.shape[3], k.shape[3]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T

    def chunks(x):  # [B, T, ...] -> [B, N, C, ...] zero-padded
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(B, N, C, *x.shape[2:])

    q, k, v, g, beta = map(chunks, (q, k, v, g, beta))
    gamma = jnp.cumsum(g, axis=2)  # [B,N,C,H,R]
    gamma = jnp.moveaxis(gamma, 2, -1)  # [B,N,H,R,C]
    causal = jnp.tril(jnp.ones((C, C), bool))
    diff = gamma[..., :, None] - gamma[..., None, :]  # [B,N,H,R,C,C]
    decay = jnp.exp(jnp.where(causal, diff, -jnp.inf))

    kk = jnp.einsum("bnihk,bnjhk->bnhij", k, k, precision=HIGHEST)[:, :, :, None]
    qk = jnp.einsum("bnihk,bnjhk->bnhij", q, k, precision=HIGHEST)[:, :, :, None]
    beta_c = jnp.moveaxis(beta, 2, -1)  # [B,N,H,R,C]
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    m = jnp.eye(C) + jnp.where(strict, beta_c[..., :, None] * kk * decay, 0.0)

    v_c = jnp.moveaxis(v, 2, -2)  # [B,N,H,R,C,V]
    k_c = jnp.moveaxis(k, 2, -2)[:, :, :, None]  # [B,N,H,1,C,K]
    q_c = jnp.moveaxis(q, 2, -2)[:, :, :, None]
    m_inv = unit_lower_inverse(m)
    solve = lambda rhs: jnp.einsum("...ij,...jd->...id", m_inv, rhs, precision=HIGHEST)
    u = solve(beta_c[..., None] * v_c)  # [B,N,H,R,C,V]
    w = solve(beta_c[..., None] * k_c * jnp.exp(gamma)[..., None])  # [B,N,H,R,C,K]
    attn = qk * decay  # [B,N,H,R,C,C]
    g_last = gamma[..., -1]  # [B,N,H,R]

    def step(s, xs):  # s [B,H,R,K,V]
        u_n, w_n, q_n, k_n, attn_n, gam_n, glast_n = xs
        v_new = u_n - jnp.einsum("bhrck,bhrkv->bhrcv", w_n, s, precision=HIGHEST)
        q_dec = q_n * jnp.exp(gam_n)[..., None]
        o = jnp.einsum("bhrck,bhrkv->bhrcv", q_dec, s, precision=HIGHEST)
        o = o + jnp.einsum("bhrij,bhrjv->bhriv", attn_n, v_new, precision=HIGHEST)
        k_dec = k_n * jnp.exp(glast_n[..., None] - gam_n)[..., None]
        s = s * jnp.exp(glast_n)[..., None, None]
        s = s + jnp.einsum("bhrck,bhrcv->bhrkv", k_dec, v_new, precision=HIGHEST)
        return s, o

    q_b = jnp.broadcast_to(q_c, (B, N, H, R, C, K))
    k_b = jnp.broadcast_to(k_c, (B, N, H, R, C, K))
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u, w, q_b, k_b, attn, gamma, g_last))
    s, o = jax.lax.scan(step, s0, xs)  # o [N,B,H,R,C,V]
    o = jnp.transpose(o, (1, 0, 4, 2, 3, 5)).reshape(B, N * C, HV, V)[:, :T]
    final = s.reshape(B, HV, K, V) if output_final_state else None
    return o.astype(out_dtype), final
