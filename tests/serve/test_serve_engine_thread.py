"""The engine thread's contract, with a scripted engine in place of the model (fast, exact):
the bounded wait queue answers 503, and a dead engine thread turns /health to 503."""

from __future__ import annotations

import asyncio
import collections
import time
import types

import httpx
import pytest
from serve_utils import start

from qnext_jax.engine import Request


class ScriptedEngine:
    """Engine's interface: each step sleeps `delay`, then gives each running request token 65;
    raises from step number `fail_at` on (an engine-wide failure)."""

    def __init__(self, max_num_seqs=1, delay=0.05, fail_at=None):
        self.cfg = types.SimpleNamespace(max_num_seqs=max_num_seqs, max_model_len=512)
        self.vocab = 512
        self.delay, self.fail_at, self.steps = delay, fail_at, 0
        self.running, self.waiting, self.free = {}, collections.deque(), list(range(max_num_seqs))

    def validate(self, prompt_ids, params):
        pass

    def add_request(self, prompt_ids, params, request_id=None):
        req = Request(request_id, list(prompt_ids), params, 0)
        self.waiting.append(req)
        return req

    def has_work(self):
        return bool(self.running or self.waiting)

    def abort(self, request_id):
        for slot, req in list(self.running.items()):
            if req.request_id == request_id:
                req.finish_reason = "abort"
                del self.running[slot]
                self.free.append(slot)
                return True
        return False

    def step(self, block=None):
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("device lost")
        while self.waiting and self.free:
            self.running[self.free.pop()] = self.waiting.popleft()
        time.sleep(self.delay)
        events = []
        for slot, req in list(self.running.items()):
            req.output_ids.append(65)
            if len(req.output_ids) >= req.params.max_tokens:
                req.finish_reason = "length"
                del self.running[slot]
                self.free.append(slot)
            events.append((req, [65]))
        return events


def _serve(llm, engine, max_queue_len):
    from qnext_jax.serve.app import build_app

    return start(build_app(llm, max_queue_len=max_queue_len, engine=engine))


BODY = {"prompt": "1 + 1 =", "max_tokens": 10}


def test_queue_beyond_max_queue_len_is_503(demo_llm):
    running = _serve(demo_llm, ScriptedEngine(max_num_seqs=1, delay=0.05), max_queue_len=2)
    try:

        async def run():
            async with httpx.AsyncClient(base_url=running.base, timeout=60) as c:
                return await asyncio.gather(
                    *[c.post("/v1/completions", json=BODY) for _ in range(6)]
                )

        replies = asyncio.run(run())
        codes = sorted(r.status_code for r in replies)
        assert codes == [200] * 3 + [503] * 3  # 1 slot + 2 waiting; the rest turned away
        for r in replies:
            if r.status_code == 503:
                err = r.json()["error"]
                assert err["code"] == 503 and err["type"] == "ServiceUnavailableError"
                assert "--max-queue-len" in err["message"]
            else:
                assert r.json()["choices"][0]["text"] == demo_llm.tokenizer.decode([65] * 10)
        assert httpx.get(running.base + "/v1/completions").status_code == 405
        assert httpx.post(running.base + "/v1/completions", json=BODY).status_code == 200
    finally:
        running.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_dead_engine_thread_fails_requests_and_health(demo_llm, stream):
    running = _serve(demo_llm, ScriptedEngine(max_num_seqs=2, fail_at=3), max_queue_len=4)
    try:
        assert httpx.get(running.base + "/health").status_code == 200
        r = httpx.post(
            running.base + "/v1/completions", json={**BODY, "stream": stream}, timeout=60
        )
        if stream:  # the failure came after the 200: an error event, then [DONE]
            assert r.status_code == 200 and '"code":503' in r.text
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.status_code == 503 and "engine thread died" in r.json()["error"]["message"]
        assert httpx.get(running.base + "/health").status_code == 503
        again = httpx.post(running.base + "/v1/completions", json=BODY, timeout=60)
        assert again.status_code == 503 and again.json()["error"]["code"] == 503
    finally:
        running.stop()
