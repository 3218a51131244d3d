"""The sampler's filters against hand-computed distributions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qnext_jax.sampling import SamplerRows, apply_penalties, filter_logits, sample, seed_key


def rows(B=1, **kw):
    r = SamplerRows.zeros(B)
    r = r.replace(temperature=jnp.ones((B,)))
    return r.replace(**{k: jnp.full((B,), v, getattr(r, k).dtype) for k, v in kw.items()})


def kept(logits, **kw):
    out = filter_logits(jnp.log(jnp.asarray([logits], jnp.float32)), rows(**kw))
    return np.isfinite(np.asarray(out[0])).tolist()


def test_top_k_top_p_min_p():
    p = [0.5, 0.3, 0.15, 0.05]
    assert kept(p, top_k=2) == [True, True, False, False]
    assert kept(p, top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(p, top_p=0.81) == [True, True, True, False]
    assert kept(p, min_p=0.5) == [True, True, False, False]  # p >= 0.5 * 0.5
    assert kept(p, top_p=1.0) == [True, True, True, True]


def test_penalties_follow_vllm():
    logits = jnp.asarray([[2.0, -2.0, 1.0]])
    counts = jnp.asarray([[2, 1, 0]])
    seen = jnp.asarray([[True, True, True]])
    r = rows(repetition=2.0, frequency=0.5, presence=0.25)
    out = np.asarray(apply_penalties(logits, r, counts, seen))[0]
    np.testing.assert_allclose(out, [2.0 / 2 - 1.0 - 0.25, -2.0 * 2 - 0.5 - 0.25, 1.0 / 2])


def test_sampling_frequencies_match_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    B = 4000
    r = rows(B).replace(key=jnp.asarray(np.stack([seed_key(i) for i in range(B)])))
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (B, 3))
    toks = sample(
        logits, r, jnp.zeros((B, 3), jnp.int32), jnp.zeros((B, 3), bool), jnp.zeros((B,), jnp.int32)
    )
    freq = np.bincount(np.asarray(toks), minlength=3) / B
    assert np.all(np.abs(freq - probs) < 0.03), freq  # ~4 sigma at B=4000
    greedy = sample(
        logits,
        r.replace(temperature=jnp.zeros((B,))),
        jnp.zeros((B, 3), jnp.int32),
        jnp.zeros((B, 3), bool),
        jnp.zeros((B,), jnp.int32),
    )
    assert set(np.asarray(greedy).tolist()) == {0}
    zeros = (jnp.zeros((B, 3), jnp.int32), jnp.zeros((B, 3), bool), jnp.zeros((B,), jnp.int32))
    only = sample(logits, r, *zeros, greedy_only=True)  # the caller vouches: argmax alone
    assert set(np.asarray(only).tolist()) == {0}
