"""Pallas norms of a few rows (decode) vs their references: the RMSNorm with and without the
residual add, and the Gated DeltaNet output norm with its gate read inside a larger array.

Cases: one row and a batch, bf16 and fp32, a layer of a weight stack read in place and an
unstacked weight; the residual stream's sum is exact (the same add in x's dtype); the
contracts' errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import INTERPRET, TOL, rel_err, run

from pallas_kernels.rms_norm import gated_rms_norm, gated_rms_norm_ref, rms_norm, rms_norm_ref

EPS = 1e-6


def _inputs(N, D, dtype, L=None, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(3.0 * rng.standard_normal((N, D)), dtype)
    residual = jnp.asarray(rng.standard_normal((N, D)), dtype)
    w = jnp.asarray(0.1 * rng.standard_normal((D,) if L is None else (L, D)), dtype)
    return x, residual, w


@pytest.mark.parametrize(
    "N, D, L, add, dtype",
    [
        (1, 256, 3, True, jnp.bfloat16),  # one token, a stacked weight, the residual added
        (5, 64, None, False, jnp.float32),  # a batch, an unstacked weight, no residual
        (64, 128, 2, False, jnp.bfloat16),  # the most rows
        (3, 2048, 2, True, jnp.float32),  # the 80B model's width
    ],
)
def test_rms_norm_matches_reference(N, D, L, add, dtype):
    x, residual, w = _inputs(N, D, dtype, L, seed=N + D)
    layer = None if L is None else jnp.int32(L - 1)
    kw = dict(residual=residual if add else None, eps=EPS)
    got = run(rms_norm, x, w, layer, interpret=INTERPRET, **kw)
    want = rms_norm_ref(x, w, layer, **kw)
    if add:
        (got, got_sum), (want, want_sum) = got, want
        np.testing.assert_array_equal(np.asarray(got_sum), np.asarray(want_sum))
        np.testing.assert_array_equal(np.asarray(want_sum), np.asarray(x + residual))
    assert got.shape == (N, D) and got.dtype == x.dtype
    assert rel_err(got, want) < TOL[dtype]
    if L is not None:  # the layer's own weight, nobody else's
        other = rms_norm_ref(x, w[0], residual=kw["residual"], eps=EPS)
        assert rel_err(want, other[0] if add else other) > 1e-3


@pytest.mark.parametrize(
    "x_shape, w_shape, layer, r_shape, match",
    [
        ((2, 64), (3, 64), None, None, "needs `layer`"),
        ((2, 64), (64,), 0, None, "needs `layer`"),
        ((2, 64), (32,), None, None, r"w must be \[D=64\]"),
        ((2, 64), (64,), None, (1, 64), "residual"),
        ((65, 64), (64,), None, None, "1 <= N <= 64"),
        ((2, 48), (48,), None, None, "power of 2"),
        ((2, 64, 1), (64,), None, None, r"x must be \[N, D\]"),
    ],
)
def test_rms_norm_rejects_bad_inputs(x_shape, w_shape, layer, r_shape, match):
    x, w = jnp.zeros(x_shape, jnp.float32), jnp.zeros(w_shape, jnp.float32)
    residual = None if r_shape is None else jnp.zeros(r_shape, jnp.float32)
    with pytest.raises(ValueError, match=match):
        rms_norm(
            x,
            w,
            None if layer is None else jnp.int32(layer),
            residual=residual,
            eps=EPS,
            interpret=True,
        )


@pytest.mark.parametrize(
    "N, H, R, V, C, z_offset, L, dtype",
    [
        (1, 4, 2, 128, 8, 4, 3, jnp.bfloat16),  # the 80B model's GDN layout: z after q|k|v
        (5, 2, 1, 32, 1, 0, None, jnp.float32),  # z on its own, an unstacked weight
        (64, 2, 4, 16, 9, 5, 2, jnp.bfloat16),  # the most rows; z at an odd row offset
    ],
)
def test_gated_rms_norm_matches_reference(N, H, R, V, C, z_offset, L, dtype):
    rng = np.random.default_rng(N + V)
    o = jnp.asarray(2.0 * rng.standard_normal((N, H, R, V)), dtype)
    z = jnp.asarray(rng.standard_normal((N, H, C, V)), dtype)
    w = jnp.asarray(1.0 + 0.1 * rng.standard_normal((V,) if L is None else (L, V)), dtype)
    layer = None if L is None else jnp.int32(L - 1)
    kw = dict(eps=EPS, z_offset=z_offset)
    got = run(gated_rms_norm, o, z, w, layer, interpret=INTERPRET, **kw)
    want = gated_rms_norm_ref(o, z, w, layer, **kw)
    assert got.shape == o.shape and got.dtype == z.dtype
    assert rel_err(got, want) < TOL[dtype]
    # the gate is z's rows z_offset .. z_offset + R: another offset gives another result
    if C > R:
        other = gated_rms_norm_ref(o, z, w, layer, eps=EPS, z_offset=(z_offset + 1) % (C - R + 1))
        assert rel_err(want, other) > 1e-2


@pytest.mark.parametrize(
    "o_shape, z_shape, w_shape, z_offset, match",
    [
        ((2, 4, 2, 32), (2, 4, 4, 32), (32,), 3, "z_offset=3"),
        ((2, 4, 2, 32), (2, 3, 4, 32), (32,), 0, r"z must be \[N=2, H=4"),
        ((2, 4, 2, 32), (2, 4, 4, 32), (16,), 0, r"w must be \[V=32\]"),
        ((2, 4, 3, 32), (2, 4, 4, 32), (32,), 0, "powers of 2"),
        ((2, 8, 32), (2, 4, 4, 32), (32,), 0, r"o must be \[N, H, R, V\]"),
    ],
)
def test_gated_rms_norm_rejects_bad_inputs(o_shape, z_shape, w_shape, z_offset, match):
    o, z, w = (jnp.zeros(s, jnp.float32) for s in (o_shape, z_shape, w_shape))
    with pytest.raises(ValueError, match=match):
        gated_rms_norm(o, z, w, eps=EPS, z_offset=z_offset, interpret=True)
