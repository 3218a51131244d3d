"""Reference for decode attention over a KV cache (fp32 softmax, GQA without repeated K/V)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def validate_decode_attention(q, k_cache, v_cache, q_pos, layer) -> tuple[int, int, int]:
    """Check the shape contract; returns (L, S, KVH) (L = 1 for an unstacked cache)."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {tuple(q.shape)}")
    stacked = k_cache.ndim == 5
    if k_cache.ndim not in (4, 5) or stacked != (layer is not None):
        raise ValueError(
            "k_cache must be [B, S, KVH, D], or stacked over layers [L, B, S, KVH, D] with "
            f"`layer`; got shape {tuple(k_cache.shape)} with layer "
            f"{'given' if layer is not None else None}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must match k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    B, T, H, D = q.shape
    L = k_cache.shape[0] if stacked else 1
    Bc, S, KVH, Dc = k_cache.shape[-4:]
    if (Bc, Dc) != (B, D):
        raise ValueError(
            f"k_cache must hold B={B} rows of head dim D={D} (q {tuple(q.shape)}), got "
            f"{tuple(k_cache.shape)}"
        )
    if H % KVH:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads KVH={KVH}")
    if q_pos.shape != (B, T) or not jnp.issubdtype(q_pos.dtype, jnp.integer):
        raise ValueError(
            f"q_pos must be integer [B, T] = {(B, T)}, got {tuple(q_pos.shape)} {q_pos.dtype}"
        )
    return L, S, KVH


def decode_attention_ref(q, k_cache, v_cache, q_pos, *, layer=None, scale=None):
    """Queries against a KV cache that holds position s at index s.

    q [B, T, H, D]; k_cache, v_cache [B, S, KVH, D], or [L, B, S, KVH, D] with `layer`;
    q_pos [B, T] int: query t sees the keys s <= q_pos[b, t] (q_pos < 0: none; its output is
    zeros). A layer outside [0, L) is clamped into it. Query head j reads KV head
    j // (H // KVH). Returns o [B, T, H, D] in q's dtype."""
    L, _, _ = validate_decode_attention(q, k_cache, v_cache, q_pos, layer)
    if layer is not None:
        layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, L - 1)  # as the kernel
        k_cache, v_cache = (
            jax.lax.dynamic_index_in_dim(c, layer, 0, False) for c in (k_cache, v_cache)
        )
    B, T, H, D = q.shape
    S, KVH = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(B, T, KVH, H // KVH, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache.astype(jnp.float32)) * scale
    visible = jnp.arange(S)[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    p = jnp.where(visible[:, None, None], jax.nn.softmax(s, axis=-1), 0.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v_cache.astype(jnp.float32))
    return o.reshape(B, T, H, D).astype(q.dtype)
