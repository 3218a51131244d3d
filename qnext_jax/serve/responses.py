"""Response bodies and SSE streams for chat and text completions (the spec's shapes).

Streams diff the engine's text snapshots (each a prefix of the final text), so the deltas add
up to the non-streamed text; chat deltas go through ReasoningStream, which splits exactly as
split_reasoning does on the whole text."""

from __future__ import annotations

import json
import logging

from qnext_jax.chat import ReasoningStream, split_reasoning
from qnext_jax.serve.async_engine import EngineDeadError
from qnext_jax.serve.protocol import error_body

log = logging.getLogger("qnext_jax.serve")
DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, finals) -> dict:
    completion = sum(o.num_tokens for o in finals)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _head(meta: dict, obj: str) -> dict:
    return {"id": meta["id"], "object": obj, "created": meta["created"], "model": meta["model"]}


def _reasoning_fields(reasoning: str | None) -> dict:
    # `reasoning` is the current name; older clients read `reasoning_content`
    return {"reasoning": reasoning, "reasoning_content": reasoning}


# ---- non-streaming --------------------------------------------------------------------------
def chat_response(finals: dict, meta: dict) -> dict:
    choices = []
    for i in sorted(finals):
        out = finals[i]
        reasoning, content = split_reasoning(out.text, meta["in_reasoning"])
        if not meta["include_reasoning"]:
            reasoning = None
        message = {
            "role": "assistant",
            "content": content,
            **_reasoning_fields(reasoning),
            "tool_calls": [],
        }
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": None,
                "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason,
            }
        )
    return {
        **_head(meta, "chat.completion"),
        "choices": choices,
        "usage": usage(meta["prompt_tokens"], finals.values()),
    }


def completion_response(finals: dict, meta: dict) -> dict:
    choices = [
        {
            "index": i,
            "text": meta["echo"] + finals[i].text,
            "logprobs": None,
            "finish_reason": finals[i].finish_reason,
            "stop_reason": finals[i].stop_reason,
        }
        for i in sorted(finals)
    ]
    return {
        **_head(meta, "text_completion"),
        "choices": choices,
        "usage": usage(meta["prompt_tokens"], finals.values()),
    }


# ---- streaming ---------------------------------------------------------------------------
async def _deltas(stream):
    """(output, text delta) for every engine output of `stream`, aborts skipped."""
    sent: dict[int, str] = {}
    while not stream.finished:
        out = await stream.next()
        if out.finish_reason == "abort":
            continue
        before = sent.get(out.index, "")
        sent[out.index] = out.text
        yield out, out.text[len(before) :]


async def _stream_with_errors(body, stream, engine, metrics):
    """Run `body` (an async generator of SSE strings); an error after the 200 becomes a
    `data: {"error": ...}` event. Ends with [DONE]; a client that goes away (the generator is
    cancelled or closed) aborts its requests, freeing their slots."""
    try:
        try:
            async for event in body:
                yield event
        except EngineDeadError as e:
            metrics.error(503)
            yield sse(error_body(503, str(e)))
        except Exception as e:
            log.exception("stream failed")
            metrics.error(500)
            yield sse(error_body(500, f"internal error: {type(e).__name__}: {e}"))
        yield DONE
    finally:
        engine.abort(stream)  # no-op once finished


async def _chat_events(stream, meta, include_usage):
    head = _head(meta, "chat.completion.chunk")
    splitters, finals = {}, {}

    def chunk(i, delta, finish=None, stop_reason=None):
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        return sse({**head, "choices": [choice]})

    async for out, delta in _deltas(stream):
        i, finish = out.index, out.finish_reason
        if i not in splitters:  # the first token exists: announce the role
            splitters[i] = ReasoningStream(meta["in_reasoning"])
            yield chunk(i, {"role": "assistant", "content": ""})
        reasoning, content = splitters[i].feed(delta, final=finish is not None)
        d = {}
        if reasoning and meta["include_reasoning"]:
            d.update(_reasoning_fields(reasoning))
        if content or (finish is not None and not d):
            d["content"] = content
        if d or finish is not None:
            yield chunk(i, d, finish, out.stop_reason)
        if finish is not None:
            finals[i] = out
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(meta["prompt_tokens"], finals.values())})


async def _completion_events(stream, meta, include_usage):
    head = _head(meta, "text_completion")
    finals, started = {}, set()
    async for out, delta in _deltas(stream):
        i, finish = out.index, out.finish_reason
        if i not in started:
            started.add(i)
            delta = meta["echo"] + delta
        if delta or finish is not None:
            choice = {"index": i, "text": delta, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = out.stop_reason
                finals[i] = out
            yield sse({**head, "choices": [choice]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(meta["prompt_tokens"], finals.values())})


def chat_sse(stream, meta, include_usage, engine, metrics):
    return _stream_with_errors(_chat_events(stream, meta, include_usage), stream, engine, metrics)


def completion_sse(stream, meta, include_usage, engine, metrics):
    events = _completion_events(stream, meta, include_usage)
    return _stream_with_errors(events, stream, engine, metrics)
