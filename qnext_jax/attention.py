"""Gated full attention (one layer in every `full_attention_interval`).

q_proj's output is per-head interleaved [q (D) | gate (D)]; q and k get a zero-centred RMSNorm
per head, then partial NeoX RoPE; the attention output is multiplied by sigmoid(gate) before
o_proj. GQA: KV head j serves query heads j*G .. j*G+G-1, never materialised per query head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax import ops, sharding
from qnext_jax.cache import KV_AXES, CacheSlots, LayerCache
from qnext_jax.config import Qwen3NextConfig, RuntimeOptions
from qnext_jax.layers import Linear, RMSNorm, apply_partial_rope, project
from qnext_jax.sharding import constrain


class GatedAttention(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, opts: RuntimeOptions, *, dtype, rngs):
        D, H, KVH, Dh = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.n_heads, self.n_kv_heads, self.head_dim = H, KVH, Dh
        heads, kv_heads = ("embed", "heads"), ("embed", "kv_heads")
        kw = dict(dtype=dtype, rngs=rngs, opts=opts)
        # K/V projections per device only where the KV heads split evenly (else replicated)
        kv_kw = kw if KVH % sharding.axis_size(opts.mesh, "kv_heads") == 0 else dict(kw, opts=None)
        # q_proj: per head [q | gate], so splitting its columns by heads keeps the pairs together
        self.q_proj = Linear(D, H * 2 * Dh, axes=heads, **kw)
        self.k_proj = Linear(D, KVH * Dh, axes=kv_heads, **kv_kw)
        self.v_proj = Linear(D, KVH * Dh, axes=kv_heads, **kv_kw)
        self.o_proj = Linear(H * Dh, D, axes=("heads", "embed"), **kw)
        self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps, dtype=dtype)
        self.impl, self.mesh = opts.attention_impl, opts.mesh

    def __call__(
        self,
        x,
        cos,
        sin,
        positions,
        cache: LayerCache | None,
        slots: CacheSlots | None = None,
        layer=None,
    ):
        """x [B,T,D]; cos/sin [B,T,R]; positions [B,T] (-1: padding, writes nothing).

        Without a cache the T tokens attend among themselves; with one, K/V are written at
        their positions (in cache row slots.rows[b], or b, of the layer in the stack) and the
        queries attend over the whole cache row. layer: this layer's index in LayerStack's
        scan (the projections' weights may be the whole stacks)."""
        B, T, _ = x.shape
        H, KVH, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        qg, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), layer)
        qg = qg.reshape(B, T, H, 2 * Dh)
        q, gate = qg[..., :Dh], qg[..., Dh:].reshape(B, T, H * Dh)
        k, v = k.reshape(B, T, KVH, Dh), v.reshape(B, T, KVH, Dh)
        q = apply_partial_rope(self.q_norm(q), cos, sin)  # RoPE after the q/k norm
        k = apply_partial_rope(self.k_norm(k), cos, sin)
        q = constrain(q, ("batch", None, "heads", None), self.mesh)
        k, v = (constrain(a, KV_AXES, self.mesh) for a in (k, v))

        chunk = None  # this call's own K/V, as the cache holds them (ops.attention's `chunk`)
        if cache is None:
            k_all, v_all, k_pos = k, v, positions
        else:
            stack, layer = cache.stack, cache.layer
            pairs = ((k, stack.k), (v, stack.v))
            chunk = tuple(a.astype(c.dtype).astype(q.dtype) for a, c in pairs)
            S = stack.k.shape[2]
            slot = jnp.where(positions >= 0, positions, S)  # padding -> out of range, dropped
            rows = (jnp.arange(B) if slots is None else slots.rows)[:, None]
            # written into the stack at the layer: in place in the layer scan's carry
            k_new, v_new = (
                c.at[layer, rows, slot].set(new.astype(c.dtype), mode="drop") for new, c in pairs
            )
            axes = ("layers", *KV_AXES)
            cache = cache.with_stack(
                k=constrain(k_new, axes, self.mesh), v=constrain(v_new, axes, self.mesh)
            )
        q_pos = jnp.where(positions >= 0, positions, -2)  # padded queries see nothing
        if (
            cache is not None
            and slots is None
            and ops.cache_attention_applies(self.impl, T, S, KVH, Dh, self.mesh)
        ):  # decode: the kernel reads the layer from the stack in place
            k_stack, v_stack = cache.stack.k, cache.stack.v
            out = ops.cache_attention(
                q, k_stack, v_stack, cache.layer, q_pos, scale=Dh**-0.5, mesh=self.mesh
            )
        else:
            if cache is not None:
                own = cache.read()
                k_all, v_all = own.k, own.v
                if slots is not None:  # this batch's rows (stale K/V past a position: masked)
                    k_all = jnp.take(k_all, slots.rows, axis=0, mode="clip")
                    v_all = jnp.take(v_all, slots.rows, axis=0, mode="clip")
                k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            out = ops.attention(
                q,
                k_all.astype(q.dtype),
                v_all.astype(q.dtype),
                q_pos,
                k_pos,
                scale=Dh**-0.5,
                impl=self.impl,
                chunk=chunk,
            )
        out = out.reshape(B, T, H * Dh) * jax.nn.sigmoid(gate)  # the output gate
        return self.o_proj(out, layer), cache
