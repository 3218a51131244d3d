"""Pallas gated delta rule kernels (chunked prefill, fused decode) vs the fp32 references.

Small K/V and few heads keep the interpret-mode runs quick; the cases cover T around the chunk
size (63, 64, 65), a multi-chunk T (200), T = 1, HV/H = 1 and 2, with and without an initial
state, bf16 and fp32 inputs, and the segmented (parallel) state pass.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from kernel_utils import INTERPRET, TOL, gdn_inputs, rel_err, run

from pallas_kernels.gated_delta_rule import (
    ChunkBlocks,
    DecodeBlocks,
    chunk_gated_delta_rule,
    fused_gdn_decode,
    fused_recurrent_gated_delta_rule,
    gdn_gates,
    recurrent_gated_delta_rule,
)

K = V = 32
SMALL = ChunkBlocks(block_v=16)


def _ref(q, k, v, g, beta, s0, **kw):
    f32 = lambda x: x.astype(jnp.float32)
    return run(
        recurrent_gated_delta_rule,
        f32(q),
        f32(k),
        f32(v),
        g,
        f32(beta),
        initial_state=s0,
        use_qk_l2norm=True,
        **kw,
    )


def _chunk(q, k, v, g, beta, s0, blocks):
    return run(
        chunk_gated_delta_rule,
        q,
        k,
        v,
        g,
        beta,
        initial_state=s0,
        use_qk_l2norm=True,
        interpret=INTERPRET,
        blocks=blocks,
    )


@pytest.mark.parametrize(
    "T, R, with_state, dtype, segments, chunk",
    [
        (1, 1, False, jnp.float32, 1, 64),
        (63, 2, True, jnp.bfloat16, 1, 64),
        (64, 1, True, jnp.float32, 1, 64),
        (65, 2, False, jnp.float32, 1, 64),
        (200, 2, True, jnp.bfloat16, 1, 64),
        (200, 1, False, jnp.float32, 1, 64),
        (200, 2, True, jnp.float32, 2, 64),  # segmented state pass (affine maps composed)
        (256, 1, True, jnp.bfloat16, 4, 64),
        (100, 2, True, jnp.bfloat16, 1, 32),  # the chunk picked for large batches
        (65, 1, False, jnp.float32, 1, 32),
    ],
)
def test_chunk_matches_reference(T, R, with_state, dtype, segments, chunk):
    q, k, v, g, beta, s0 = gdn_inputs(2, T, 2, R, K, V, dtype, seed=T + R, with_state=with_state)
    blocks = ChunkBlocks(chunk=chunk, block_v=16, num_segments=segments)
    o, st = _chunk(q, k, v, g, beta, s0, blocks)
    o_ref, st_ref = _ref(q, k, v, g, beta, s0)
    assert o.shape == v.shape and o.dtype == v.dtype
    assert st.shape == (2, 2 * R, K, V) and st.dtype == jnp.float32
    assert rel_err(o, o_ref) < TOL[dtype]
    assert rel_err(st, st_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype, chunk", [(jnp.bfloat16, 64), (jnp.float32, 64), (jnp.float32, 32)])
def test_chunk_split_inverse_matches_reference(dtype, chunk):
    """The prep kernel's inverse by halves of the chunk (ChunkBlocks.split_inverse) gives the
    reference's output, and the whole-chunk inverse's within the dtype's rounding."""
    q, k, v, g, beta, s0 = gdn_inputs(1, 150, 2, 2, K, V, dtype, seed=13)

    def prefill(split):
        blocks = ChunkBlocks(chunk=chunk, block_v=16, split_inverse=split)
        return _chunk(q, k, v, g, beta, s0, blocks)

    (o, st), (o_whole, st_whole) = prefill(True), prefill(False)
    o_ref, st_ref = _ref(q, k, v, g, beta, s0)
    assert rel_err(o, o_ref) < TOL[dtype] and rel_err(st, st_ref) < TOL[dtype]
    assert rel_err(o, o_whole) < TOL[dtype] and rel_err(st, st_whole) < TOL[dtype]
    with pytest.raises(ValueError, match="split_inverse needs chunk >= 32"):
        _chunk(q, k, v, g, beta, s0, ChunkBlocks(chunk=16, block_v=16, split_inverse=True))


