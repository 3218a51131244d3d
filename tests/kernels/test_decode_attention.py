"""Pallas decode attention (split along the sequence) vs the jnp reference.

Small heads keep interpret mode quick; the cases cover T = 1 and a verify pass (T = 3, rows
padded to 16), GQA groups of 1 and 4, several splits with empty ones, positions that stop
mid-block, a padded query (sees nothing: zeros), and the layer stack read in place."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import INTERPRET, TOL, rel_err, run

from pallas_kernels.attention import DecodeAttentionBlocks, decode_attention, decode_attention_ref

D = 32


def _inputs(B, T, H, KVH, S, dtype, seed, L=None):
    rng = np.random.default_rng(seed)
    lead = (B,) if L is None else (L, B)
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((*lead, S, KVH, D)), dtype)
    v = jnp.asarray(rng.standard_normal((*lead, S, KVH, D)), dtype)
    return q, k, v


@pytest.mark.parametrize(
    "T, H, KVH, splits, dtype",
    [
        (1, 4, 1, None, jnp.float32),
        (3, 4, 2, 3, jnp.float32),
        (1, 2, 2, 4, jnp.bfloat16),
        (2, 8, 2, 1, jnp.bfloat16),
    ],
)
def test_decode_attention_matches_reference(T, H, KVH, splits, dtype):
    B, S = 3, 128
    q, k, v = _inputs(B, T, H, KVH, S, dtype, seed=T + H)
    # row 0 mid-block, row 1 at the last key, row 2 early (later splits see nothing)
    last = np.array([70, S - 1, 5])
    pos = jnp.asarray(last[:, None] - T + 1 + np.arange(T)[None], jnp.int32)
    pos = pos.at[2, -1].set(-1) if T > 1 else pos  # a padded query
    blocks = DecodeAttentionBlocks(block_s=16, num_splits=splits)
    o = run(decode_attention, q, k, v, pos, interpret=INTERPRET, blocks=blocks)
    want = decode_attention_ref(q, k, v, pos)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert rel_err(o, want) < TOL[dtype]
    if T > 1:
        assert not np.any(np.asarray(o[2, -1], np.float32))  # padded: zeros


def test_decode_attention_reads_the_layer_stack():
    q, k, v = _inputs(2, 1, 4, 2, 64, jnp.float32, seed=1, L=3)
    pos = jnp.asarray([[40], [63]], jnp.int32)
    blocks = DecodeAttentionBlocks(block_s=16, num_splits=2)
    o = run(decode_attention, q, k, v, pos, layer=jnp.int32(2), interpret=INTERPRET, blocks=blocks)
    want = decode_attention_ref(q, k[2], v[2], pos)
    assert rel_err(o, want) < TOL[jnp.float32]
    assert rel_err(decode_attention_ref(q, k, v, pos, layer=2), want) < 1e-6


def test_decode_attention_contract():
    q, k, v = _inputs(2, 1, 4, 2, 64, jnp.float32, seed=2)
    pos = jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention(q[:, :, :3], k, v, pos, interpret=True)
    with pytest.raises(ValueError, match="with `layer`"):
        decode_attention(q, k, v, pos, layer=0, interpret=True)
    with pytest.raises(ValueError, match="q_pos"):
        decode_attention(q, k, v, pos[:, 0], interpret=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        decode_attention(q, k[:, :40], v[:, :40], pos, interpret=True)
