"""Pure-jnp references for the norms of a few rows: the specs the Pallas kernels are checked
against.

The zero-centred RMSNorm, with the residual add before it (`rms_norm_ref`):
  x         [N, D]   a block's output (or the residual stream itself), bf16 or fp32
  residual  [N, D]   the residual stream, or None
  w         [D]      or a stack over layers [L, D] with `layer` picking one
  s = x + residual   in x's dtype (the model's residual adds)
  y = s_hat * (1 + w), s_hat = s / sqrt(mean(s^2) + eps): fp32, cast to x's dtype at the end

The Gated DeltaNet output norm (`gated_rms_norm_ref`), per value head, plain w (not 1 + w):
  o  [N, H, R, V]    the R value heads of each of H key-head groups
  z  [N, H, C, V]    the gate: head (h, r) at z[n, h, z_offset + r] (C >= z_offset + R), so a
                     caller can hand in the projection that holds it, viewed as rows of V
  y  [N, H, R, V] = o_hat * w * silu(z), all fp32, in z's dtype
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


def validate_gated_norm_inputs(o, z, w, layer, z_offset: int) -> tuple[int, int, int, int]:
    """Check the shape contract; returns (L, H, R, V). Raises ValueError naming the argument."""
    if o.ndim != 4:
        raise ValueError(f"o must be [N, H, R, V], got shape {tuple(o.shape)}")
    N, H, R, V = o.shape
    if z.ndim != 4 or z.shape[:2] != (N, H) or z.shape[3] != V:
        raise ValueError(f"z must be [N={N}, H={H}, C, V={V}], got shape {tuple(z.shape)}")
    if not 0 <= z_offset <= z.shape[2] - R:
        raise ValueError(
            f"z_offset={z_offset}: the gate's R={R} rows must lie in z's C={z.shape[2]}"
        )
    if w.ndim not in (1, 2) or w.shape[-1] != V:
        raise ValueError(f"w must be [V={V}] or stacked [L, V={V}], got shape {tuple(w.shape)}")
    if (w.ndim == 2) != (layer is not None):
        raise ValueError(
            f"w of shape {tuple(w.shape)}: a stacked w ([L, V]) needs `layer`, and only it does"
        )
    return (w.shape[0] if w.ndim == 2 else 1), H, R, V


def gated_rms_norm_ref(o, z, w, layer=None, *, eps: float, z_offset: int = 0):
    """y = rmsnorm(o) * w * silu(z) per value head, fp32, in z's dtype."""
    L, _, R, _ = validate_gated_norm_inputs(o, z, w, layer, z_offset)
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, jnp.clip(layer, 0, L - 1), keepdims=False)
    gate = jax.nn.silu(z[:, :, z_offset : z_offset + R].astype(jnp.float32))
    of = o.astype(jnp.float32)
    of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + eps)
    return (of * w.astype(jnp.float32) * gate).astype(z.dtype)
