"""The hybrid decode cache, typed per layer by the layer pattern.

Full-attention layers keep K/V for `cache_length(max_len)` positions (slot index == token
position); Gated DeltaNet layers keep the conv state (the last W-1 pre-conv inputs) and the
recurrent state [B, HV, K, V] (fp32 by default). Caches are replaced, never mutated: a write
returns a new cache, and only buffer donation and aliasing make it happen in place.

The cache of a pattern position is stacked over the repeats of its layer group [L, B, ...]; a
layer sees it as a `LayerCache` (the stack and its index) and writes into the stack, so inside
the layer scan the writes update the carried buffers in place instead of copying the layer's
slice out and back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qnext_jax.config import FULL, Qwen3NextConfig

# A cache row holds max_len positions rounded up to a multiple of CACHE_ALIGN: whole key blocks
# for the decode attention kernel, which takes caches of a multiple of 16 (others fall back to
# XLA's attention, which reads a copy of the layer). The padding positions hold no token of a
# sequence within max_len (a verify pass near the end may write there; nothing reads it back).
CACHE_ALIGN = 64


def cache_length(max_len: int) -> int:
    """Positions a cache row holds for sequences of up to max_len tokens."""
    return -(-max_len // CACHE_ALIGN) * CACHE_ALIGN


# logical axes of one layer's cache leaves (qnext_jax.sharding maps them to the mesh)
KV_AXES = ("batch", None, "kv_heads", None)  # [B, S, KVH, D]
GDN_CONV_AXES = ("batch", None, "k_heads")  # [B, W-1, C], C grouped per key head
GDN_STATE_AXES = ("batch", "v_heads", None, None)  # [B, HV, K, V]


@struct.dataclass
class KVCache:
    k: jax.Array  # [B, S, KVH, D]
    v: jax.Array  # [B, S, KVH, D]


@struct.dataclass
class GDNCache:
    conv: jax.Array  # [B, W-1, C]  C = conv channels, grouped per key head
    state: jax.Array  # [B, HV, K, V]


@struct.dataclass
class CacheSlots:
    """Which cache rows a forward of P sequences uses (the cache holds more rows than P).

    rows [P] int32 (a row >= the cache batch marks a padding sequence: nothing is written);
    fresh [P] bool: the sequence starts here, so its recurrent state starts from zeros."""

    rows: jax.Array
    fresh: jax.Array

    def gather(self, x: jax.Array) -> jax.Array:
        """Rows of a per-layer cache leaf [B_cache, ...] -> [P, ...], zeroed where fresh."""
        x = jnp.take(x, self.rows, axis=0, mode="clip")
        return jnp.where(self.fresh.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros((), x.dtype), x)


@struct.dataclass
class LayerCache:
    """One layer's cache: `layer` of `stack`, whose leaves are [L, B, ...]."""

    stack: KVCache | GDNCache
    layer: jax.Array | int

    def read(self) -> KVCache | GDNCache:
        """The layer's own cache (leaves [B, ...]): a slice (XLA fuses it into its readers)."""
        return jax.tree.map(
            lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, keepdims=False), self.stack
        )

    def write(self, leaf: str, value: jax.Array, slots: CacheSlots | None = None) -> LayerCache:
        """Replace the layer's `leaf` by value [B, ...], or only its rows slots.rows by value
        [P, ...] (rows past the cache batch are padding: dropped)."""
        old = getattr(self.stack, leaf)
        if slots is None:
            new = jax.lax.dynamic_update_index_in_dim(old, value.astype(old.dtype), self.layer, 0)
        else:
            new = old.at[self.layer, slots.rows].set(value.astype(old.dtype), mode="drop")
        return self.with_stack(**{leaf: new})

    def with_stack(self, **leaves: jax.Array) -> LayerCache:
        """Whole stack leaves replaced (ones a kernel updated at the layer itself)."""
        return self.replace(stack=self.stack.replace(**leaves))


def layer_cache(
    cfg: Qwen3NextConfig, layer_type: str, batch: int, max_len: int, dtype, state_dtype
) -> KVCache | GDNCache:
    if layer_type == FULL:
        shape = (batch, cache_length(max_len), cfg.num_key_value_heads, cfg.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    conv = jnp.zeros((batch, cfg.linear_conv_kernel_dim - 1, cfg.conv_dim), dtype)
    state = jnp.zeros(
        (batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim),
        state_dtype,
    )
    return GDNCache(conv, state)


def stacked(caches: list) -> KVCache | GDNCache:
    """Stack per-repeat caches along a new leading axis (for scanned layer groups)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *caches)


def cache_bytes(
    cfg: Qwen3NextConfig,
    batch: int,
    max_len: int,
    *,
    kv_bytes: int = 2,
    state_bytes: int = 4,
    mtp: bool = False,
) -> int:
    """Bytes the hybrid cache needs for `batch` sequences of up to `max_len` tokens."""
    n_full = sum(t == FULL for t in cfg.layer_types) + (cfg.num_mtp_layers if mtp else 0)
    n_linear = cfg.num_hidden_layers - sum(t == FULL for t in cfg.layer_types)
    kv = 2 * cache_length(max_len) * cfg.num_key_value_heads * cfg.head_dim * kv_bytes
    conv = (cfg.linear_conv_kernel_dim - 1) * cfg.conv_dim * kv_bytes
    rec = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    return batch * (n_full * kv + n_linear * (conv + rec * state_bytes))


def reset_rows(cache, rows: jax.Array):
    """Zero the rows where `rows` [B] is True (a slot that starts a new sequence).

    Every cache leaf is stacked [L, B, ...] (layer repeats first), so batch is axis 1."""

    def zero(x):
        mask = rows.reshape((1, -1) + (1,) * (x.ndim - 2))
        return jnp.where(mask, jnp.zeros((), x.dtype), x)

    return jax.tree.map(zero, cache)
