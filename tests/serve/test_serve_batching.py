"""Continuous batching through HTTP: results independent of batching, load, cancellation."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
from serve_utils import MAX_NUM_SEQS, chat_body, metric

# Two-digit operands: every prompt is 18 tokens, so admissions compile few shapes
QUESTIONS = [
    f"What is {a} + {b}?"
    for a, b in [(12, 34), (23, 45), (57, 38), (99, 99), (64, 18), (40, 60), (17, 58), (88, 11)]
]


def _prompt(q: str) -> str:
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


async def _post(client, path, body):
    r = await client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def _stream(client, path, body) -> tuple[list, float]:
    """(events, seconds) of one SSE request; fails on anything but one well-formed stream."""
    t0 = time.perf_counter()
    events = []
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line:
                assert line.startswith("data: ")
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    assert events and events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return events[:-1], time.perf_counter() - t0


def _client(served, n=64, timeout=300):
    return httpx.AsyncClient(
        base_url=served.base,
        timeout=timeout,
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
    )


def test_greedy_results_do_not_depend_on_batching(served):
    """16 concurrent greedy chat requests each give what they give alone (token for token)."""
    bodies = [
        chat_body(
            QUESTIONS[i % 8],
            temperature=0,
            max_tokens=24 + 3 * i,
            chat_template_kwargs={"enable_thinking": i % 2 == 0},
        )
        for i in range(16)
    ]

    async def run():
        async with _client(served, 16) as c:
            alone = [await _post(c, "/v1/chat/completions", b) for b in bodies]
            together = await asyncio.gather(*[_post(c, "/v1/chat/completions", b) for b in bodies])
        return alone, together

    alone, together = asyncio.run(run())
    for a, b in zip(alone, together, strict=True):
        assert a["choices"][0]["message"] == b["choices"][0]["message"]
        assert a["usage"] == b["usage"]


def test_load_64_streaming_clients_256_requests(served):
    """256 mixed streaming requests over 64 connections: each completes exactly once, with the
    text its prompt gives alone (a prefix of the longer reference), and every slot ends free."""
    rng = random.Random(0)
    base_success = sum(
        metric(served.base, "qnext:request_success_total", finished_reason=r)
        for r in ("stop", "length", "abort")
    )

    async def run():
        async with _client(served, 64) as c:
            refs = [
                (
                    await _post(
                        c,
                        "/v1/completions",
                        {"prompt": _prompt(q), "max_tokens": 8, "temperature": 0},
                    )
                )["choices"][0]["text"]
                for q in QUESTIONS
            ]
            gate = asyncio.Semaphore(64)

            async def one(i):
                q = rng.randrange(8)
                max_tokens = rng.choice([1, 2, 4, 6, 8])
                chat = i % 2 == 1
                body = (
                    {**chat_body(QUESTIONS[q]), "stream": True}
                    if chat
                    else {"prompt": _prompt(QUESTIONS[q]), "stream": True}
                )
                body.update(
                    max_tokens=max_tokens, temperature=0, stream_options={"include_usage": True}
                )
                async with gate:
                    events, _ = await _stream(
                        c, "/v1/chat/completions" if chat else "/v1/completions", body
                    )
                return i, q, max_tokens, chat, events

            results = await asyncio.gather(*[one(i) for i in range(256)])
        return refs, results

    t0 = time.perf_counter()
    refs, results = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    assert sorted(r[0] for r in results) == list(range(256))
    ids = set()
    for _, q, max_tokens, chat, events in results:
        *chunks, usage = events
        assert usage["choices"] == [] and 1 <= usage["usage"]["completion_tokens"] <= max_tokens
        assert len({e["id"] for e in events}) == 1
        ids.add(events[0]["id"])
        finishes = [c["choices"][0]["finish_reason"] for c in chunks]
        finishes = [f for f in finishes if f]
        assert len(finishes) == 1 and chunks[-1]["choices"][0]["finish_reason"] == finishes[0]
        if finishes[0] == "length":
            assert usage["usage"]["completion_tokens"] == max_tokens
        if chat:
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        else:
            text = "".join(c["choices"][0]["text"] for c in chunks)
            assert refs[q].startswith(text), (text, refs[q])
    assert len(ids) == 256  # none duplicated
    success = sum(
        metric(served.base, "qnext:request_success_total", finished_reason=r)
        for r in ("stop", "length", "abort")
    )
    assert success - base_success == 256 + len(QUESTIONS)
    assert metric(served.base, "qnext:num_requests_running") == 0
    assert metric(served.base, "qnext:num_requests_waiting") == 0
    assert metric(served.base, "qnext:num_free_slots") == MAX_NUM_SEQS
    engine = served.server.engine.engine
    assert not engine.running and not engine.waiting
    assert sorted(engine.free) == list(range(MAX_NUM_SEQS))
    print(f"load: 256 requests in {elapsed:.1f} s")


def _wait_for(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_frees_slot_while_others_go_on(served):
    """A streaming client that hangs up mid-stream, and a non-streaming one that times out, are
    aborted at once (the running gauge drops); the other streams finish normally."""
    long = {"prompt": "1 + 1 =", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    aborts0 = metric(served.base, "qnext:request_success_total", finished_reason="abort")

    async def run():
        async with _client(served, 8) as c:
            others = [
                asyncio.ensure_future(_stream(c, "/v1/completions", {**long, "stream": True}))
                for _ in range(3)
            ]
            assert await asyncio.to_thread(
                _wait_for, lambda: metric(served.base, "qnext:num_requests_running") == 3
            )
            async with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += bool(line)
                    if seen == 2:
                        break  # leaving the block closes the connection mid-stream
            aborted = await asyncio.to_thread(
                _wait_for,
                lambda: (
                    metric(served.base, "qnext:request_success_total", finished_reason="abort")
                    == aborts0 + 1
                ),
            )
            running_after = metric(served.base, "qnext:num_requests_running")
            try:
                await c.post("/v1/completions", json=long, timeout=1.0)
            except httpx.ReadTimeout:
                pass
            aborted2 = await asyncio.to_thread(
                _wait_for,
                lambda: (
                    metric(served.base, "qnext:request_success_total", finished_reason="abort")
                    == aborts0 + 2
                ),
            )
            return aborted, running_after, aborted2, await asyncio.gather(*others)

    aborted, running_after, aborted2, others = asyncio.run(run())
    assert aborted and aborted2
    assert running_after == 3  # the three others still hold their slots; the victim's is free
    for events, _ in others:
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert len("".join(e["choices"][0]["text"] for e in events)) > 0
    assert _wait_for(lambda: metric(served.base, "qnext:num_requests_running") == 0)
    assert metric(served.base, "qnext:num_free_slots") == MAX_NUM_SEQS