@pytest.mark.parametrize("dtype, segments", [(jnp.bfloat16, 1), (jnp.float32, 2)])
def test_chunk_output_apart_equals_fused(dtype, segments):
    """The output formed by its own kernel from the stored chunk states and v_new
    (ChunkBlocks.o_apart) equals the fused pass's: the same products of the same operands."""
    q, k, v, g, beta, s0 = gdn_inputs(1, 150, 2, 2, K, V, dtype, seed=11)

    def prefill(**kw):
        return _chunk(q, k, v, g, beta, s0, ChunkBlocks(block_v=16, num_segments=segments, **kw))

    (o, st), (o_apart, st_apart) = prefill(), prefill(o_apart=True, o_block_v=16)
    assert o_apart.shape == o.shape and o_apart.dtype == o.dtype
    assert rel_err(o_apart, o) < 1e-6 and rel_err(st_apart, st) == 0
    o_ref, _ = _ref(q, k, v, g, beta, s0)
    assert rel_err(o_apart, o_ref) < TOL[dtype]
    with pytest.raises(ValueError, match="o_block_v=24 must be a power of 2 dividing V"):
        prefill(o_apart=True, o_block_v=24)


def test_chunk_two_pieces_equal_one():
    """Prefill in two pieces, state carried, equals one prefill of the whole sequence."""
    q, k, v, g, beta, s0 = gdn_inputs(1, 130, 2, 2, K, V, jnp.float32, seed=7)
    prefill = lambda sl, s: _chunk(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], s, SMALL)
    o_all, s_all = prefill(slice(0, 130), s0)
    o1, s1 = prefill(slice(0, 65), s0)
    o2, s2 = prefill(slice(65, 130), s1)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o_all) < TOL[jnp.float32]
    assert rel_err(s2, s_all) < TOL[jnp.float32]


@pytest.mark.parametrize(
    "T, R, with_state, dtype",
    [
        (1, 2, True, jnp.float32),
        (1, 1, False, jnp.bfloat16),
        (3, 1, True, jnp.bfloat16),
        (8, 2, True, jnp.float32),
    ],
)
def test_decode_matches_reference(T, R, with_state, dtype):
    q, k, v, g, beta, s0 = gdn_inputs(3, T, 2, R, K, V, dtype, seed=10 + T, with_state=with_state)
    o, st, all_s = run(
        fused_recurrent_gated_delta_rule,
        q,
        k,
        v,
        g,
        beta,
        initial_state=s0,
        use_qk_l2norm=True,
        return_all_states=True,
        interpret=INTERPRET,
        blocks=DecodeBlocks(block_v=16),
    )
    o_ref, st_ref, all_ref = _ref(q, k, v, g, beta, s0, return_all_states=True)
    assert o.dtype == v.dtype and all_s.shape == (3, T, 2 * R, K, V)
    # The decode kernel keeps everything in fp32 (no tensor-core products): only o's final
    # rounding to the input dtype differs, so fp32 is checked at 1e-5 on every backend.
    tol = 1e-5 if dtype == jnp.float32 else TOL[dtype]
    assert rel_err(o, o_ref) < tol
    assert rel_err(st, st_ref) < 1e-5
    assert rel_err(all_s, all_ref) < 1e-5


