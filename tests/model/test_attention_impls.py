"""Blockwise (flash-style) attention equals the dense score matrix: GQA, a cache with empty
slots, padded queries, a key count that is not a multiple of the block, skipped blocks; and the
whole model decodes the same through it."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import jax_logits, rel_err

from qnext_jax import ops

TOL = 1e-5  # fp32; the two differ only in summation order


def _inputs(B=2, T=9, S=100, H=4, KVH=2, D=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, KVH, D)), jnp.float32) for _ in range(2))
    lengths = np.array([40, 75])  # row b holds positions 0..lengths[b]-1, the rest is empty
    k_pos = np.where(np.arange(S)[None] < lengths[:, None], np.arange(S)[None], -1)
    q_pos = lengths[:, None] - T + np.arange(T)[None]  # the last T positions of each row
    q_pos[0, -2:] = -2  # padded queries see nothing
    return q, k, v, jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32)


@pytest.mark.parametrize("block", [16, 33, 128])
def test_blockwise_equals_dense(block):
    q, k, v, q_pos, k_pos = _inputs()
    dense = ops._attention_dense(q, k, v, q_pos, k_pos, 0.25)
    blockwise = ops._attention_blockwise(q, k, v, q_pos, k_pos, 0.25, block)
    np.testing.assert_allclose(blockwise, dense, rtol=TOL, atol=TOL)
    assert float(jnp.abs(blockwise[0, -2:]).max()) == 0.0  # padded queries: zeros


def test_auto_walks_keys_in_blocks_above_the_score_budget(monkeypatch):
    q, k, v, q_pos, k_pos = _inputs()
    dense = ops.attention(q, k, v, q_pos, k_pos, scale=0.25, impl="dense")
    monkeypatch.setattr(ops, "SCORE_BYTES", 2 * 9 * 4 * 4 * 16)  # a 16-key block
    monkeypatch.setattr(ops, "MIN_KEY_BLOCK", 8)
    calls = []
    real = ops._attention_blockwise
    monkeypatch.setattr(ops, "_attention_blockwise", lambda *a: calls.append(a[-1]) or real(*a))
    auto = ops.attention(q, k, v, q_pos, k_pos, scale=0.25)
    assert calls == [16]
    np.testing.assert_allclose(auto, dense, rtol=TOL, atol=TOL)


def test_bad_impl_is_named():
    with pytest.raises(ValueError, match="impl='flash'.*allowed"):
        ops.attention(*_inputs(), scale=1.0, impl="flash")


def test_model_decodes_the_same_through_blockwise(base_model, monkeypatch):
    """Prefill 12 tokens then a 6-token chunk with blockwise attention (8-key blocks over a
    32-slot cache): logits equal the dense full forward's."""
    monkeypatch.setattr(ops, "MIN_KEY_BLOCK", 8)
    monkeypatch.setattr(ops, "SCORE_BYTES", 1 << 10)
    opts = dataclasses.replace(base_model.opts, attention_impl="blockwise")
    graphdef = nnx.split(nnx.eval_shape(lambda: type(base_model)(base_model.config, opts)))[0]
    model = nnx.merge(graphdef, nnx.state(base_model))
    B, T = 2, 18
    ids = np.random.default_rng(3).integers(0, 128, (B, T))
    full = jax_logits(base_model, ids)
    cache = model.init_cache(B, 32)
    pieces = []
    for a, b in [(0, 12), (12, 18)]:
        out = model.forward(
            jnp.asarray(ids[:, a:b]),
            jnp.asarray(np.broadcast_to(np.arange(a, b), (B, b - a))),
            cache,
        )
        pieces.append(np.asarray(model.compute_logits(out.hidden)))
        cache = out.cache
    err = rel_err(np.concatenate(pieces, axis=1), full)
    print(f"\n[attention] blockwise incremental vs dense full forward: {err:.2e}")
    assert err <= TOL


def test_cudnn_is_refused_off_the_gpu_and_auto_never_picks_it_there():
    q, k, v, q_pos, k_pos = _inputs()
    if ops.on_gpu():
        pytest.skip("the GPU check is test_cudnn_matches_dense")
    with pytest.raises(ValueError, match="impl='cudnn' needs a GPU"):
        ops.attention(q, k, v, q_pos, k_pos, scale=0.25, impl="cudnn")
    auto = ops.attention(q, k, v, q_pos, k_pos, scale=0.25)
    np.testing.assert_allclose(auto, ops._attention_dense(q, k, v, q_pos, k_pos, 0.25), rtol=TOL)


