"""Pure-jnp reference for the zero-centred RMSNorm, with the residual add before it: the spec
the Pallas kernel is checked against.

  x         [N, D]   a block's output (or the residual stream itself), bf16 or fp32
  residual  [N, D]   the residual stream, or None
  w         [D]      or a stack over layers [L, D] with `layer` picking one
  s = x + residual   in x's dtype (the model's residual adds)
  y = s_hat * (1 + w), s_hat = s / sqrt(mean(s^2) + eps): fp32, cast to x's dtype at the end
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def validate_rms_norm_inputs(x, w, layer, residual) -> tuple[int, int]:
    """Check the shape contract; returns (L, D) (L = 1 for an unstacked w). Raises ValueError
    naming the argument."""
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating dtype (bf16 or fp32), got {x.dtype}")
    D = x.shape[1]
    if w.ndim not in (1, 2) or w.shape[-1] != D:
        raise ValueError(f"w must be [D={D}] or stacked [L, D={D}], got shape {tuple(w.shape)}")
    if (w.ndim == 2) != (layer is not None):
        raise ValueError(
            f"w of shape {tuple(w.shape)}: a stacked w ([L, D]) needs `layer`, and only it "
            f"does (layer={'given' if layer is not None else None})"
        )
    if layer is not None and jnp.ndim(layer) != 0:
        raise ValueError(f"layer must be a scalar, got shape {jnp.shape(layer)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} must match x "
            f"{tuple(x.shape)} {x.dtype}"
        )
    return (w.shape[0] if w.ndim == 2 else 1), D


def rms_norm_ref(x, w, layer=None, *, residual=None, eps: float):
    """y = norm(x + residual) (or norm(x)); returns y, or (y, x + residual) with a residual."""
    L, _ = validate_rms_norm_inputs(x, w, layer, residual)
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, jnp.clip(layer, 0, L - 1), keepdims=False)
    s = x if residual is None else x + residual
    sf = s.astype(jnp.float32)
    sf = sf * jax.lax.rsqrt(jnp.mean(sf * sf, axis=-1, keepdims=True) + eps)
    y = (sf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return y if residual is None else (y, s)
