"""Sampling parameters (vLLM's names and checks) and the on-device sampler.

Order, as vLLM: penalties -> temperature -> min_p -> top-k / top-p -> sample. A temperature
below 1e-5 is greedy. Each row draws from its own key (the request's seed folded with the
number of tokens it has generated), so a seeded request samples the same tokens whatever
else is in the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

GREEDY_EPS = 1e-5


@dataclasses.dataclass
class SamplingParams:
    """Per-request generation settings (vLLM's SamplingParams fields)."""

    n: int = 1
    temperature: float | None = None  # None: generation_config.json, else 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(field, value, allowed):
            raise ValueError(f"SamplingParams.{field}={value!r} is invalid; allowed: {allowed}")

        def number(field, value):
            if value is None:
                return None
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                bad(field, value, "a finite number")
            return value

        if number("temperature", self.temperature) is not None and self.temperature < 0:
            bad("temperature", self.temperature, ">= 0")
        if number("top_p", self.top_p) is not None and not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "(0, 1]")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1
        ):
            bad("top_k", self.top_k, "-1 or 0 (disabled) or an integer >= 1")
        if number("min_p", self.min_p) is not None and not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "[0, 1]")
        for f in ("presence_penalty", "frequency_penalty"):
            v = number(f, getattr(self, f))
            if not -2 <= v <= 2:
                bad(f, v, "[-2, 2]")
        if (
            number("repetition_penalty", self.repetition_penalty) is not None
            and self.repetition_penalty <= 0
        ):
            bad("repetition_penalty", self.repetition_penalty, "> 0")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", self.n, "an integer >= 1")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            bad("stop", self.stop, "a list of non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "a list of non-negative token ids")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            bad("seed", self.seed, "an integer")

    def resolved(self, defaults: dict[str, Any]) -> SamplingParams:
        """Fill the unset (None) fields from generation_config.json defaults, then OpenAI's."""
        fallback = {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
        }
        changes = {}
        for f, base in fallback.items():
            if getattr(self, f) is None:
                changes[f] = defaults.get(f, base)
        out = dataclasses.replace(self, **changes) if changes else self
        if (
            out.temperature is not None
            and not defaults.get("do_sample", True)
            and self.temperature is None
        ):
            out = dataclasses.replace(out, temperature=0.0)
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature is not None and self.temperature < GREEDY_EPS


@struct.dataclass
class SamplerRows:
    """Per-row sampling settings on the device: every field is [B] (keys [B, 2])."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    presence: jax.Array
    frequency: jax.Array
    repetition: jax.Array
    key: jax.Array

    @classmethod
    def zeros(cls, batch: int) -> SamplerRows:
        f = lambda v: jnp.full((batch,), v, jnp.float32)
        return cls(
            f(0.0),
            f(1.0),
            jnp.zeros((batch,), jnp.int32),
            f(0.0),
            f(0.0),
            f(0.0),
            f(1.0),
            jnp.zeros((batch, 2), jnp.uint32),
        )

    @staticmethod
    def row_values(p: SamplingParams, seed: int) -> dict[str, Any]:
        return dict(
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k and p.top_k > 0 else 0,
            min_p=p.min_p,
            presence=p.presence_penalty,
            frequency=p.frequency_penalty,
            repetition=p.repetition_penalty,
            key=seed_key(seed),
        )


def seed_key(seed: int) -> np.ndarray:
    """A raw uint32[2] PRNG key from an integer seed (any size: folded to 64 bits)."""
    seed = int(seed) % (1 << 64)
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def apply_penalties(logits, rows: SamplerRows, counts, seen):
    """counts [B,V] int32: times each token was generated; seen [B,V] bool: in prompt or output."""
    rep = rows.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - rows.frequency[:, None] * counts
    return logits - rows.presence[:, None] * (counts > 0)


def filter_logits(logits, rows: SamplerRows):
    """Temperature, min_p, then top-k and top-p on fp32 logits [B, V]; removed -> -inf."""
    t = jnp.maximum(rows.temperature, GREEDY_EPS)[:, None]
    logits = logits / t
    probs = jax.nn.softmax(logits, axis=-1)
    p_max = jnp.max(probs, axis=-1, keepdims=True)
    logits = jnp.where(probs < rows.min_p[:, None] * p_max, -jnp.inf, logits)
    # top-k and top-p over the sorted logits (descending)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    V = logits.shape[-1]
    rank = jnp.arange(V)[None, :]
    k = jnp.where(rows.top_k > 0, rows.top_k, V)[:, None]
    sorted_logits = jnp.where(rank < k, sorted_logits, -jnp.inf)
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass strictly above this token
    sorted_logits = jnp.where(before < rows.top_p[:, None], sorted_logits, -jnp.inf)
    return (
        jnp.full_like(logits, -jnp.inf)
        .at[jnp.arange(logits.shape[0])[:, None], order]
        .set(sorted_logits)
    )


def sample(logits, rows: SamplerRows, counts, seen, step, *, greedy_only: bool = False):
    """logits [B, V] -> token ids [B] int32. `step` [B]: tokens each row has generated so far.

    greedy_only (static): every row that matters is greedy, so the argmax alone (the caller
    knows this on the host: a program per value, rather than a device-side branch, whose
    predicate XLA reads back to the host in every step). Else greedy rows take the argmax and
    the others are drawn."""
    logits = apply_penalties(logits.astype(jnp.float32), rows, counts, seen)
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy_only:
        return greedy_tok
    filtered = filter_logits(logits, rows)
    keys = jax.vmap(jax.random.fold_in)(rows.key, step)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return jnp.where(rows.temperature < GREEDY_EPS, greedy_tok, drawn)