@pytest.mark.parametrize("T, all_states", [(1, False), (4, True)])
def test_decode_updates_a_state_stack_in_place(T, all_states):
    """With state_layer the kernel reads and writes one layer of a [L, B, HV, K, V] stack:
    that layer ends as the per-layer call's final state, the other layers are untouched."""
    q, k, v, g, beta, s0 = gdn_inputs(2, T, 2, 2, K, V, jnp.float32, seed=20 + T)
    stack = jnp.stack([s0 + 1.0, s0, s0 - 1.0])  # [3, B, HV, K, V]
    kw = dict(use_qk_l2norm=True, interpret=INTERPRET, blocks=DecodeBlocks(block_v=16))
    o_ref, st_ref, *all_ref = run(
        fused_recurrent_gated_delta_rule,
        q,
        k,
        v,
        g,
        beta,
        initial_state=s0,
        return_all_states=all_states,
        **kw,
    )
    o, new, *all_s = run(
        fused_recurrent_gated_delta_rule,
        q,
        k,
        v,
        g,
        beta,
        initial_state=stack,
        state_layer=jnp.int32(1),
        return_all_states=all_states,
        **kw,
    )
    assert new.shape == stack.shape
    assert rel_err(o, o_ref) < 1e-6 and rel_err(new[1], st_ref) < 1e-6
    assert jnp.array_equal(new[0], stack[0]) and jnp.array_equal(new[2], stack[2])
    if all_states:
        assert rel_err(all_s[0], all_ref[0]) < 1e-6
    with pytest.raises(ValueError, match="fp32 stack"):
        fused_recurrent_gated_delta_rule(
            q, k, v, g, beta, initial_state=s0, state_layer=0, interpret=INTERPRET
        )
    with pytest.raises(ValueError, match="output_final_state"):
        fused_recurrent_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=stack,
            state_layer=0,
            output_final_state=False,
            interpret=INTERPRET,
        )


@pytest.mark.parametrize("T, R, dtype", [(1, 2, jnp.bfloat16), (3, 1, jnp.float32)])
def test_decode_from_projections(T, R, dtype):
    """fused_gdn_decode reads q, k, v from the grouped conv output [B, T, H, 2K + R*V] and
    computes the gates from ba [B, T, H, 2R] in the kernel: equal to splitting them outside
    and the recurrent reference; padded positions (n_valid) leave the state unchanged."""
    import numpy as np

    B, H = 3, 2
    HV = H * R
    q, k, v, _, _, s0 = gdn_inputs(B, T, H, R, K, V, dtype, seed=40 + T)
    rng = np.random.default_rng(T)
    ba = jnp.asarray(rng.standard_normal((B, T, H, 2 * R)), dtype)
    A_log = jnp.asarray(np.log(np.linspace(1.0, 16.0, HV)), dtype)
    dt_bias = jnp.asarray(rng.standard_normal(HV), dtype)
    qkv = jnp.concatenate([q, k, v.reshape(B, T, H, R * V)], axis=-1)
    n_valid = jnp.asarray([T, 0, 1], jnp.int32)
    stack = jnp.stack([s0 + 1.0, s0])
    o, new = run(
        fused_gdn_decode,
        qkv,
        ba,
        A_log,
        dt_bias,
        stack,
        jnp.int32(1),
        key_dim=K,
        n_valid=n_valid,
        interpret=INTERPRET,
        blocks=DecodeBlocks(block_v=16),
    )
    b, a = ba[..., :R].reshape(B, T, HV), ba[..., R:].reshape(B, T, HV)
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    real = (jnp.arange(T)[None, :] < n_valid[:, None])[..., None]
    g, beta = jnp.where(real, g, 0.0), jnp.where(real, beta, 0)
    o_ref, st_ref = _ref(q, k, v, g, beta, s0)
    assert jnp.array_equal(new[0], stack[0])
    assert rel_err(new[1], st_ref) < TOL[dtype] and rel_err(o, o_ref) < TOL[dtype]
    assert rel_err(new[1, 1], s0[1]) == 0.0  # a row with no real token: state unchanged
    # A_log and dt_bias stacked like the state: the layer's read in place
    o2, new2 = run(
        fused_gdn_decode,
        qkv,
        ba,
        jnp.stack([A_log * 0, A_log]),
        jnp.stack([dt_bias + 1, dt_bias]),
        stack,
        jnp.int32(1),
        key_dim=K,
        n_valid=n_valid,
        interpret=INTERPRET,
        blocks=DecodeBlocks(block_v=16),
    )
    assert rel_err(o2, o) == 0.0 and rel_err(new2, new) == 0.0
    with pytest.raises(ValueError, match="2K"):
        fused_gdn_decode(qkv[..., 1:], ba, A_log, dt_bias, stack, 0, key_dim=K, interpret=INTERPRET)
    with pytest.raises(ValueError, match="2R"):
        fused_gdn_decode(qkv, ba[..., :1], A_log, dt_bias, stack, 0, key_dim=K, interpret=INTERPRET)


