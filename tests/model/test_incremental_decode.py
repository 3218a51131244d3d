"""Incremental decode with the hybrid cache equals a full forward; right padding is invisible."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from model_utils import jax_logits, rel_err

TOL = 1e-5  # fp32, relative to the largest |logit|
MAX_LEN = 32


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, ids, positions, cache):
    model = nnx.merge(graphdef, state)
    out = model.forward(ids, positions, cache)
    return model.compute_logits(out.hidden), out.cache


def step(model, ids, positions, cache):
    """One cached forward: (logits fp32 numpy, new cache)."""
    graphdef, state = nnx.split(model)
    logits, cache = _step(
        graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32), cache
    )
    return np.asarray(logits), cache


def arange_pos(B, start, stop):
    return np.broadcast_to(np.arange(start, stop), (B, stop - start))


def test_prefix_then_tokens_then_chunk(base_model):
    """Prefill 8 tokens, decode 3 one at a time, then a 9-token chunk (the chunked GDN path with
    a carried state and conv state): every logit equals the full forward's."""
    model = base_model
    B, T = 2, 20
    ids = np.random.default_rng(5).integers(0, 128, (B, T))
    full = jax_logits(model, ids)
    cache = model.init_cache(B, MAX_LEN)
    pieces, t = [], 0
    for n in [8, 1, 1, 1, 9]:
        logits, cache = step(model, ids[:, t : t + n], arange_pos(B, t, t + n), cache)
        pieces.append(logits)
        t += n
    err = rel_err(np.concatenate(pieces, axis=1), full)
    print(f"\n[decode] incremental vs full forward: {err:.2e}")
    assert err <= TOL


def test_decode_kernels_work_in_the_cache_stack(base_checkpoint):
    """Every impl "pallas": the decode kernels (interpret mode on the CPU) read each layer's GDN
    state and K/V inside the cache stack (the GDN kernel writes its state there) and each
    layer's projection, norm and expert weights inside the parameter stacks, the norms add the
    residual stream in their kernel, and the router's top-k runs as its kernel; decoding token
    by token after a prefill still gives the full forward's logits, and the stacked states
    equal the reference path's."""
    import qnext_jax
    from qnext_jax.config import RuntimeOptions

    opts = RuntimeOptions(
        gdn_impl="pallas",
        attention_impl="pallas",
        linear_impl="pallas",
        moe_impl="pallas",
        norm_impl="pallas",
    )
    model = qnext_jax.from_pretrained(
        base_checkpoint[0], dtype="float32", options=opts, progress=False
    )
    ref = qnext_jax.from_pretrained(base_checkpoint[0], dtype="float32", progress=False)
    B, T = 2, 11
    ids = np.random.default_rng(8).integers(0, 128, (B, T))
    full = jax_logits(ref, ids)
    caches = {}
    for name, m in (("pallas", model), ("ref", ref)):
        cache, pieces, t = m.init_cache(B, MAX_LEN), [], 0
        for n in [8, 1, 1, 1]:  # every piece <= 8 tokens: the decode kernel's range
            logits, cache = step(m, ids[:, t : t + n], arange_pos(B, t, t + n), cache)
            pieces.append(logits)
            t += n
        caches[name] = cache
        err = rel_err(np.concatenate(pieces, axis=1), full)
        print(f"\n[decode] {name}: incremental vs full forward: {err:.2e}")
        assert err <= TOL
    got, want = caches["pallas"]["layers"][0][0], caches["ref"]["layers"][0][0]  # GDN x 3
    assert got.state.shape[0] == 3
    assert rel_err(np.asarray(got.state), np.asarray(want.state)) <= TOL


def test_unrolled_layers_decode_like_the_full_forward(base_checkpoint):
    """RuntimeOptions(scan_layers=False): the layer groups run as a Python loop, writing into
    the same cache stacks at static indices; prefill + decode + a chunk match the forward."""
    import qnext_jax
    from qnext_jax.config import RuntimeOptions

    model = qnext_jax.from_pretrained(
        base_checkpoint[0],
        dtype="float32",
        options=RuntimeOptions(scan_layers=False),
        progress=False,
    )
    B, T = 2, 18
    ids = np.random.default_rng(9).integers(0, 128, (B, T))
    full = jax_logits(model, ids)
    cache, pieces, t = model.init_cache(B, MAX_LEN), [], 0
    for n in [8, 1, 9]:
        logits, cache = step(model, ids[:, t : t + n], arange_pos(B, t, t + n), cache)
        pieces.append(logits)
        t += n
    assert rel_err(np.concatenate(pieces, axis=1), full) <= TOL


def test_right_padded_batch(base_model):
    """Rows of 20 and 13 tokens in one right-padded batch (positions -1 at padding): each row's
    logits equal the row alone, without a cache and through prefill + one decode step."""
    model = base_model
    lens = [20, 13]
    rng = np.random.default_rng(6)
    rows = [rng.integers(0, 128, (1, n + 1)) for n in lens]  # one extra token to decode
    alone = [jax_logits(model, r) for r in rows]

    ids = np.zeros((2, 20), np.int64)
    pos = np.full((2, 20), -1)
    for i, n in enumerate(lens):
        ids[i, :n], pos[i, :n] = rows[i][0, :n], np.arange(n)

    no_cache = jax_logits(model, ids, pos)
    prefill, cache = step(model, ids, pos, model.init_cache(2, MAX_LEN))
    nxt = np.array([[r[0, n]] for r, n in zip(rows, lens, strict=True)])
    decoded, _ = step(model, nxt, np.array([[n] for n in lens]), cache)
    errs = []
    for i, n in enumerate(lens):
        errs.append(rel_err(no_cache[i, :n], alone[i][0, :n]))
        errs.append(rel_err(prefill[i, :n], alone[i][0, :n]))
        errs.append(rel_err(decoded[i, 0], alone[i][0, n]))
    print(f"\n[decode] right-padded rows vs alone: max {max(errs):.2e}")
    assert max(errs) <= TOL, errs
