"""Pallas causal conv1d (prefill and decode update) vs the pure-jnp reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import INTERPRET, rel_err, run

from pallas_kernels.causal_conv1d import (
    ConvBlocks,
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
)

C, W = 64, 4
BLOCKS = ConvBlocks(block_t=16, block_c=32)
# Both sides sum in fp32; the kernel differs only in summation order and the final rounding to
# the input dtype (one bf16 ulp, ~4e-3 relative) -> 1e-2 for bf16, 1e-6 for fp32.
TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2}


def _inputs(B, T, dtype, seed, with_state=True):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, T, C)), dtype)
    w = jnp.asarray(0.5 * rng.standard_normal((W, C)), dtype)
    s0 = jnp.asarray(rng.standard_normal((B, W - 1, C)), dtype) if with_state else None
    return x, w, s0


@pytest.mark.parametrize(
    "T, with_state, dtype",
    [
        (1, True, jnp.float32),
        (2, False, jnp.bfloat16),
        (63, True, jnp.bfloat16),
        (64, False, jnp.float32),
        (65, True, jnp.float32),
        (200, True, jnp.bfloat16),
    ],
)
def test_prefill_matches_reference(T, with_state, dtype):
    x, w, s0 = _inputs(2, T, dtype, seed=T, with_state=with_state)
    y, st = run(causal_conv1d, x, w, s0, interpret=INTERPRET, blocks=BLOCKS)
    y_ref, st_ref = causal_conv1d_ref(x, w, s0)
    assert y.dtype == x.dtype and st.shape == (2, W - 1, C)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(st, st_ref) == 0.0  # a copy of inputs


def test_prefill_in_pieces_then_decode_equals_one_prefill():
    x, w, s0 = _inputs(2, 75, jnp.float32, seed=5)
    y_all, st_all = run(causal_conv1d, x, w, s0, interpret=INTERPRET, blocks=BLOCKS)
    y1, st = run(causal_conv1d, x[:, :40], w, s0, interpret=INTERPRET, blocks=BLOCKS)
    y2, st = run(causal_conv1d, x[:, 40:70], w, st, interpret=INTERPRET, blocks=BLOCKS)
    y3, st = run(causal_conv1d_update, x[:, 70:71], w, st, interpret=INTERPRET, blocks=BLOCKS)
    y4, st = run(causal_conv1d_update, x[:, 71:75], w, st, interpret=INTERPRET, blocks=BLOCKS)
    assert rel_err(jnp.concatenate([y1, y2, y3, y4], axis=1), y_all) < TOL[jnp.float32]
    assert rel_err(st, st_all) == 0.0


@pytest.mark.parametrize("T", [1, 3, 8])
def test_update_matches_reference(T):
    x, w, s0 = _inputs(3, T, jnp.bfloat16, seed=20 + T)
    y, st = run(causal_conv1d_update, x, w, s0, interpret=INTERPRET, blocks=BLOCKS)
    y_ref, st_ref = causal_conv1d_ref(x, w, s0)
    assert rel_err(y, y_ref) < TOL[jnp.bfloat16]
    assert rel_err(st, st_ref) == 0.0


@pytest.mark.parametrize("T", [1, 4])
def test_update_in_place_with_padded_rows(T):
    """The state stack updated in place at its layer, rows right-padded (n_valid 0..T): the
    layer's state ends at each row's last real token, the other layers are untouched."""
    x, w, s0 = _inputs(4, T, jnp.bfloat16, seed=30 + T)
    rng = np.random.default_rng(T)
    stack = jnp.asarray(rng.standard_normal((3, 4, W - 1, C)), jnp.bfloat16).at[2].set(s0)
    n_valid = jnp.asarray([T, 0, T // 2, 1], jnp.int32)
    y, new = run(
        causal_conv1d_update,
        x,
        w,
        stack,
        state_layer=2,
        n_valid=n_valid,
        interpret=INTERPRET,
        blocks=BLOCKS,
    )
    y_ref, st_ref = causal_conv1d_ref(x, w, s0, n_valid=n_valid)
    assert new.shape == stack.shape and new.dtype == stack.dtype
    assert rel_err(y, y_ref) < TOL[jnp.bfloat16]
    assert rel_err(new[2], st_ref) == 0.0
    assert rel_err(new[2, 1], s0[1]) == 0.0  # no real token: unchanged
    assert rel_err(new[:2], stack[:2]) == 0.0
    # the weight stacked over the same layers: this layer's taps read in place
    w_stack = jnp.stack([w * 0.5, -w, w])
    y2, new2 = run(
        causal_conv1d_update,
        x,
        w_stack,
        stack,
        state_layer=2,
        n_valid=n_valid,
        interpret=INTERPRET,
        blocks=BLOCKS,
    )
    assert rel_err(y2, y) == 0.0 and rel_err(new2, new) == 0.0
    with pytest.raises(ValueError, match="weight stack"):
        causal_conv1d_update(x, w_stack[:2], stack, state_layer=2, interpret=INTERPRET)


def test_conv_contract_violations_raise():
    x, w, s0 = _inputs(1, 4, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, w[:, :8], interpret=INTERPRET)
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, w, s0[:, :2], interpret=INTERPRET)
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d(x[0], w, interpret=INTERPRET)
    with pytest.raises(ValueError, match="1..8"):
        causal_conv1d_update(jnp.concatenate([x, x, x], axis=1), w, s0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu", interpret=INTERPRET)
    with pytest.raises(ValueError, match="n_valid"):
        causal_conv1d_update(x[:, :1], w, s0, n_valid=jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="stack"):
        causal_conv1d_update(x[:, :1], w, s0, state_layer=0)


def test_channel_count_not_a_multiple_of_the_block():
    """C = 48 with block_c 32: the kernel takes the largest power-of-two block dividing C (16)
    (the demo model's GDN has 384 channels, the default block 256)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((1, 20, 48)), jnp.float32)
    w = jnp.asarray(0.5 * rng.standard_normal((W, 48)), jnp.float32)
    y, st = run(causal_conv1d, x, w, None, interpret=INTERPRET, blocks=BLOCKS)
    y_ref, st_ref = causal_conv1d_ref(x, w, None)
    assert rel_err(y, y_ref) < TOL[jnp.float32] and rel_err(st, st_ref) == 0.0
