"""Bad input: a catalogue of invalid requests, each with its documented status, envelope and
param, sent in one burst with valid requests while /health is polled."""

from __future__ import annotations

import asyncio
import json

import httpx
from serve_utils import MAX_MODEL_LEN, chat_body

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
OK_CHAT = chat_body("What is 12 + 34?", max_tokens=6)
OK_COMP = {"prompt": "1 + 1 =", "max_tokens": 6}

# (name, method, path, body (dict -> JSON; bytes -> raw), headers, status, param)
CATALOGUE = [
    ("temperature > 2", "POST", CHAT, {**OK_CHAT, "temperature": 2.5}, None, 400, "temperature"),
    ("temperature < 0", "POST", CHAT, {**OK_CHAT, "temperature": -0.1}, None, 400, "temperature"),
    (
        "temperature NaN",
        "POST",
        CHAT,
        b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
        None,
        400,
        "temperature",
    ),
    (
        "temperature string",
        "POST",
        CHAT,
        {**OK_CHAT, "temperature": "hot"},
        None,
        400,
        "temperature",
    ),
    ("top_p 0", "POST", CHAT, {**OK_CHAT, "top_p": 0}, None, 400, "top_p"),
    ("top_p > 1", "POST", COMP, {**OK_COMP, "top_p": 1.5}, None, 400, "top_p"),
    ("top_k -2", "POST", CHAT, {**OK_CHAT, "top_k": -2}, None, 400, "top_k"),
    ("top_k float", "POST", COMP, {**OK_COMP, "top_k": 2.5}, None, 400, "top_k"),
    ("min_p > 1", "POST", CHAT, {**OK_CHAT, "min_p": 1.5}, None, 400, "min_p"),
    (
        "presence_penalty",
        "POST",
        CHAT,
        {**OK_CHAT, "presence_penalty": 2.5},
        None,
        400,
        "presence_penalty",
    ),
    (
        "frequency_penalty",
        "POST",
        COMP,
        {**OK_COMP, "frequency_penalty": -3},
        None,
        400,
        "frequency_penalty",
    ),
    (
        "repetition_penalty 0",
        "POST",
        CHAT,
        {**OK_CHAT, "repetition_penalty": 0},
        None,
        400,
        "repetition_penalty",
    ),
    ("max_tokens 0", "POST", CHAT, {**OK_CHAT, "max_tokens": 0}, None, 400, "max_tokens"),
    (
        "max_completion_tokens -1",
        "POST",
        CHAT,
        {**OK_CHAT, "max_completion_tokens": -1},
        None,
        400,
        "max_completion_tokens",
    ),
    (
        "min_tokens > max_tokens",
        "POST",
        COMP,
        {**OK_COMP, "min_tokens": 9},
        None,
        400,
        "min_tokens",
    ),
    ("empty stop string", "POST", CHAT, {**OK_CHAT, "stop": ["x", ""]}, None, 400, "stop"),
    ("stop not strings", "POST", COMP, {**OK_COMP, "stop": 5}, None, 400, "stop"),
    (
        "stream_options without stream",
        "POST",
        CHAT,
        {**OK_CHAT, "stream_options": {"include_usage": True}},
        None,
        400,
        "stream_options",
    ),
    ("n 0", "POST", CHAT, {**OK_CHAT, "n": 0}, None, 400, "n"),
    ("n 2 greedy", "POST", CHAT, {**OK_CHAT, "n": 2, "temperature": 0}, None, 400, "n"),
    ("seed string", "POST", COMP, {**OK_COMP, "seed": "abc"}, None, 400, "seed"),
    (
        "negative stop_token_ids",
        "POST",
        COMP,
        {**OK_COMP, "stop_token_ids": [-1]},
        None,
        400,
        "stop_token_ids",
    ),
    ("unknown model", "POST", CHAT, {**OK_CHAT, "model": "gpt-4"}, None, 404, "model"),
    ("unknown model (completions)", "POST", COMP, {**OK_COMP, "model": "nope"}, None, 404, "model"),
    ("empty messages", "POST", CHAT, {**OK_CHAT, "messages": []}, None, 400, "messages"),
    ("messages not a list", "POST", CHAT, {**OK_CHAT, "messages": "hi"}, None, 400, "messages"),
    (
        "message without role",
        "POST",
        CHAT,
        {**OK_CHAT, "messages": [{"content": "hi"}]},
        None,
        400,
        "messages",
    ),
    ("empty prompt", "POST", COMP, {**OK_COMP, "prompt": ""}, None, 400, "prompt"),
    ("empty token list", "POST", COMP, {**OK_COMP, "prompt": []}, None, 400, "prompt"),
    ("missing prompt", "POST", COMP, {"max_tokens": 4}, None, 400, "prompt"),
    (
        "out-of-vocab token ids",
        "POST",
        COMP,
        {**OK_COMP, "prompt": [1, 2, 10**6]},
        None,
        400,
        "prompt",
    ),
    (
        "prompt too long",
        "POST",
        COMP,
        {**OK_COMP, "prompt": [5] * (MAX_MODEL_LEN + 10)},
        None,
        400,
        "input_tokens",
    ),
    (
        "prompt + max_tokens too long",
        "POST",
        COMP,
        {**OK_COMP, "prompt": [5] * 100, "max_tokens": MAX_MODEL_LEN},
        None,
        400,
        "max_tokens",
    ),
    ("logprobs", "POST", COMP, {**OK_COMP, "logprobs": 2}, None, 400, "logprobs"),
    ("malformed JSON", "POST", CHAT, b'{"messages": [', None, 400, None),
    ("body not an object", "POST", CHAT, b"[1, 2]", None, 400, None),
    (
        "wrong content type",
        "POST",
        CHAT,
        json.dumps(OK_CHAT).encode(),
        {"content-type": "text/plain"},
        400,
        None,
    ),
    (
        "no content type",
        "POST",
        COMP,
        json.dumps(OK_COMP).encode(),
        {"content-type": ""},
        400,
        None,
    ),
    ("detokenize out of vocab", "POST", "/detokenize", {"tokens": [-1]}, None, 400, "tokens"),
    ("tokenize without prompt", "POST", "/tokenize", {}, None, 400, "prompt"),
    ("unknown route", "GET", "/v1/nothing", None, None, 404, None),
    ("wrong method", "GET", CHAT, None, None, 405, None),
]
VALID = [
    ("POST", CHAT, OK_CHAT),
    ("POST", CHAT, {**OK_CHAT, "unknown_field": {"ignored": True}, "stream": True}),
    ("POST", COMP, OK_COMP),
    ("POST", COMP, {**OK_COMP, "prompt": [5, 6, 7], "stop": ["\n"], "seed": 3, "temperature": 0.7}),
    ("POST", CHAT, {**OK_CHAT, "n": 2, "temperature": 1.0, "top_k": -1, "min_p": 0.05}),
    ("POST", CHAT, {**OK_CHAT, "chat_template_kwargs": {"enable_thinking": False}, "top_k": 0}),
] * 2


