"""The gated delta rule reference ladder: recurrent == chunked, and pieces with carried state ==
whole, both for the references and through the model's one seam `qnext_jax.ops`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule
from qnext_jax import ops

B, H, K, V = 2, 2, 16, 8
TOL = 2e-5  # fp32, relative to the largest |output|; observed ~1e-6


def inputs(T, ratio, with_state, seed=0):
    """Raw GDN inputs as the model feeds them: q/k unnormalised, g < 0, beta in (0, 1).
    (numpy RNG: eager jax.random would compile per shape.)"""
    rng = np.random.default_rng(seed)
    HV = H * ratio
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    q, k, v = f32(B, T, H, K), f32(B, T, H, K), f32(B, T, HV, V)
    g = -np.exp(f32(B, T, HV) - 1.0)  # decays from ~0.99 to ~0.2
    beta = 1.0 / (1.0 + np.exp(-f32(B, T, HV)))
    s0 = f32(B, HV, K, V) if with_state else None
    return tuple(map(jnp.asarray, (q, k, v, g, beta))), s0


def close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
    assert err <= tol, f"relative error {err:.2e} > {tol}"
    return err


recurrent = jax.jit(
    lambda x, s0: recurrent_gated_delta_rule(*x, initial_state=s0, use_qk_l2norm=True)
)
chunked = jax.jit(
    lambda x, s0: chunk_gated_delta_rule_ref(*x, initial_state=s0, use_qk_l2norm=True)
)
seam = jax.jit(
    lambda x, s0, impl, all_states=False: ops.gated_delta_rule(
        *x, initial_state=s0, impl=impl, return_all_states=all_states
    ),
    static_argnums=(2, 3),
)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
def test_recurrent_equals_chunked(T):
    """Both HV/H ratios, with and without an initial state (two combinations per T keep the
    number of compilations down; each feature is exercised at every T)."""
    for ratio, with_state in ((1, False), (2, True)):
        x, s0 = inputs(T, ratio, with_state, seed=T + ratio)
        o_r, s_r = recurrent(x, s0)
        o_c, s_c = chunked(x, s0)
        assert o_r.shape == (B, T, H * ratio, V) and s_r.shape == (B, H * ratio, K, V)
        assert s_r.dtype == s_c.dtype == jnp.float32
        close(o_c, o_r)
        close(s_c, s_r)


def test_state_matters():
    """Guard against a vacuous ladder: the initial state changes the output."""
    x, s0 = inputs(65, 2, True, seed=1)
    o_with, _ = chunked(x, s0)
    o_without, _ = chunked(x, np.zeros_like(s0))
    assert np.max(np.abs(np.asarray(o_with) - np.asarray(o_without))) > 1e-2


@pytest.mark.parametrize("impl,split", [("recurrent", 100), ("chunked", 64), ("chunked", 100)])
def test_two_pieces_equal_whole(impl, split):
    """Process [0, split) then [split, T) with the carried state == process [0, T)."""
    T = 130
    x, s0 = inputs(T, 2, True, seed=split)
    fn = recurrent if impl == "recurrent" else chunked
    o, s = fn(x, s0)
    first = tuple(a[:, :split] for a in x)
    second = tuple(a[:, split:] for a in x)
    o1, s1 = fn(first, s0)
    o2, s2 = fn(second, s1)
    close(jnp.concatenate([o1, o2], axis=1), o)
    close(s2, s)


@pytest.mark.parametrize("T", [1, 65])
def test_ops_seam(T):
    """`ops.gated_delta_rule` with impl recurrent / chunked / auto agree with each other; the
    all-states path's last state is the final state."""
    x, s0 = inputs(T, 2, True, seed=7)
    o_r, s_r = seam(x, s0, "recurrent")
    o_c, s_c = seam(x, s0, "chunked")
    o_a, s_a = seam(x, s0, "auto")
    close(o_c, o_r)
    close(s_c, s_r)
    close(o_a, o_r)
    close(s_a, s_r)
    o_all, s_fin, s_all = seam(x, s0, "auto", True)
    close(o_all, o_r)
    np.testing.assert_array_equal(np.asarray(s_all[:, -1]), np.asarray(s_fin))
    close(s_fin, s_r)
    with pytest.raises(ValueError, match="gdn_impl"):
        ops.gated_delta_rule(*x, impl="nope")


def test_padding_is_a_no_op():
    """g = beta = 0 on trailing tokens leaves the state exactly unchanged (right padding)."""
    x, s0 = inputs(70, 2, True, seed=3)
    q, k, v, g, beta = x
    g, beta = g.at[:, 50:].set(0.0), beta.at[:, 50:].set(0.0)
    _, s_pad = chunked((q, k, v, g, beta), s0)
    _, s_cut = chunked(tuple(a[:, :50] for a in (q, k, v, g, beta)), s0)
    close(s_pad, s_cut, 1e-6)
