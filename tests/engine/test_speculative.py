"""MTP speculative decoding: greedy output is exactly the plain greedy output (random MTP
weights, a perfect-draft oracle, a half-right oracle), sampled tokens follow the target
distribution, a rejected draft leaves no trace in the GDN state, stop rules cut accepted blocks."""

from __future__ import annotations

import hf_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import jax_logits

import qnext_jax
from qnext_jax import speculative
from qnext_jax.cache import GDNCache
from qnext_jax.engine import Engine, EngineConfig
from qnext_jax.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=14, temperature=0.0)


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    """A random tiny checkpoint with random mtp.* tensors (acceptance near 0)."""
    d = tmp_path_factory.mktemp("mtp_ckpt")
    hf_utils.save_hf_model(d, vocab_size=32)
    hf_utils.add_mtp_tensors(d)
    return qnext_jax.from_pretrained(d, dtype="float32", progress=False)


def prompts_of(lengths, vocab=32, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, vocab, n))) for n in lengths]


def run(model, prompts, params, k=0, eos_ids=(), max_num_seqs=4, block=4):
    cfg = EngineConfig(
        max_num_seqs=max_num_seqs, max_model_len=96, num_speculative_tokens=k, decode_block=block
    )
    engine = Engine(model, cfg, eos_ids=list(eos_ids))
    params = params if isinstance(params, list) else [params] * len(prompts)
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    while engine.has_work():
        engine.step()
    return reqs, engine


def oracle_draft(wrong_after: int | None = None):
    """Drafts from the main model's own greedy continuation (acceptance 100%); drafts at
    index >= wrong_after are corrupted (a mixed case)."""

    def draft(model, cache, hidden, emitted, pos, a, active, k):
        last = jnp.take_along_axis(emitted, a[:, None], axis=1)[:, 0]
        p = pos + a + 1
        c, out = cache, []
        for j in range(k):
            fwd = model.forward(last[:, None], jnp.where(active, p + j, -1)[:, None], c)
            last = jnp.argmax(model.compute_logits(fwd.hidden[:, 0]), axis=-1).astype(jnp.int32)
            c = fwd.cache
            out.append(last if wrong_after is None or j < wrong_after else (last + 1) % 32)
        return jnp.stack(out, axis=1), cache  # the real cache: the oracle's writes are discarded

    return draft


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_with_random_mtp_equals_plain(mtp_model, k):
    prompts = prompts_of([3, 11, 20])
    plain, _ = run(mtp_model, prompts, GREEDY)
    spec, _ = run(mtp_model, prompts, GREEDY, k=k)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert all(r.spec_steps > 0 for r in spec)


@pytest.mark.parametrize(
    "wrong_after,k", [(None, 2), (None, 3), (1, 3)], ids=["oracle2", "oracle3", "mixed3"]
)
def test_greedy_with_forced_drafts_equals_plain(mtp_model, monkeypatch, wrong_after, k):
    monkeypatch.setattr(speculative, "draft", oracle_draft(wrong_after))
    prompts = prompts_of([5, 17], seed=1)
    plain, _ = run(mtp_model, prompts, GREEDY)
    spec, _ = run(mtp_model, prompts, GREEDY, k=k)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    for r in spec:
        first = r.spec_accepted[0] / r.spec_steps
        # the first step verifies placeholder drafts; every later one accepts the oracle's
        assert first >= (r.spec_steps - 1) / r.spec_steps
        if wrong_after is None:
            assert sum(r.spec_accepted) >= k * (r.spec_steps - 1)
        else:
            assert r.spec_accepted[wrong_after] == 0


def test_decode_kernels_in_verify_passes(mtp_model, monkeypatch):
    """The "pallas" GDN and attention paths (interpret mode on the CPU): verify passes of
    T = k + 1 tokens read the cache stacks in place, the GDN kernel also returns every
    position's state for the rewind; with a draft rejected mid-block the tokens are still
    the plain greedy ones."""
    import dataclasses

    from flax import nnx

    monkeypatch.setattr(speculative, "draft", oracle_draft(wrong_after=1))
    opts = dataclasses.replace(mtp_model.opts, gdn_impl="pallas", attention_impl="pallas")
    graphdef = nnx.split(nnx.eval_shape(lambda: type(mtp_model)(mtp_model.config, opts)))[0]
    kernels = nnx.merge(graphdef, nnx.state(mtp_model))
    prompts = prompts_of([5, 17], seed=1)
    plain, _ = run(mtp_model, prompts, GREEDY)
    spec, _ = run(kernels, prompts, GREEDY, k=3)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert all(r.spec_accepted[1] == 0 and r.spec_steps > 1 for r in spec)


