"""Every routed-expert path equals the every-expert reference, including the capacity-padded
grouped path with more rows than capacity (several passes) and experts held elsewhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax import ops


@pytest.fixture(scope="module")
def moe_inputs():
    rng = np.random.default_rng(0)
    N, k, E, D, F = 37, 3, 8, 32, 16  # D, F multiples of 16: the Pallas path's smallest block
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    experts = jnp.asarray(rng.integers(0, E, (N, k)), jnp.int32)
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((N, k)), jnp.float32), -1)
    gate_up = jnp.asarray(rng.standard_normal((E, D, 2 * F)), jnp.float32) / 4
    down = jnp.asarray(rng.standard_normal((E, F, D)), jnp.float32) / 4
    return x, weights, experts, gate_up, down


@pytest.mark.parametrize("impl", ["gather", "ragged", "grouped", "pallas"])
def test_expert_paths_equal_dense(moe_inputs, impl):
    ref = ops.moe_experts(*moe_inputs, impl="dense")
    np.testing.assert_allclose(ops.moe_experts(*moe_inputs, impl=impl), ref, rtol=1e-5, atol=1e-6)


def test_grouped_takes_extra_passes_and_skips_foreign_experts(moe_inputs):
    x, _, experts, gate_up, down = moe_inputs
    ref = ops._expert_dense(x, experts, gate_up, down)
    few = ops._expert_grouped(x, experts, gate_up, down, capacity=2)  # ~7 passes
    np.testing.assert_allclose(few, ref, rtol=1e-5, atol=1e-6)
    foreign = experts.at[:5].set(gate_up.shape[0])  # id E: held by another device
    out = ops._expert_grouped(x, foreign, gate_up, down)
    assert float(jnp.abs(out[:5]).max()) == 0.0
    np.testing.assert_allclose(out[5:], ref[5:], rtol=1e-5, atol=1e-6)


def test_unknown_impl_is_rejected(moe_inputs):
    with pytest.raises(ValueError, match="moe_impl='fast'"):
        ops.moe_experts(*moe_inputs, impl="fast")


def test_pallas_decode_path_is_bounded(moe_inputs):
    x, weights, experts, gate_up, down = moe_inputs
    many = jnp.tile(x, (2, 1))  # 74 tokens: above the decode kernel's 64
    with pytest.raises(ValueError, match="at most 64 tokens"):
        ops.moe_experts(
            many, jnp.tile(weights, (2, 1)), jnp.tile(experts, (2, 1)), gate_up, down, impl="pallas"
        )