def test_decode_after_prefill_equals_longer_prefill():
    """Prefill 70 tokens, then decode 1 + 4 tokens (rollback states too): equals a 75-token run."""
    q, k, v, g, beta, s0 = gdn_inputs(2, 75, 2, 2, K, V, jnp.float32, seed=3)
    cut = lambda a, b: (q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b])
    o_full, s_full = run(
        chunk_gated_delta_rule,
        *cut(0, 75),
        initial_state=s0,
        use_qk_l2norm=True,
        interpret=INTERPRET,
        blocks=SMALL,
    )
    _, s = run(
        chunk_gated_delta_rule,
        *cut(0, 70),
        initial_state=s0,
        use_qk_l2norm=True,
        interpret=INTERPRET,
        blocks=SMALL,
    )
    dec = dict(use_qk_l2norm=True, interpret=INTERPRET, blocks=DecodeBlocks(block_v=16))
    o1, s = run(fused_recurrent_gated_delta_rule, *cut(70, 71), initial_state=s, **dec)
    o4, s, all_s = run(
        fused_recurrent_gated_delta_rule,
        *cut(71, 75),
        initial_state=s,
        return_all_states=True,
        **dec,
    )
    assert rel_err(jnp.concatenate([o1, o4], axis=1), o_full[:, 70:]) < TOL[jnp.float32]
    assert rel_err(s, s_full) < TOL[jnp.float32]
    assert rel_err(all_s[:, -1], s) < 1e-6  # the same state, written twice


def test_contract_violations_raise():
    q, k, v, g, beta, s0 = gdn_inputs(1, 8, 2, 2, K, V, jnp.float32)
    kw = dict(interpret=INTERPRET)
    for fn in (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule):
        with pytest.raises(ValueError, match="multiple"):  # HV=3 not a multiple of H=2
            fn(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3], **kw)
        with pytest.raises(ValueError, match="rank"):
            fn(q[0], k, v, g, beta, **kw)
        with pytest.raises(ValueError, match="v must be"):  # mismatched T
            fn(q, k, v[:, :4], g, beta, **kw)
        with pytest.raises(ValueError, match="floating"):
            fn(q, k, v, g, beta.astype(jnp.int32), **kw)
        with pytest.raises(ValueError, match="initial_state"):
            fn(q, k, v, g, beta, initial_state=s0[:, :, :4], **kw)


@pytest.mark.parametrize("C", [1, 6, 64])
def test_unit_lower_inverse(C):
    """The chunked reference's triangular inverse (block doubling; C = 6 is padded to 8)."""
    import numpy as np

    from pallas_kernels.gated_delta_rule.reference import unit_lower_inverse

    rng = np.random.default_rng(C)
    m = np.tril(rng.standard_normal((2, 3, C, C)) * 0.3, -1) + np.eye(C)
    got = np.asarray(unit_lower_inverse(jnp.asarray(m, jnp.float32)))
    assert rel_err(got, np.linalg.inv(m)) < 1e-6


def test_chunked_reference_calls_no_lapack():
    """No triangular_solve in the chunked reference: on the CPU it is a LAPACK call whose batch
    loop waits on XLA's intra-op pool, and two at once on a 2-core machine hung the engine."""
    import jax

    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule_ref

    q, k, v, g, beta, s0 = gdn_inputs(1, 70, 2, 2, K, V, jnp.float32)
    jaxpr = str(jax.make_jaxpr(chunk_gated_delta_rule_ref)(q, k, v, g, beta, initial_state=s0))
    assert "triangular_solve" not in jaxpr