async def _send(c: httpx.AsyncClient, method, path, body, headers=None):
    if isinstance(body, bytes):
        headers = {"content-type": "application/json", **(headers or {})}
        return await c.request(method, path, content=body, headers=headers)
    return await c.request(method, path, json=body, headers=headers)


def test_catalogue_burst_with_valid_requests(served):
    assert len(CATALOGUE) >= 20

    async def run():
        async with httpx.AsyncClient(base_url=served.base, timeout=300) as c:
            health, done = [], asyncio.Event()

            async def poll():
                while not done.is_set():
                    health.append((await c.get("/health")).status_code)
                    await asyncio.sleep(0.05)

            poller = asyncio.ensure_future(poll())
            jobs = [_send(c, m, p, b, h) for _, m, p, b, h, _, _ in CATALOGUE]
            jobs += [_send(c, m, p, b) for m, p, b in VALID]
            replies = await asyncio.gather(*jobs)
            done.set()
            await poller
            return replies, health

    replies, health = asyncio.run(run())
    bad, good = replies[: len(CATALOGUE)], replies[len(CATALOGUE) :]
    for (name, *_, status, param), r in zip(CATALOGUE, bad, strict=True):
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, name
        assert err["code"] == status and err["param"] == param, (name, err)
        assert isinstance(err["message"], str) and err["message"], name
        assert (
            err["type"]
            == {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError"}[status]
        ), name
    for r in good:
        assert r.status_code == 200, r.text
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1
    assert health and set(health) == {200}
    assert httpx.get(served.base + "/health").status_code == 200


def test_messages_match_the_spec(served):
    r = httpx.post(served.base + CHAT, json={**OK_CHAT, "model": "gpt-4"})
    assert r.json()["error"]["message"] == "The model `gpt-4` does not exist."
    r = httpx.post(served.base + COMP, json={**OK_COMP, "prompt": [5] * 600})
    assert r.json()["error"]["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your request "
        "has 600 input tokens."
    )


def test_failure_in_one_request_is_500_for_it_alone(served, monkeypatch):
    """An exception while handling one request (here: detokenising it in the engine thread)
    answers 500 to that request, streamed or not; the others and the server go on."""
    llm = served.llm
    real = llm._final_text

    def flaky(req):
        if req.params.seed == 4242:
            raise RuntimeError("detokenizer exploded")
        return real(req)

    monkeypatch.setattr(llm, "_final_text", flaky)
    boom = {**OK_COMP, "seed": 4242, "temperature": 0.5, "max_tokens": 20}

    async def run():
        async with httpx.AsyncClient(base_url=served.base, timeout=300) as c:
            return await asyncio.gather(
                c.post(COMP, json=boom),
                c.post(COMP, json={**boom, "stream": True}),
                *[c.post(CHAT, json=OK_CHAT) for _ in range(4)],
            )

    failed, failed_stream, *ok = asyncio.run(run())
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "InternalServerError"
    assert failed.json()["error"]["code"] == 500
    assert failed_stream.status_code == 200  # the error came after the 200: sent in the stream
    events = [line[6:] for line in failed_stream.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == 500 and events[-1] == "[DONE]"
    assert all(r.status_code == 200 for r in ok)
    assert httpx.get(served.base + "/health").status_code == 200
    engine = served.server.engine.engine
    assert not engine.running  # the failed requests' slots were freed
