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


def test_pallas_takes_the_grouped_gemm_above_64_tokens(moe_inputs):
    """74 tokens (above the decode kernel's 64) run through the prefill grouped GEMM."""
    x, weights, experts, gate_up, down = moe_inputs
    many = (jnp.tile(x, (2, 1)), jnp.tile(weights, (2, 1)), jnp.tile(experts, (2, 1)))
    ref = ops.moe_experts(*many, gate_up, down, impl="dense")
    got = ops.moe_experts(*many, gate_up, down, impl="pallas")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_decode_blocks_are_read_at_each_trace(moe_inputs, monkeypatch):
    """pallas_kernels.moe.DECODE_BLOCKS is what the decode kernel gets, read when the call is
    traced (benchmarks set it between cases): a changed setting reaches the next call."""
    import pallas_kernels.moe as pallas_moe

    ops.moe_experts(*moe_inputs, impl="pallas")  # 37 tokens: the decode kernel, default blocks
    monkeypatch.setattr(pallas_moe, "DECODE_BLOCKS", pallas_moe.MoEBlocks(block_f=48))
    with pytest.raises(ValueError, match="block_f=48"):
        ops.moe_experts(*moe_inputs, impl="pallas")


@pytest.mark.parametrize("shared_ffw", [48, 32])
def test_scanned_model_reads_expert_stacks_in_place(shared_ffw):
    """8 layers = 2 scanned repeats of [GDN x3, attention]: the routed experts stay whole
    [L, E, ...] inside the scan and every path picks the layer by index; all equal the dense
    reference (the Pallas kernel in interpret mode). A shared expert no wider than the routed
    ones (32 <= F = 32) is the decode kernels' extra tile; a wider one (48) runs apart."""
    from flax import nnx

    from qnext_jax.config import RuntimeOptions, tiny_config
    from qnext_jax.model import Qwen3NextForCausalLM

    cfg = tiny_config(num_hidden_layers=8, shared_expert_intermediate_size=shared_ffw)
    ids = jax.random.randint(jax.random.key(0), (2, 5), 0, cfg.vocab_size)

    def logits(impl):
        opts = RuntimeOptions(dtype="float32", moe_impl=impl)
        model = Qwen3NextForCausalLM(cfg, opts, rngs=nnx.Rngs(3))
        stack = model.segments[0].group.layers[0].mlp.gate_up
        assert stack.shape[0] == 2  # stacked over the 2 repeats
        return np.asarray(model(ids))

    want = logits("dense")
    for impl in ("pallas", "gather", "grouped"):
        np.testing.assert_allclose(logits(impl), want, rtol=1e-5, atol=1e-5)


def test_scan_does_not_slice_expert_stacks():
    """The scan over layers carries the routed experts' [L, E, D, 2F] / [L, E, F, D] stacks as
    loop-invariant operands, never as per-layer slices (xs): a slice fed to the Pallas kernel
    is a copy of every local expert per step (found on the 80B model: 55 ms per decode step)."""
    from flax import nnx

    from qnext_jax.config import RuntimeOptions, tiny_config
    from qnext_jax.model import Qwen3NextForCausalLM

    cfg = tiny_config(num_hidden_layers=8)
    model = Qwen3NextForCausalLM(cfg, RuntimeOptions(dtype="float32"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, ids: nnx.merge(graphdef, s)(ids))(
        state, jnp.zeros((1, 4), jnp.int32)
    )
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    stacks = {(2, E, D, 2 * F), (2, E, F, D)}
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert scans
    for eqn in scans:
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        consts = [v.aval.shape for v in eqn.invars[:n_consts]]
        xs = [v.aval.shape for v in eqn.invars[n_consts + n_carry :]]
        assert not stacks & set(xs), f"expert stacks sliced by the scan: {xs}"
        assert stacks <= set(consts)


@pytest.mark.parametrize("impl", ["gather", "grouped", "pallas"])
def test_invalid_tokens_reach_no_expert(impl):
    """Padding and idle decode slots (valid=False) cost no expert reads: their output is the
    shared expert's alone, and the valid tokens' outputs are unchanged."""
    from flax import nnx

    from qnext_jax.config import RuntimeOptions, tiny_config
    from qnext_jax.moe import SparseMoE

    cfg = tiny_config(hidden_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    moe = SparseMoE(cfg, RuntimeOptions(moe_impl=impl), dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 32)), jnp.float32)
    valid = jnp.asarray([[True] * 5, [True, True, False, False, False]])
    full, masked = moe(x), moe(x, valid=valid)
    shared = moe.shared_expert(x) * jax.nn.sigmoid(moe.shared_expert_gate(x))
    np.testing.assert_allclose(masked[valid], full[valid], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(masked[~valid], shared[~valid], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(full[~valid] - shared[~valid]).max()) > 1e-3  # routing did contribute