def _chunk_inputs(dtype=jnp.float32, H=4, KVH=2, D=16, seed=3):
    """A cache [B=3, S=100] holding each row's chunk at index = position: row 0 has a prefix of
    30 and 16 queries; row 1 no prefix and 11 queries (then padding); row 2 is all padding."""
    rng = np.random.default_rng(seed)
    B, T, S = 3, 16, 100
    p0, n = np.array([30, 0, 0]), np.array([16, 11, 0])
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((B, S, KVH, D)), dtype) for _ in "kv")
    t = np.arange(T)
    q_pos = np.where(t[None] < n[:, None], p0[:, None] + t[None], -2)
    idx = np.minimum(p0[:, None] + t[None], S - 1)
    chunk = tuple(jnp.take_along_axis(a, jnp.asarray(idx)[:, :, None, None], 1) for a in (k, v))
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    return q, k, v, jnp.asarray(q_pos, jnp.int32), k_pos, chunk


def test_split_chunk_attention_equals_dense():
    """The chunk-against-itself + prefix split, merged by log-sum-exps (XLA's fused attention
    standing in for cuDNN on the CPU), equals the dense path; padded queries give zeros."""
    q, k, v, q_pos, k_pos, chunk = _chunk_inputs()
    want = ops._attention_dense(q, k, v, q_pos, k_pos, 0.25)
    got = ops._attention_split(q, *chunk, k, v, q_pos, k_pos, 0.25, "xla", "dense")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got[1, 11:]).max()) == 0.0 and float(jnp.abs(got[2]).max()) == 0.0


def test_split_falls_back_when_positions_are_not_contiguous():
    q, k, v, q_pos, k_pos, chunk = _chunk_inputs()
    q_pos = q_pos.at[0, 5].set(60)  # a gap: the split would be wrong, the mask is right
    want = ops._attention_dense(q, k, v, q_pos, k_pos, 0.25)
    got = ops._attention_split(q, *chunk, k, v, q_pos, k_pos, 0.25, "xla", "dense")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ops.on_gpu(), reason="cuDNN attention runs on the GPU only")
def test_cudnn_matches_dense():
    """bf16, head_dim 256, 8 query heads per KV head, a cache with empty slots and a prefix
    (queries at the end of each row), padded queries; also a prompt's first chunk (T = S)."""
    import jax

    H, KVH, D = 16, 2, 256
    cudnn = jax.jit(lambda *a: ops.attention(*a, scale=D**-0.5, impl="cudnn"))
    for B, T, S, lengths in ((2, 64, 200, [120, 190]), (1, 256, 256, [256])):
        rng = np.random.default_rng(T)
        q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.standard_normal((B, S, KVH, D)), jnp.bfloat16) for _ in "kv")
        lengths = np.array(lengths)
        k_pos = np.where(np.arange(S)[None] < lengths[:, None], np.arange(S)[None], -1)
        q_pos = lengths[:, None] - T + np.arange(T)[None]
        q_pos[0, -3:] = -2
        args = (q, k, v, jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32))
        f32 = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]
        want = ops._attention_dense(*f32, D**-0.5)
        got = cudnn(*args)
        assert float(jnp.abs(got[0, -3:]).max()) == 0.0
        assert rel_err(np.asarray(got, np.float32), np.asarray(want)) < 2e-2  # bf16 output


@pytest.mark.skipif(not ops.on_gpu(), reason="cuDNN attention runs on the GPU only")
def test_cudnn_chunk_split_matches_dense():
    """The bias-free split on cuDNN (its fp32 log-sum-exp), head_dim 256, 8:1 GQA, bf16; and
    the masked fallback for positions with a gap."""
    import jax

    D = 256
    q, k, v, q_pos, k_pos, chunk = _chunk_inputs(jnp.bfloat16, H=16, KVH=2, D=D)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    attend = jax.jit(lambda *a, chunk: ops.attention(*a, scale=D**-0.5, impl="cudnn", chunk=chunk))
    for pos in (q_pos, q_pos.at[0, 5].set(60)):
        want = ops._attention_dense(*f32, pos, k_pos, D**-0.5)
        got = attend(q, k, v, pos, k_pos, chunk=chunk)
        assert rel_err(np.asarray(got, np.float32), np.asarray(want)) < 2e-2  # bf16 output
        assert float(jnp.abs(got[2]).max()) == 0.0
