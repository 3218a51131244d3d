"""Pure-jnp reference for a projection of a few rows: the spec the Pallas kernel is checked
against.

  x  [N, K]       rows, bf16 or fp32
  w  [K, M]       or a stack over layers [L, K, M] with `layer` picking one
  y  [N, M] = x @ w[layer], products in x's dtype, sums in fp32, y in x's dtype
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def validate_linear_inputs(x, w, layer) -> tuple[int, int, int]:
    """Check the shape contract; returns (L, K, M) (L = 1 for an unstacked w). Raises
    ValueError naming the argument."""
    if x.ndim != 2:
        raise ValueError(f"x must be [N, K], got shape {tuple(x.shape)}")
    if w.ndim not in (2, 3):
        raise ValueError(f"w must be [K, M] or stacked [L, K, M], got shape {tuple(w.shape)}")
    stacked = w.ndim == 3
    if stacked != (layer is not None):
        raise ValueError(
            f"w of shape {tuple(w.shape)}: a stacked w ([L, K, M]) needs `layer`, and only it "
            f"does (layer={'given' if layer is not None else None})"
        )
    if layer is not None and jnp.ndim(layer) != 0:
        raise ValueError(f"layer must be a scalar, got shape {jnp.shape(layer)}")
    K, M = w.shape[-2:]
    if x.shape[1] != K:
        raise ValueError(f"x [N, K={x.shape[1]}] does not match w {tuple(w.shape)} (K={K})")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating dtype (bf16 or fp32), got {x.dtype}")
    return (w.shape[0] if stacked else 1), K, M


def linear_ref(x, w, layer=None) -> jax.Array:
    """x @ w (or x @ w[layer]) in x's dtype with fp32 sums."""
    validate_linear_inputs(x, w, layer)
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, jnp.clip(layer, 0, w.shape[0] - 1), keepdims=False)
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
