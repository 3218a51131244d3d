"""The OpenAI surface through the official `openai` client and plain HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest
from serve_utils import MAX_MODEL_LEN, chat_body, metric, sse_events

QUESTION = "What is 23 + 45?"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.base + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_chat_non_streaming_thinks(client):
    r = client.chat.completions.create(
        model="qnext-demo",
        temperature=0,
        max_tokens=100,
        messages=[{"role": "user", "content": QUESTION}],
    )
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content == "The answer is 68."
    extra = choice.message.model_extra
    assert "23 + 45 = 68" in extra["reasoning"] and extra["reasoning_content"] == extra["reasoning"]
    assert "<think>" not in choice.message.content and "</think>" not in extra["reasoning"]
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 100
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_thinking_off(client):
    r = client.chat.completions.create(
        model="qnext-demo",
        max_tokens=60,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    msg = r.choices[0].message
    assert "68" in msg.content and msg.model_extra["reasoning"] is None


def test_chat_streaming_matches_spec_and_non_streaming(client, served):
    kw = dict(
        model="qnext-demo",
        temperature=0,
        max_tokens=100,
        messages=[{"role": "user", "content": QUESTION}],
    )
    full = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    first, *middle, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in middle]
    assert finishes[-1] == "stop" and not any(finishes[:-1])  # on the last content chunk only
    content = "".join(c.choices[0].delta.content or "" for c in middle)
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning") or "" for c in middle)
    assert content == full.choices[0].message.content
    assert reasoning == full.choices[0].message.model_extra["reasoning"]
    # the raw stream ends with [DONE]
    with httpx.stream(
        "POST",
        served.base + "/v1/chat/completions",
        timeout=120,
        json=chat_body(QUESTION, max_tokens=8, stream=True),
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert sse_events(r.iter_lines())[-1] == "[DONE]"


def test_completions_string_list_and_token_ids(client, served):
    prompt = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    a = client.completions.create(model="qnext-demo", prompt=prompt, max_tokens=20, temperature=0)
    assert a.object == "text_completion" and a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 20 and a.choices[0].text.startswith("<think>")
    ids = served.llm.tokenizer.encode(prompt, add_special_tokens=False)
    for p in ([prompt], ids, [ids]):
        b = client.completions.create(model="qnext-demo", prompt=p, max_tokens=20, temperature=0)
        assert b.choices[0].text == a.choices[0].text and b.usage.prompt_tokens == len(ids)
    streamed = list(
        client.completions.create(
            model="qnext-demo",
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed[:-1]) == a.choices[0].text
    assert streamed[-2].choices[0].finish_reason == "length"
    assert streamed[-1].usage.completion_tokens == 20


def test_stop_string_cut_same_streaming(client):
    kw = dict(
        model="qnext-demo",
        temperature=0,
        max_tokens=100,
        stop=["carry"],
        messages=[{"role": "user", "content": QUESTION}],
    )
    full = client.chat.completions.create(**kw)
    assert full.choices[0].finish_reason == "stop"
    assert full.choices[0].model_extra["stop_reason"] == "carry"
    text = full.choices[0].message.model_extra["reasoning"] or ""
    assert "carry" not in text and text.rstrip().endswith("write 8,")
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.model_extra.get("reasoning") or "" for c in chunks)
    assert streamed == text


def test_seeded_sampling_repeats(client):
    kw = dict(
        model="qnext-demo",
        temperature=1.0,
        top_p=0.9,
        seed=7,
        max_tokens=40,
        messages=[{"role": "user", "content": QUESTION}],
    )
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message == b.choices[0].message


def test_n_choices(client):
    r = client.chat.completions.create(
        model="qnext-demo",
        temperature=1.0,
        seed=1,
        n=3,
        max_tokens=12,
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": QUESTION}],
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 36


def test_models_health_version(served, client):
    models = client.models.list()
    assert models.data[0].id == "qnext-demo" and models.data[0].object == "model"
    raw = httpx.get(served.base + "/v1/models").json()
    assert raw["object"] == "list"
    entry = raw["data"][0]
    assert {"id", "object", "created", "owned_by", "root", "max_model_len"} <= entry.keys()
    assert entry["max_model_len"] == MAX_MODEL_LEN and entry["root"].endswith("demo_model")
    h = httpx.get(served.base + "/health")
    assert h.status_code == 200 and h.content == b""
    assert httpx.get(served.base + "/version").json() == {"version": "0.1.0"}


def test_tokenize_round_trip(served):
    text = "What is 12 + 34?"
    t = httpx.post(served.base + "/tokenize", json={"model": "qnext-demo", "prompt": text}).json()
    assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == MAX_MODEL_LEN
    d = httpx.post(served.base + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d == {"prompt": text}
    chat = httpx.post(
        served.base + "/tokenize", json={"messages": [{"role": "user", "content": text}]}
    ).json()
    assert chat["count"] > t["count"]


def test_metrics_exposed(served, client):
    before = metric(served.base, "qnext:generation_tokens_total")
    client.completions.create(
        model="qnext-demo",
        prompt="1 + 1 =",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = httpx.get(served.base + "/metrics").text
    for name in (
        "qnext:num_requests_running",
        "qnext:num_requests_waiting",
        "qnext:request_success_total",
        "qnext:prompt_tokens_total",
        "qnext:generation_tokens_total",
        "qnext:time_to_first_token_seconds_bucket",
        "qnext:inter_token_latency_seconds_bucket",
        "qnext:spec_decode_num_draft_tokens_total",
        "qnext:spec_decode_num_accepted_tokens_total",
    ):
        assert name in text, name
    assert metric(served.base, "qnext:generation_tokens_total") == before + 5
    assert metric(served.base, "qnext:spec_decode_num_draft_tokens_total") == 0
