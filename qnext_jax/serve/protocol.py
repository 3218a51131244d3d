"""Request parsing and the error envelope of the OpenAI surface (see shared/spec/serving.md).

Bodies are plain dicts checked here rather than pydantic models, so every failure is a 400
whose `param` names the field (FastAPI's own validation would answer 422). Unknown fields
are ignored. Range checks follow the spec; SamplingParams then re-checks what it knows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from qnext_jax.sampling import SamplingParams

ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, param)


def parse_json(content_type: str | None, raw: bytes) -> dict:
    """The body as a JSON object, or a 400 for a wrong content type or malformed JSON."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise bad(None, f"Content-Type must be application/json, got {content_type or 'none'!r}")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


# ---- typed field access ------------------------------------------------------------------------
def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


_KINDS = {
    "number": (_is_number, "a finite number"),
    "int": (is_int, "an integer"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "an array"),
}


def field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked against `kind`; `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    ok, what = _KINDS[kind]
    if not ok(value):
        raise bad(name, f"{name} must be {what}, got {value!r}")
    return value


def ranged(body: dict, name: str, kind: str, test, allowed: str) -> Any:
    value = field(body, name, kind)
    if value is not None and not test(value):
        raise bad(name, f"{name}={value!r} is out of range; allowed: {allowed}")
    return value


# ---- sampling fields, common to chat and completions -------------------------------------------
@dataclasses.dataclass
class Common:
    """The fields both endpoints share, checked; `max_tokens` None means "the default"."""

    model: str | None
    stream: bool
    include_usage: bool
    n: int
    max_tokens: int | None
    sampling: dict  # SamplingParams keyword arguments except n / max_tokens / seed
    seed: int | None


def parse_common(body: dict, *, max_tokens_fields: tuple[str, ...]) -> Common:
    model = field(body, "model", "str")
    stream = field(body, "stream", "bool", False)
    options = field(body, "stream_options", "dict")
    if options is not None and not stream:
        raise bad("stream_options", "stream_options is only allowed when stream is true")
    include_usage = bool(field(options or {}, "include_usage", "bool", False)) if options else False
    s = {
        "temperature": ranged(body, "temperature", "number", lambda v: 0 <= v <= 2, "[0, 2]"),
        "top_p": ranged(body, "top_p", "number", lambda v: 0 < v <= 1, "(0, 1]"),
        "top_k": ranged(body, "top_k", "int", lambda v: v >= -1, "0 or -1 (disabled), or >= 1"),
        "min_p": ranged(body, "min_p", "number", lambda v: 0 <= v <= 1, "[0, 1]"),
        "repetition_penalty": ranged(body, "repetition_penalty", "number", lambda v: v > 0, "> 0"),
        "min_tokens": ranged(body, "min_tokens", "int", lambda v: v >= 0, ">= 0") or 0,
        "ignore_eos": field(body, "ignore_eos", "bool", False),
        "skip_special_tokens": field(body, "skip_special_tokens", "bool", True),
        "include_stop_str_in_output": field(body, "include_stop_str_in_output", "bool", False),
    }
    for name in ("presence_penalty", "frequency_penalty"):
        s[name] = ranged(body, name, "number", lambda v: -2 <= v <= 2, "[-2, 2]") or 0.0
    max_tokens = None
    for name in max_tokens_fields:  # max_completion_tokens wins over the deprecated max_tokens
        value = ranged(body, name, "int", lambda v: v >= 1, "an integer >= 1")
        max_tokens = value if value is not None else max_tokens
    s["stop"] = _stop(body.get("stop"))
    ids = field(body, "stop_token_ids", "list", [])
    if not all(is_int(t) and t >= 0 for t in ids):
        raise bad("stop_token_ids", f"stop_token_ids must be non-negative token ids, got {ids!r}")
    s["stop_token_ids"] = ids
    n = ranged(body, "n", "int", lambda v: v >= 1, "an integer >= 1") or 1
    seed = field(body, "seed", "int")
    logprobs = body.get("logprobs")
    if logprobs not in (None, False, 0) or body.get("top_logprobs"):
        raise bad("logprobs", "logprobs are not supported by this server")
    return Common(model, stream, include_usage, n, max_tokens, s, seed)


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop", f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise bad("stop", "stop must not contain an empty string")
    return stop


def sampling_params(common: Common, max_tokens: int, defaults: dict) -> list[SamplingParams]:
    """One SamplingParams per choice (seed + i for choice i when seeded)."""
    out = []
    for i in range(common.n):
        seed = None if common.seed is None else common.seed + i
        try:
            p = SamplingParams(max_tokens=max_tokens, seed=seed, **common.sampling)
        except ValueError as e:
            raise bad(_sampling_field(str(e)), str(e)) from None
        out.append(p)
    if common.n > 1 and out[0].resolved(defaults).greedy:
        raise bad(
            "n",
            f"n={common.n} needs sampling: with greedy decoding (temperature 0, or the "
            "checkpoint's default) every choice would be the same; use n=1",
        )
    return out


def _sampling_field(message: str) -> str | None:
    m = re.match(r"SamplingParams\.(\w+)=", message)
    return m.group(1) if m else None


def engine_error_param(message: str, prompt_param: str) -> str | None:
    """The param of an Engine.validate message."""
    if message.startswith("This model's maximum context length"):
        return "input_tokens"
    if message.startswith("max_tokens="):
        return "max_tokens"
    if message.startswith("stop_token_ids"):
        return "stop_token_ids"
    if message.startswith("prompt"):
        return prompt_param
    return None


# ---- endpoint-specific fields ------------------------------------------------------------------
def parse_messages(body: dict) -> list[dict]:
    """messages, with list-of-parts content flattened to text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty array of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad("messages", f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise bad("messages", f"messages[{i}].content: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad("messages", f"messages[{i}].content must be a string or text parts")
        out.append({**m, "content": content})
    return out


def parse_prompt(body: dict) -> str | list[int]:
    """A completion prompt: a string, [string], token ids, or [token ids]."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "prompt is empty: at least one token is required")
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise bad("prompt", "prompt is empty: at least one token is required")
        if all(is_int(t) for t in prompt):
            return prompt
        if all(isinstance(p, (str, list)) for p in prompt):
            raise bad("prompt", "a batch of several prompts is not supported; send one per request")
    raise bad("prompt", "prompt must be a string, a list with one string, or a list of token ids")
