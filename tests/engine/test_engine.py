"""The generation engine: greedy equals HF transformers, batching / chunking / slot reuse do
not change results, seeded sampling is reproducible, stop rules fire, shapes do not recompile."""

from __future__ import annotations

import numpy as np
import pytest

from qnext_jax.engine import Engine, EngineConfig
from qnext_jax.sampling import SamplingParams

GREEDY = dict(temperature=0.0)


def run(model, prompts, params, eos_ids=(), **cfg):
    """Token ids generated for each prompt by a fresh engine."""
    engine = Engine(model, EngineConfig(**{"max_model_len": 160, **cfg}), eos_ids=list(eos_ids))
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    while engine.has_work():
        engine.step()
    return [r.output_ids for r in reqs], reqs, engine


def prompts_of(lengths, seed=0, vocab=128):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, vocab, n))) for n in lengths]


@pytest.fixture(scope="module")
def hf_greedy(base_checkpoint):
    """HF transformers' greedy generate (32 new tokens, EOS ignored) for three prompts.

    The attention mask is explicit: generate() would otherwise infer one from pad_token_id and
    mask the prompt's own token-0 occurrences."""
    import torch

    _, hf_model = base_checkpoint
    prompts = prompts_of([5, 17, 33])
    outs = []
    for p in prompts:
        with torch.no_grad():
            ids = hf_model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        outs.append(ids[0, len(p) :].tolist())
    return prompts, outs


def test_greedy_matches_hf_generate(base_model, hf_greedy):
    prompts, expected = hf_greedy
    got, reqs, _ = run(base_model, prompts, SamplingParams(max_tokens=32, **GREEDY), max_num_seqs=4)
    assert got == expected
    assert all(r.finish_reason == "length" for r in reqs)


def test_batch_of_mixed_lengths_equals_alone(base_model, hf_greedy):
    """Each prompt alone vs all together; and with fewer slots than prompts (queueing, a reused
    slot must start from zeroed state)."""
    prompts, _ = hf_greedy
    params = SamplingParams(max_tokens=12, **GREEDY)
    alone = [run(base_model, [p], params, max_num_seqs=1)[0][0] for p in prompts]
    together, _, _ = run(base_model, prompts, params, max_num_seqs=4)
    queued, _, _ = run(base_model, prompts[::-1], params, max_num_seqs=1)
    assert together == alone
    assert queued == alone[::-1]


def test_chunked_prefill_equals_unchunked(base_model):
    prompts = prompts_of([70, 41], seed=3)
    params = SamplingParams(max_tokens=10, **GREEDY)
    whole, _, _ = run(base_model, prompts, params, max_num_seqs=2, prefill_chunk=128)
    chunked, _, _ = run(base_model, prompts, params, max_num_seqs=2, prefill_chunk=16)
    assert whole == chunked


def test_streaming_blocks_do_not_change_tokens(base_model):
    prompts = prompts_of([9, 23], seed=4)
    params = SamplingParams(max_tokens=20, temperature=0.9, seed=11)
    big, _, _ = run(base_model, prompts, params, max_num_seqs=2, decode_block=32)
    small, _, _ = run(base_model, prompts, params, max_num_seqs=2, decode_block=3)
    assert big == small


def test_steps_between_checks_do_not_change_tokens(base_model):
    """Steps traced in groups between the checks of the decode loop; rows that finish inside
    a group (max_tokens 5 and 11, not multiples of 4) ride along without emitting, and a
    sampled row draws the same tokens."""
    prompts = prompts_of([9, 23, 14], seed=4)
    params = [
        SamplingParams(max_tokens=5, **GREEDY),
        SamplingParams(max_tokens=11, **GREEDY),
        SamplingParams(max_tokens=13, temperature=0.9, seed=5),
    ]
    kw = dict(max_num_seqs=3, decode_block=8)
    every, _, _ = run(base_model, prompts, params, steps_per_check=1, **kw)
    grouped, reqs, engine = run(base_model, prompts, params, steps_per_check=4, **kw)
    assert grouped == every and [len(o) for o in grouped] == [5, 11, 13]
    assert [r.finish_reason for r in reqs] == ["length"] * 3
    # the one-step block after admission checks every step; the blocks of 8, every 4
    assert engine.compiles["decode", 8, 1] == 1 and engine.compiles["decode", 8, 4] == 1
    with pytest.raises(ValueError, match="steps_per_check=0"):
        Engine(base_model, EngineConfig(steps_per_check=0), eos_ids=[])


def test_block_outside_its_range_is_rejected(base_model):
    engine = Engine(base_model, EngineConfig(max_model_len=64, decode_block=8), eos_ids=[])
    for block in (9, -1):
        with pytest.raises(ValueError, match=f"block={block}: allowed 1 to decode_block=8"):
            engine.step(block=block)
    with pytest.raises(ValueError, match="decode_block=0"):
        Engine(base_model, EngineConfig(decode_block=0), eos_ids=[])


