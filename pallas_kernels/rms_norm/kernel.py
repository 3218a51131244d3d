"""The norms of a few rows (decode) as Pallas (Triton backend) kernels: the zero-centred
RMSNorm with the residual add before it (`rms_norm`), and the Gated DeltaNet output norm
(`gated_rms_norm`).

At decode sizes a norm is a handful of KiB, and XLA runs it as two launches: a reduce fusion
(the sum of squares, with the residual add folded in) and an elementwise fusion that applies it
(each ~1.2-2.6 us at one token on the H200, launch-bound; four per decoder layer). Here one
program owns one row: it adds the residual, writes the sum back as the new residual stream,
and normalises, in one launch. The weight may be one layer of a stack [L, D], read in place
(a per-layer slice fed to a kernel would be copied first).

The GDN output norm (reduce, apply and the gate's silu: three small fusions per layer in XLA)
runs one program per (row, key-head group), normalising its R value heads and reading the
gate z from the in_proj output in place (a slice of it fed to a kernel would be a copy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._triton import compiler_params
from pallas_kernels.rms_norm.reference import (
    validate_gated_norm_inputs,
    validate_rms_norm_inputs,
)

MAX_ROWS = 64  # decode batches; longer inputs are XLA's (a bandwidth-bound fusion there)
MAX_DIM = 16384  # one program holds a whole row in registers


def _kernel(layer_ref, *refs, eps: float, add: bool):
    # layer_ref [1] int32; x_ref [D] one row (r_ref [D] the residual stream's row, when add);
    # w_ref [L, D] (the whole stack); y_ref [D] the normalised row (s_ref [D] x + r, when add)
    if add:
        x_ref, r_ref, w_ref, y_ref, s_ref = refs
    else:
        x_ref, w_ref, y_ref = refs
    s = x_ref[...]
    if add:
        s = s + r_ref[...]  # in x's dtype, as the model's residual adds
        s_ref[...] = s
    sf = s.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(sf * sf) / sf.shape[0] + eps)
    w = w_ref[layer_ref[0], :].astype(jnp.float32)
    y_ref[...] = (sf * inv * (1.0 + w)).astype(y_ref.dtype)


def kernel_applies(N: int, D: int) -> bool:
    """Whether `rms_norm` takes [N, D] rows: decode-sized N, a row a power-of-2 block."""
    return 1 <= N <= MAX_ROWS and 16 <= D <= MAX_DIM and D & (D - 1) == 0


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "num_warps"))
def rms_norm(x, w, layer=None, *, residual=None, eps: float, interpret=False, num_warps=4):
    """As `rms_norm_ref`: y = norm(x + residual) * (1 + w), one program per row.

    Args:
      x: [N, D] bf16 or fp32, 1 <= N <= 64, D a power of 2.
      w: [D], or stacked over layers [L, D] with `layer` (an int32 scalar, may be traced;
        clamped to [0, L)).
      residual: None, or [N, D] as x: added to x first (in x's dtype).
    Returns:
      y [N, D] in x's dtype; with a residual (y, x + residual).
    """
    L, D = validate_rms_norm_inputs(x, w, layer, residual)
    N = x.shape[0]
    if not kernel_applies(N, D):
        raise ValueError(
            f"x {tuple(x.shape)}: the kernel takes 1 <= N <= {MAX_ROWS} rows of D a power of 2 "
            f"in [16, {MAX_DIM}] (rms_norm_ref: any)"
        )
    add = residual is not None
    layer = jnp.clip(jnp.asarray(0 if layer is None else layer, jnp.int32), 0, L - 1)
    row = pl.BlockSpec((None, D), lambda n: (n, 0))
    whole = pl.BlockSpec()
    out = pl.pallas_call(
        functools.partial(_kernel, eps=eps, add=add),
        grid=(N,),
        in_specs=[whole, row] + [row] * add + [whole],
        out_specs=[row] * (1 + add),
        out_shape=[jax.ShapeDtypeStruct((N, D), x.dtype)] * (1 + add),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="rms_norm",
    )(layer.reshape(1), x, *([residual] if add else []), w.reshape(L, D))
    return (out[0], out[1]) if add else out[0]


def _gated_kernel(layer_ref, o_ref, z_ref, w_ref, y_ref, *, eps: float, z_offset: int):
    # layer_ref [1] int32; o_ref [R, V] one key-head group's value heads of one row;
    # z_ref [N, H, C, V] whole (this program's gate rows at [n, h, z_offset : z_offset + R]);
    # w_ref [L, V] (the whole stack); y_ref [R, V]
    n, h = pl.program_id(0), pl.program_id(1)
    R = o_ref.shape[0]
    of = o_ref[...].astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(of * of, axis=1, keepdims=True) / of.shape[1] + eps)  # [R, 1]
    z = z_ref[n, h, pl.ds(z_offset, R), :].astype(jnp.float32)
    w = w_ref[layer_ref[0], :].astype(jnp.float32)
    y_ref[...] = (of * inv * w[None, :] * (z * jax.nn.sigmoid(z))).astype(y_ref.dtype)


def gated_kernel_applies(N: int, R: int, V: int) -> bool:
    """Whether `gated_rms_norm` takes N rows of R value heads of V: decode-sized N, R and V
    powers of 2 (a program's block is [R, V])."""
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
    return 1 <= N <= MAX_ROWS and pow2(R) and pow2(V) and V >= 16


@functools.partial(jax.jit, static_argnames=("eps", "z_offset", "interpret", "num_warps"))
def gated_rms_norm(
    o, z, w, layer=None, *, eps: float, z_offset: int = 0, interpret=False, num_warps=4
):
    """As `gated_rms_norm_ref`: y = rmsnorm(o) * w * silu(z) per value head, one program per
    (row, key-head group).

    Args:
      o: [N, H, R, V], 1 <= N <= 64; R and V powers of 2.
      z: [N, H, C, V], the gate of head (h, r) at z[n, h, z_offset + r].
      w: [V], or stacked over layers [L, V] with `layer` (an int32 scalar, may be traced).
    Returns:
      y [N, H, R, V] in z's dtype.
    """
    L, H, R, V = validate_gated_norm_inputs(o, z, w, layer, z_offset)
    N = o.shape[0]
    if not gated_kernel_applies(N, R, V):
        raise ValueError(
            f"o {tuple(o.shape)}: the kernel takes 1 <= N <= {MAX_ROWS} rows and R, V powers "
            "of 2, V >= 16 (gated_rms_norm_ref: any)"
        )
    layer = jnp.clip(jnp.asarray(0 if layer is None else layer, jnp.int32), 0, L - 1)
    heads = pl.BlockSpec((None, None, R, V), lambda n, h: (n, h, 0, 0))
    whole = pl.BlockSpec()
    return pl.pallas_call(
        functools.partial(_gated_kernel, eps=eps, z_offset=z_offset),
        grid=(N, H),
        in_specs=[whole, heads, whole, whole],
        out_specs=heads,
        out_shape=jax.ShapeDtypeStruct(o.shape, z.dtype),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="gdn_norm",
    )(layer.reshape(1), o, z, w.reshape(L, V))
