"""MTP speculative decoding: one step of draft-verify-accept inside the on-device decode loop.

A step for a row whose last token x_p (not yet fed) sits at position p with drafts d_1..d_k:
  verify  the main model reads [x_p, d_1, .., d_k] at p..p+k in one forward; target t_i is its
          next token after input i (greedy: argmax; sampling: drawn as below)
  accept  greedy: the longest prefix with d_{i+1} == t_i; sampling: d_{i+1} is kept with
          probability p_i(d_{i+1}) (the drafts are the MTP head's argmax, a point mass q, so
          min(1, p/q) = p), and the first rejection resamples from p_i without d_{i+1}: the
          emitted tokens are distributed exactly as the target's
  emit    the a accepted drafts and one more token (the correction, or the bonus t_k)
  rewind  GDN conv and recurrent states are taken from the verify pass's per-position states at
          input a (kept rather than recomputed: one forward, no second pass over the accepted
          prefix); attention K/V beyond p+a is left and overwritten later (masked by position)
  draft   the MTP head reads (h_i, e_i) for the accepted positions (filling its own KV cache),
          then chains k-1 more steps on its own output and its own argmax draft
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.cache import GDNCache
from qnext_jax.sampling import GREEDY_EPS, apply_penalties, filter_logits


def rewind_gdn(cache, states, a):
    """Replace each GDN layer's cache by its state after input index a [B] of the verify pass.

    states: per segment, per pattern position, (recurrent [L,B,T,HV,K,V], conv [L,B,T,W-1,C])
    for GDN layers, None for attention."""

    def pick(all_, dtype):
        idx = a.reshape((1, -1) + (1,) * (all_.ndim - 2))
        return jnp.take_along_axis(all_, idx, axis=2)[:, :, 0].astype(dtype)

    layers = []
    for seg_cache, seg_states in zip(cache["layers"], states, strict=True):
        new = []
        for c, st in zip(seg_cache, seg_states, strict=True):
            new.append(
                c if st is None else GDNCache(pick(st[1], c.conv.dtype), pick(st[0], c.state.dtype))
            )
        layers.append(tuple(new))
    return {"layers": tuple(layers), "mtp": cache["mtp"]}


def position_logits(logits, drafts, state, block_stops):
    """Processed fp32 logits for each verify position [B, k+1, V]: penalties counting the drafts
    before each position, EOS / stop ids blocked below min_tokens at that position."""
    B, T, V = logits.shape
    onehot = jax.nn.one_hot(drafts, V, dtype=jnp.int32)  # [B, k, V]
    before = jnp.concatenate([jnp.zeros((B, 1, V), jnp.int32), jnp.cumsum(onehot, axis=1)], axis=1)
    counts = state.counts[:, None] + before  # [B, T, V]
    seen = state.seen[:, None] | (before > 0)
    rep = lambda x: jnp.repeat(x, T, axis=0)
    rows = jax.tree.map(rep, state.sampler)
    flat = apply_penalties(
        logits.reshape(B * T, V), rows, counts.reshape(B * T, V), seen.reshape(B * T, V)
    )
    generated = (state.generated[:, None] + jnp.arange(T)).reshape(-1)
    flat = block_stops(flat, generated, rep(state.min_gen), rep(state.stop_ids))
    return flat.reshape(B, T, V), rows


def accept(logits, drafts, state, key_step, block_stops, *, greedy_only: bool = False):
    """-> (a [B] accepted drafts, emitted [B, k+1]: e_i = d_{i+1} for i < a, e_a the correction
    or bonus; entries after a are unused). greedy_only (static) as in `sampling.sample`: every
    row that matters is greedy, so the sampling rule is left out of the program."""
    B, T, V = logits.shape
    k = T - 1
    processed, rows = position_logits(logits, drafts, state, block_stops)
    target = jnp.argmax(processed, axis=-1).astype(jnp.int32)  # greedy targets [B, T]
    greedy = state.sampler.temperature < GREEDY_EPS

    def greedy_rule():
        ok = drafts == target[:, :k]
        a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
        return a, target

    def with_sampling():
        probs = jax.nn.softmax(filter_logits(processed.reshape(B * T, V), rows), axis=-1)
        probs = probs.reshape(B, T, V)
        keys = jax.vmap(jax.random.fold_in)(state.sampler.key, key_step)
        u_key, c_key = jax.vmap(jax.random.split)(keys).transpose(1, 0, 2)
        u = jax.vmap(lambda kk: jax.random.uniform(kk, (k,)))(u_key)  # [B, k]
        p_draft = jnp.take_along_axis(probs[:, :k], drafts[..., None], axis=-1)[..., 0]
        ok = jnp.where(greedy[:, None], drafts == target[:, :k], u < p_draft)
        a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # [B]
        p_a = jnp.take_along_axis(probs, a[:, None, None], axis=1)[:, 0]  # [B, V]
        d_a = jnp.take_along_axis(
            jnp.pad(drafts, ((0, 0), (0, 1)), constant_values=-1), a[:, None], axis=1
        )[:, 0]
        residual = jnp.where(jnp.arange(V)[None] == d_a[:, None], 0.0, p_a)  # p without the draft
        drawn = jax.vmap(jax.random.categorical)(c_key, jnp.log(residual)).astype(jnp.int32)
        last = jnp.where(greedy, jnp.take_along_axis(target, a[:, None], axis=1)[:, 0], drawn)
        emitted = jnp.concatenate([drafts, jnp.zeros((B, 1), jnp.int32)], axis=1)
        emitted = emitted.at[jnp.arange(B), a].set(last)
        return a, emitted

    return greedy_rule() if greedy_only else with_sampling()


def draft(model, cache, hidden, emitted, pos, a, active, k):
    """Fill the MTP cache over the accepted positions and draft k tokens.

    hidden [B, k+1, D] verify hidden states; emitted [B, k+1]; pos [B] position of input 0."""
    T = hidden.shape[1]
    i = jnp.arange(T)[None]
    positions = jnp.where(active[:, None] & (i <= a[:, None]), pos[:, None] + i, -1)
    h, cache = model.mtp_forward(emitted, hidden, positions, cache)
    h = jnp.take_along_axis(h, a[:, None, None], axis=1)  # [B, 1, D] at position pos + a
    d = jnp.argmax(model.compute_logits(h[:, 0]), axis=-1).astype(jnp.int32)
    drafts = [d]
    for j in range(1, k):
        p = jnp.where(active, pos + a + j, -1)[:, None]
        h, cache = model.mtp_forward(d[:, None], h, p, cache)
        d = jnp.argmax(model.compute_logits(h[:, 0]), axis=-1).astype(jnp.int32)
        drafts.append(d)
    return jnp.stack(drafts, axis=1), cache