def test_first_token_comes_after_one_step(base_model):
    """A block that follows an admission runs one step (the new request's first token comes
    after its prefill and one step); later blocks run decode_block steps; one compiled step."""
    cfg = EngineConfig(max_model_len=160, decode_block=8, max_num_seqs=2)
    engine = Engine(base_model, cfg, eos_ids=[])
    a = engine.add_request(prompts_of([7])[0], SamplingParams(max_tokens=30, **GREEDY))
    assert [len(new) for _, new in engine.step()] == [1]
    assert [len(new) for _, new in engine.step()] == [8]
    b = engine.add_request(prompts_of([9], seed=1)[0], SamplingParams(max_tokens=30, **GREEDY))
    assert sorted(len(new) for _, new in engine.step()) == [1, 1]  # a waits one step for b
    assert len(a.output_ids) == 10 and len(b.output_ids) == 1
    assert engine.compiles["decode", 8, 1] == 1


def test_seeded_sampling_is_reproducible_and_batch_independent(base_model):
    prompts = prompts_of([8, 8, 15], seed=5)
    a = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    first, _, _ = run(base_model, prompts, a, max_num_seqs=4)
    again, _, _ = run(base_model, prompts[:1], a, max_num_seqs=1)
    assert first[0] == again[0]  # same seed, same sample, alone or batched
    other, _, _ = run(
        base_model, prompts[:1], SamplingParams(max_tokens=16, temperature=1.0, seed=8)
    )
    assert other[0] != first[0]
    greedy, _, _ = run(base_model, prompts[:1], SamplingParams(max_tokens=16, temperature=0.0))
    cold, _, _ = run(
        base_model, prompts[:1], SamplingParams(max_tokens=16, temperature=1e-6, seed=1)
    )
    assert cold == greedy
    # A greedy request batched with a sampled one runs in the program with the sampling in
    # it (Engine.all_greedy is False): its tokens are still the greedy ones, and the sampled
    # request's are its own.
    mixed, _, engine = run(
        base_model, prompts[:2], [SamplingParams(max_tokens=16, temperature=0.0), a]
    )
    assert mixed[0] == greedy[0] and mixed[1] == first[1]
    assert engine.compiles["decode", engine.cfg.decode_block, 1] == 1  # one program: mixed


def test_stop_token_ids_min_tokens_and_max_tokens(base_model):
    (prompt,) = prompts_of([12], seed=6)
    free, _, _ = run(base_model, [prompt], SamplingParams(max_tokens=24, **GREEDY))
    stop_at = free[0][5]
    first = free[0].index(stop_at)
    got, reqs, _ = run(
        base_model, [prompt], SamplingParams(max_tokens=24, stop_token_ids=[stop_at], **GREEDY)
    )
    assert got[0] == free[0][: first + 1] and reqs[0].finish_reason == "stop"
    assert reqs[0].stop_reason == stop_at
    # the same token as EOS, but min_tokens forbids stopping before 8 tokens
    got, reqs, _ = run(
        base_model,
        [prompt],
        SamplingParams(max_tokens=24, min_tokens=8, **GREEDY),
        eos_ids=[stop_at],
    )
    assert len(got[0]) >= 8 and stop_at not in got[0][:8]
    got, reqs, _ = run(
        base_model,
        [prompt],
        SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY),
        eos_ids=[stop_at],
    )
    assert got == free and reqs[0].finish_reason == "length"


def test_prompt_lengths_within_a_bucket_compile_once(base_model):
    """Rows are bucketed to powers of two and chunks to >= 16 tokens: prompts of 3..17 tokens
    admitted one at a time all reuse the first prefill program."""
    _, _, engine = run(
        base_model, prompts_of([5]), SamplingParams(max_tokens=4, **GREEDY), max_num_seqs=2
    )
    before = dict(engine.compiles)
    for n in (3, 11, 17):
        engine.add_request(prompts_of([n], seed=n)[0], SamplingParams(max_tokens=5, **GREEDY))
        while engine.has_work():
            engine.step()
    new = {k: v for k, v in engine.compiles.items() if before.get(k) != v}
    assert not new, f"recompiled: {new}"
    assert engine.compiles["decode", engine.cfg.decode_block, 1] == 1


def test_slots_are_freed_and_abort_works(base_model):
    engine = Engine(base_model, EngineConfig(max_num_seqs=2, max_model_len=64), eos_ids=[])
    a = engine.add_request([1, 2, 3], SamplingParams(max_tokens=40, **GREEDY))
    b = engine.add_request([4, 5], SamplingParams(max_tokens=40, **GREEDY))
    c = engine.add_request([6], SamplingParams(max_tokens=3, **GREEDY))
    engine.step(block=2)
    assert engine.abort(a.request_id) and a.finish_reason == "abort"
    while engine.has_work():
        engine.step()
    assert b.finish_reason == c.finish_reason == "length" and len(c.output_ids) == 3
    assert sorted(engine.free) == [0, 1] and not engine.running


@pytest.mark.parametrize(
    "prompt,params,field",
    [
        ([], SamplingParams(), "prompt is empty"),
        ([1, 2, 999], SamplingParams(), "outside the vocabulary"),
        (list(range(60)) + [1] * 100, SamplingParams(), "maximum context length"),
        ([1, 2], SamplingParams(max_tokens=200), "max_tokens"),
    ],
)
def test_engine_rejects_bad_requests(base_model, prompt, params, field):
    engine = Engine(base_model, EngineConfig(max_num_seqs=1, max_model_len=128), eos_ids=[])
    with pytest.raises(ValueError, match=field):
        engine.add_request(prompt, params)
    assert not engine.waiting  # nothing half-queued


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)
