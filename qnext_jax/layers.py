"""Small shared pieces: zero-centred RMSNorm, the GDN gated RMSNorm, partial NeoX RoPE (+YaRN),
a bias-free linear layer, and the SwiGLU MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax import ops
from qnext_jax.config import RopeScaling, RuntimeOptions


def _init(rngs: nnx.Rngs | None, shape, dtype, std: float = 0.02):
    """Normal init when rngs are given; zeros otherwise (weights will be loaded). Drawn in the
    parameter dtype: an fp32 draw of the 80B model's stacked experts would need twice their
    memory as a temporary."""
    if rngs is None:
        return jnp.zeros(shape, dtype)
    return std * jax.random.normal(rngs.params(), shape, dtype)


class Linear(nnx.Module):
    """y = x @ w with w stored [in, out] (HF stores [out, in]; the converter transposes).

    axes: the logical axes of w (see qnext_jax.sharding), e.g. ("embed", "heads").
    opts: where given, decode-sized inputs may take the Pallas projection kernel
    (opts.linear_impl, per device on opts.mesh; ops.linear), and `project` may merge this
    Linear's launch with others' (opts.merge_projections); without, always XLA's dot."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        dtype,
        rngs: nnx.Rngs | None,
        axes: tuple[str | None, str | None] = (None, None),
        opts: RuntimeOptions | None = None,
    ):
        self.w = nnx.Param(_init(rngs, (d_in, d_out), dtype), axes=axes)
        self.axes = axes
        self.impl, self.mesh = (opts.linear_impl, opts.mesh) if opts else ("xla", None)
        self.merge = opts.merge_projections if opts else False

    def __call__(self, x: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """layer: set inside LayerStack's scan, where w may be the whole stack [L, in, out]
        (kept whole for decode-sized batches) and layer picks this layer's weight."""
        w = self.w[...]
        layer = layer if w.ndim == 3 else None
        return ops.linear(x, w, layer, axes=self.axes, impl=self.impl, mesh=self.mesh)


def project(x: jax.Array, linears: tuple[Linear, ...], layer=None) -> tuple[jax.Array, ...]:
    """x through several Linears that share it (GDN's in_proj_qkvz and in_proj_ba; attention's
    q, k and v): at decode sizes one kernel launch for all of them (ops.linear_many), where
    they run alike (same impl and mesh, merging on); else each Linear on its own."""
    first = linears[0]
    alike = all((m.impl, m.mesh, m.merge) == (first.impl, first.mesh, True) for m in linears)
    if not alike:
        return tuple(m(x, layer) for m in linears)
    ws = tuple(m.w[...] for m in linears)
    layer = layer if ws[0].ndim == 3 else None
    axes = tuple(m.axes for m in linears)
    return ops.linear_many(x, ws, layer, axes=axes, impl=first.impl, mesh=first.mesh)


class RMSNorm(nnx.Module):
    """Zero-centred RMSNorm: y = x_hat * (1 + w), computed in fp32, cast after the multiply.

    opts: where given, decode-sized inputs may take the Pallas norm kernel (opts.norm_impl,
    ops.rms_norm); without, always XLA."""

    W_INIT = 0.0  # zero-centred: w = 0 is the identity scale

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        dtype,
        rngs: nnx.Rngs | None = None,
        opts: RuntimeOptions | None = None,
    ):
        self.w = nnx.Param(jnp.full((dim,), self.W_INIT, dtype))
        self.eps = eps
        self.impl, self.mesh = (opts.norm_impl, opts.mesh) if opts else ("xla", None)

    def __call__(self, x: jax.Array, layer: jax.Array | None = None, *, residual=None):
        """norm(x), or (norm(x + residual), x + residual) with a residual stream given.
        layer: picks this layer's weight where w is a LayerStack's whole stack [L, D]."""
        w = self.w[...]
        return ops.rms_norm(
            x,
            w,
            layer if w.ndim == 2 else None,
            residual=residual,
            eps=self.eps,
            impl=self.impl,
            mesh=self.mesh,
        )


class GatedRMSNorm(RMSNorm):
    """GDN output norm: y = x_hat * w * silu(z), plain w (NOT 1 + w, so it starts at ones), all
    fp32 (as fla / vLLM). opts: as RMSNorm's (opts.norm_impl, ops.gated_rms_norm)."""

    W_INIT = 1.0

    def __call__(self, x: jax.Array, z: jax.Array, layer=None, *, z_offset: int = 0):
        """x [N, H, R, V] (H key-head groups of R value heads); z [N, H, C, V], head (h, r)'s
        gate at row z_offset + r. layer: picks the weight from a LayerStack's whole [L, V]."""
        w = self.w[...]
        return ops.gated_rms_norm(
            x,
            z,
            w,
            layer if w.ndim == 2 else None,
            eps=self.eps,
            z_offset=z_offset,
            impl=self.impl,
            mesh=self.mesh,
        )


class SwiGLU(nnx.Module):
    """(silu(x Wg) * (x Wu)) Wd: the dense MLP and the shared expert."""

    def __init__(self, d_model: int, d_ff: int, *, dtype, rngs: nnx.Rngs | None, opts=None):
        kw = dict(dtype=dtype, rngs=rngs, opts=opts)
        self.gate_proj = Linear(d_model, d_ff, axes=("embed", "ffw"), **kw)
        self.up_proj = Linear(d_model, d_ff, axes=("embed", "ffw"), **kw)
        self.down_proj = Linear(d_ff, d_model, axes=("ffw", "embed"), **kw)

    def __call__(self, x: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        gate, up = self.gate_proj(x, layer), self.up_proj(x, layer)
        return self.down_proj(jax.nn.silu(gate) * up, layer)


# ---- rotary embedding ----------------------------------------------------------------------
def rope_frequencies(
    rotary_dim: int, theta: float, scaling: RopeScaling | None, max_position_embeddings: int
) -> tuple[jax.Array, float]:
    """Inverse frequencies [rotary_dim // 2] (fp32) and the cos/sin scale (YaRN's mscale)."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling.rope_type == "default":
        return inv_freq, 1.0
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor, 1.0
    # YaRN: blend interpolated and extrapolated frequencies over a linear ramp of dims
    factor = scaling.factor
    original = scaling.original_max_position_embeddings or max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.attention_factor is not None:
        attention_factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations):
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(rotary_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention_factor


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, scale: float, dtype):
    """positions [B, T] -> cos, sin [B, T, rotary_dim] in `dtype`.

    Tables in fp32, then cast to the activation dtype BEFORE the rotation, as HF does."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_partial_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """NeoX (half-split) rotation of the first rotary_dim dims of x [B, T, N, D]; the rest pass
    through."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
