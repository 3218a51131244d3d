"""Pallas projection of a few rows (decode) vs the jnp reference.

Cases: one row and a batch (rows padded to 16 by masked loads, up to the 64-row maximum), one
and several K splits (fp32 partial sums added outside), a layer of a weight stack read in
place, an unstacked weight, bf16 and fp32, several weights sharing one launch (`linear_many`),
and the contract's errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import INTERPRET, TOL, rel_err, run

from pallas_kernels.linear import LinearBlocks, linear, linear_many, linear_ref, plan, plan_many


def _inputs(N, K, M, dtype, L=None, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((N, K)), dtype)
    w = jnp.asarray(0.1 * rng.standard_normal((K, M) if L is None else (L, K, M)), dtype)
    return x, w


@pytest.mark.parametrize(
    "N, K, M, L, splits, dtype",
    [
        (1, 256, 64, 3, None, jnp.bfloat16),  # one row, a stacked weight
        (5, 512, 128, 2, 4, jnp.float32),  # four K splits
        (64, 128, 32, None, 1, jnp.bfloat16),  # the most rows, an unstacked weight
        (3, 256, 48, 2, 2, jnp.bfloat16),  # M not a power of 2: 16-column blocks
    ],
)
def test_linear_matches_reference(N, K, M, L, splits, dtype):
    x, w = _inputs(N, K, M, dtype, L, seed=N + K)
    layer = None if L is None else jnp.int32(L - 1)
    blocks = LinearBlocks(splits=splits)
    y = run(linear, x, w, layer, interpret=INTERPRET, blocks=blocks)
    want = linear_ref(x, w, layer)
    assert y.shape == (N, M) and y.dtype == x.dtype
    assert rel_err(y, want) < TOL[dtype]
    if L is not None:  # the layer's own weight, nobody else's
        assert rel_err(want, jnp.dot(x, w[L - 1], preferred_element_type=jnp.float32)) < 1e-2


@pytest.mark.parametrize(
    "N, K, Ms, L, splits",
    [
        (1, 256, (96, 32), 3, None),  # a large weight and a small one (GDN's qkvz and ba)
        (4, 512, (128, 32, 32), 2, 2),  # three (attention's q, k, v), two K splits
        (2, 128, (48, 64), None, 1),  # unstacked; 16- and 64-column blocks in one grid
    ],
)
def test_linear_many_matches_one_linear_per_weight(N, K, Ms, L, splits):
    rng = np.random.default_rng(N + K)
    x = jnp.asarray(rng.standard_normal((N, K)), jnp.bfloat16)
    ws = [
        jnp.asarray(0.1 * rng.standard_normal((K, M) if L is None else (L, K, M)), jnp.bfloat16)
        for M in Ms
    ]
    layer = None if L is None else jnp.int32(1)
    ys = run(linear_many, x, ws, layer, interpret=INTERPRET, blocks=LinearBlocks(splits=splits))
    assert len(ys) == len(ws)
    for y, w, M in zip(ys, ws, Ms, strict=True):
        assert y.shape == (N, M) and y.dtype == x.dtype
        assert rel_err(y, linear_ref(x, w, layer)) < TOL[jnp.bfloat16]


def test_plan_many_splits_k_over_all_weights_columns():
    # 12288 + 64 columns are 193 programs of 64: no split (one weight of 64 alone takes 8)
    assert plan_many(2048, (12288, 64), LinearBlocks()) == ((64, 64), 128, 1)
    assert plan(2048, 64, LinearBlocks()) == (64, 128, 8)
    # 16 + 1 column blocks: K in 8 slices makes 136 programs
    assert plan_many(2048, (1024, 32), LinearBlocks()) == ((64, 32), 128, 8)


def test_linear_many_rejects_weights_that_do_not_fit_together():
    x = jnp.zeros((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="does not match"):  # a K that is not x's
        linear_many(x, (jnp.zeros((64, 32)), jnp.zeros((32, 32))), interpret=True)
    with pytest.raises(ValueError, match="same number of layers"):  # stacks of other depths
        stacks = (jnp.zeros((3, 64, 32)), jnp.zeros((2, 64, 32)))
        linear_many(x, stacks, jnp.int32(0), interpret=True)
    with pytest.raises(ValueError, match="at least one weight"):
        linear_many(x, (), interpret=True)


def test_plan_splits_k_when_columns_are_few():
    # 2048 columns in blocks of 64 are 32 programs: K is split until ~128 programs
    assert plan(2048, 2048, LinearBlocks()) == (64, 128, 4)
    assert plan(2048, 6144, LinearBlocks()) == (64, 128, 2)
    assert plan(256, 64, LinearBlocks()) == (64, 128, 1)  # slices keep >= 256 rows of K


@pytest.mark.parametrize(
    "x_shape, w_shape, layer, match",
    [
        ((2, 64), (3, 64, 32), None, "needs `layer`"),
        ((2, 64), (64, 32), 0, "needs `layer`"),
        ((2, 48), (64, 32), None, "does not match"),
        ((65, 64), (64, 32), None, "1 <= N <= 64"),
        ((2, 64), (64, 24), None, "multiples of 16"),
        ((2, 64, 1), (64, 32), None, r"x must be \[N, K\]"),
    ],
)
def test_linear_rejects_bad_inputs(x_shape, w_shape, layer, match):
    x, w = jnp.zeros(x_shape, jnp.float32), jnp.zeros(w_shape, jnp.float32)
    with pytest.raises(ValueError, match=match):
        linear(x, w, None if layer is None else jnp.int32(layer), interpret=True)