def test_eos_inside_an_accepted_block_ends_the_row(mtp_model, monkeypatch):
    monkeypatch.setattr(speculative, "draft", oracle_draft())
    (prompt,) = prompts_of([9], seed=2)
    (free,), _ = run(mtp_model, [prompt], SamplingParams(max_tokens=14, temperature=0.0))
    eos = free.output_ids[6]
    cut = free.output_ids.index(eos)
    (spec,), _ = run(mtp_model, [prompt], GREEDY, k=3, eos_ids=[eos])
    assert spec.output_ids == free.output_ids[: cut + 1] and spec.finish_reason == "stop"
    (short,), _ = run(mtp_model, [prompt], SamplingParams(max_tokens=5, temperature=0.0), k=3)
    assert short.output_ids == free.output_ids[:5] and short.finish_reason == "length"


def test_rejected_draft_leaves_gdn_state_as_never_seen(mtp_model):
    """One verify step with (rejected) drafts vs one plain step: same GDN state and tokens."""
    (prompt,) = prompts_of([12], seed=3)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    engines = {}
    for k in (0, 3):
        engine = Engine(
            mtp_model,
            EngineConfig(max_num_seqs=1, max_model_len=96, num_speculative_tokens=k),
            eos_ids=[],
        )
        req = engine.add_request(prompt, params)
        engine.step(block=1)
        engines[k] = (engine, req)
    spec_engine, spec_req = engines[3]
    plain_engine, plain_req = engines[0]
    accepted = len(spec_req.output_ids)
    if accepted > 1:  # drafts happened to be accepted: bring the plain run to the same point
        for _ in range(accepted - 1):
            plain_engine.step(block=1)
    assert plain_req.output_ids == spec_req.output_ids
    n_gdn = 0
    for seg_a, seg_b in zip(plain_engine.cache["layers"], spec_engine.cache["layers"], strict=True):
        for a, b in zip(seg_a, seg_b, strict=True):
            if not isinstance(a, GDNCache):  # K/V past the accepted positions may differ (masked)
                continue
            n_gdn += 1
            np.testing.assert_allclose(
                np.asarray(a.state), np.asarray(b.state), rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(np.asarray(a.conv), np.asarray(b.conv), rtol=1e-5, atol=1e-6)
    assert n_gdn > 0


def test_sampled_tokens_follow_the_target_distribution(mtp_model):
    """Speculative sampling keeps the target's distribution: the empirical distribution of the
    1st and 2nd sampled tokens over 1024 seeds is compared with the exact marginals (the 2nd by
    enumerating the vocabulary for the 1st) with a chi-square goodness-of-fit test at
    alpha = 1e-3 each (cells with expected count < 5 pooled). The 2nd token is where drafts are
    accepted or rejected and resampled."""
    prompt = prompts_of([6], seed=4)[0]
    V, N = 32, 1024
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=s) for s in range(N)]
    reqs, engine = run(mtp_model, [prompt] * N, params, k=2, max_num_seqs=64, block=2)
    assert sum(sum(r.spec_accepted) for r in reqs) > 20  # drafts were accepted and rejected
    probs = lambda seqs: jax.nn.softmax(
        jax_logits(mtp_model, np.asarray(seqs))[:, -1].astype(np.float64), -1
    )
    p1 = np.asarray(probs([prompt]))[0]
    p2_given = np.asarray(probs([prompt + [t] for t in range(V)]))  # [V, V]
    p2 = p1 @ p2_given
    for idx, p in ((0, p1), (1, p2)):
        observed = np.bincount([r.output_ids[idx] for r in reqs], minlength=V)
        pvalue = chi2_pvalue(observed, p)
        print(f"\n[spec sampling] token {idx + 1}: chi-square p-value {pvalue:.3f}")
        assert pvalue > 1e-3, (idx, pvalue)


def chi2_pvalue(observed, p):
    """Goodness of fit of counts to probabilities; cells expected < 5 pooled into one."""
    from scipy.stats import chisquare

    expected = p / p.sum() * observed.sum()
    big = expected >= 5
    obs, exp = list(observed[big]), list(expected[big])
    if (~big).any():
        obs.append(observed[~big].sum())
        exp.append(expected[~big].sum())
    obs, exp = np.asarray(obs, np.float64), np.asarray(exp, np.float64)
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
