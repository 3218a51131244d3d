"""The generation engine: a fixed set of sequence slots over one hybrid cache, prefill into
free slots, and a decode loop that runs on the device for a block of steps at a time.

Host work happens only between blocks: admitting requests (chunked, batched prefill),
reading the block's tokens, detokenising, stop strings, freeing slots. Inside a block every
row stops on its own (EOS / stop token ids, max_tokens, the cache end). Shapes are bucketed
(prefill rows and chunk length to powers of two, the block length fixed), so a new prompt
length never recompiles once its bucket has been seen.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from qnext_jax import speculative
from qnext_jax.cache import CacheSlots, cache_bytes
from qnext_jax.sampling import SamplerRows, SamplingParams, sample

MAX_STOP_IDS = 16


@struct.dataclass
class Slots:
    """Per-slot decode state on the device ([B] unless noted)."""

    token: jax.Array  # last token, not yet fed to the model
    pos: jax.Array  # its position
    active: jax.Array  # bool
    generated: jax.Array  # tokens generated so far
    max_gen: jax.Array
    min_gen: jax.Array
    stop_ids: jax.Array  # [B, MAX_STOP_IDS], -1 padded (EOS ids unless ignore_eos, stop_token_ids)
    sampler: SamplerRows
    counts: jax.Array  # [B, V] int32: generated-token counts (presence / frequency penalties)
    seen: jax.Array  # [B, V] bool: prompt or generated (repetition penalty)
    drafts: jax.Array  # [B, k] MTP drafts for the next step (k = 0 without speculation)
    spec_accepted: jax.Array  # [B, k] accepted drafts per draft position
    spec_steps: jax.Array  # verify steps taken


@dataclasses.dataclass
class Request:
    """One sequence being generated; the host-side record."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    slot: int | None = None
    text: str = ""  # output text cut at a stop string (set only then)
    spec_steps: int = 0  # MTP verify steps
    spec_accepted: list[int] = dataclasses.field(default_factory=list)  # per draft position

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 8
    max_model_len: int = 2048
    prefill_chunk: int = 512  # tokens per prefill call (a long prompt takes several)
    decode_block: int = 16  # decode steps per device call
    # Decode steps between the loop's checks whether any row still runs. Each check copies a
    # flag to the host (a while loop's predicate; the GPU idles meanwhile); the steps between
    # are traced one after another in the loop's body (no inner loop), so the decode program
    # holds that many copies of the step. A row that finishes inside a group rides along in
    # its remaining steps without emitting. A block of n steps checks every
    # gcd(n, steps_per_check) steps (a one-step block: every step).
    steps_per_check: int = 1
    seed: int = 0
    state_dtype: str = "float32"  # GDN recurrent state: float32 (default) or bfloat16
    num_speculative_tokens: int = 0  # MTP drafts per step (0: plain decoding)


class Engine:
    """Slots + cache + jitted prefill/decode for one model. Not thread-safe: one owner."""

    def __init__(
        self,
        model,
        cfg: EngineConfig,
        *,
        eos_ids: list[int],
        detokenize=None,
        defaults: dict | None = None,
        mesh=None,
    ):
        if cfg.decode_block < 1 or cfg.steps_per_check < 1:
            raise ValueError(
                f"EngineConfig: decode_block={cfg.decode_block} and steps_per_check="
                f"{cfg.steps_per_check} must both be >= 1"
            )
        self.model_cfg = model.config
        self.cfg = cfg
        self.vocab = model.config.vocab_size
        self.eos_ids = list(eos_ids)
        self.detokenize = detokenize  # ids, params -> text (for stop strings); optional
        self.defaults = defaults or {}  # generation_config.json: fills unset sampling fields
        self.graphdef, self.params = nnx.split(model)
        B = cfg.max_num_seqs
        state_dtype = jnp.dtype(cfg.state_dtype)
        if mesh is not None and mesh.size > 1:  # KV / GDN state split with their heads
            from qnext_jax import sharding

            self.cache = sharding.init_cache(
                model, B, cfg.max_model_len, mesh=mesh, state_dtype=state_dtype
            )
        else:
            self.cache = model.init_cache(B, cfg.max_model_len, state_dtype=state_dtype)
        self.k = cfg.num_speculative_tokens
        if self.k and model.mtp is None:
            raise ValueError(
                "num_speculative_tokens > 0 needs a checkpoint with MTP (mtp.*) tensors"
            )
        self.slots = _empty_slots(B, self.vocab, self.k)
        self.free = list(range(B))
        self.running: dict[int, Request] = {}
        self.waiting: collections.deque[Request] = collections.deque()
        self._ids = itertools.count()
        self.compiles = collections.Counter()  # traces per jitted function (tests count these)
        cache_out = slots_out = out = None
        if mesh is not None and mesh.size > 1:
            # Pin the state's placements: left to GSPMD, the cache and slots came back from the
            # first call placed differently, and the second call compiled the step again.
            out = NamedSharding(mesh, PartitionSpec())
            self.slots = jax.device_put(self.slots, out)
            cache_out = jax.tree.map(lambda a: a.sharding, self.cache)
            slots_out = jax.tree.map(lambda a: a.sharding, self.slots)
        self._prefill = jax.jit(self._prefill_impl, donate_argnums=(1,), out_shardings=cache_out)
        self._admit = jax.jit(self._admit_impl, donate_argnums=(0,), out_shardings=slots_out)
        self._release = jax.jit(self._release_impl, donate_argnums=(0,), out_shardings=slots_out)
        self._decode = jax.jit(
            self._decode_impl,
            static_argnums=(4, 5, 6),
            donate_argnums=(1, 2),
            out_shardings=None if out is None else (cache_out, slots_out, out),
        )

    # ---- public ------------------------------------------------------------------------
    def all_greedy(self) -> bool:
        """Whether every running request is greedy: the decode program then leaves the
        sampling out (a static argument of the jitted block)."""
        return all(r.params.greedy for r in self.running.values())

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        seed: int | None = None,
    ) -> Request:
        params = params.resolved(self.defaults)
        self.validate(prompt_ids, params)
        n = next(self._ids)
        rid = request_id if request_id is not None else str(n)
        seed = params.seed if params.seed is not None else hash((self.cfg.seed, n)) & 0x7FFFFFFF
        req = Request(rid, list(prompt_ids), params, seed if seed is not None else 0)
        self.waiting.append(req)
        return req

    def validate(self, prompt_ids, params: SamplingParams) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("prompt is empty: at least one token is required")
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.vocab]
        if bad:
            raise ValueError(
                f"prompt token ids {bad[:8]} are outside the vocabulary [0, {self.vocab})"
            )
        L = self.cfg.max_model_len
        if len(prompt_ids) >= L:
            raise ValueError(
                f"This model's maximum context length is {L} tokens. However, your request has "
                f"{len(prompt_ids)} input tokens."
            )
        if len(prompt_ids) + (params.max_tokens or 0) > L:
            raise ValueError(
                f"max_tokens={params.max_tokens} is too large: prompt ({len(prompt_ids)} tokens) + "
                f"max_tokens must be <= max_model_len ({L})"
            )
        stops = len(set(self.eos_ids) | set(params.stop_token_ids))
        if stops > MAX_STOP_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_IDS - len(self.eos_ids)} allowed")
        bad = [t for t in params.stop_token_ids if t >= self.vocab]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {self.vocab})")

    def abort(self, request_id: str) -> bool:
        """Cancel a waiting or running request; its slot is free at once."""
        for req in list(self.waiting):
            if req.request_id == request_id:
                self.waiting.remove(req)
                req.finish_reason = "abort"
                return True
        for slot, req in list(self.running.items()):
            if req.request_id == request_id:
                req.finish_reason = "abort"
                self._free_slots([slot])
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self, block: int | None = None) -> list[tuple[Request, list[int]]]:
        """Admit waiting requests, run one decode block. Returns (request, new token ids) for
        every request that produced tokens or finished in this step.

        block: steps in this device call (at most decode_block). By default decode_block, but
        1 while a running request has no token yet: its first token then comes after its
        prefill and one step, not a whole block (time to first token as vLLM's)."""
        if block is not None and not 1 <= block <= self.cfg.decode_block:
            raise ValueError(f"block={block}: allowed 1 to decode_block={self.cfg.decode_block}")
        self._admit_waiting()
        if not self.running:
            return []
        if block is None and any(r.first_token_time is None for r in self.running.values()):
            block = 1
        n = block or self.cfg.decode_block
        unit = math.gcd(n, self.cfg.steps_per_check)  # divides n: no group overruns the block
        self.cache, self.slots, out = self._decode(
            self.params, self.cache, self.slots, n, self.cfg.decode_block, self.all_greedy(), unit
        )
        out = np.asarray(out)  # [B, block * (k+1)]; -1 where a row produced nothing
        if self.k:
            accepted, steps = (
                np.asarray(self.slots.spec_accepted),
                np.asarray(self.slots.spec_steps),
            )
            for slot, req in self.running.items():
                req.spec_steps, req.spec_accepted = int(steps[slot]), accepted[slot].tolist()
        now = time.perf_counter()
        events, done = [], []
        for slot, req in list(self.running.items()):
            new = [int(t) for t in out[slot] if t >= 0]
            if not new:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            req.output_ids += new
            self._check_finished(req)
            events.append((req, new))
            if req.finished:
                req.finish_time = now
                done.append(slot)
        self._free_slots(done)
        return events

    # ---- host bookkeeping --------------------------------------------------------------
    def _check_finished(self, req: Request) -> None:
        """Mirror of the device's stop rule, plus stop strings (host only)."""
        p = req.params
        last = req.output_ids[-1]
        if last in p.stop_token_ids or (last in self.eos_ids and not p.ignore_eos):
            req.finish_reason = "stop"
            req.stop_reason = last if last in p.stop_token_ids else None
        elif len(req.output_ids) >= (p.max_tokens or self.cfg.max_model_len):
            req.finish_reason = "length"
        elif len(req.prompt_ids) + len(req.output_ids) >= self.cfg.max_model_len:
            req.finish_reason = "length"
        if p.stop and self.detokenize is not None:
            self._check_stop_strings(req)

    def _check_stop_strings(self, req: Request) -> None:
        """Truncate at the earliest stop string (kept when include_stop_str_in_output)."""
        p = req.params
        text = self.detokenize(req.output_ids, p)
        hits = [(text.find(s), s) for s in p.stop if s in text]
        if not hits:
            return
        at, s = min(hits)
        req.text = text[: at + len(s)] if p.include_stop_str_in_output else text[:at]
        req.finish_reason, req.stop_reason = "stop", s

    def _free_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        mask = np.zeros(self.cfg.max_num_seqs, bool)
        mask[slots] = True
        self.slots = self._release(self.slots, jnp.asarray(mask))
        for s in slots:
            self.running.pop(s, None)
            self.free.append(s)

    def _admit_waiting(self) -> None:
        batch = []
        while self.waiting and self.free:
            req = self.waiting.popleft()
            req.slot = self.free.pop(0)
            self.running[req.slot] = req
            batch.append(req)
        if batch:
            self._prefill_requests(batch)

    def _prefill_requests(self, reqs: list[Request]) -> None:
        """Prefill prompt[:-1] of each request into its slot (chunked, rows batched), then
        arm the slot with prompt[-1]: the first decode step samples the first new token."""
        B = self.cfg.max_num_seqs
        P = _bucket(len(reqs), B)
        rows = np.full(P, B, np.int32)  # padding rows point past the cache: nothing is written
        rows[: len(reqs)] = [r.slot for r in reqs]
        bodies = [r.prompt_ids[:-1] for r in reqs]
        longest = max(len(b) for b in bodies)
        C = _bucket(max(longest, 1), self.cfg.prefill_chunk, minimum=16)
        for start in range(0, max(longest, 1), C):
            tokens = np.zeros((P, C), np.int32)
            following = np.zeros((P, C), np.int32)  # token i+1: what the MTP head reads at i
            positions = np.full((P, C), -1, np.int32)
            for i, (body, r) in enumerate(zip(bodies, reqs, strict=True)):
                piece = body[start : start + C]
                tokens[i, : len(piece)] = piece
                following[i, : len(piece)] = r.prompt_ids[start + 1 : start + 1 + len(piece)]
                positions[i, : len(piece)] = np.arange(start, start + len(piece))
            fresh = np.full(P, start == 0)
            self.cache = self._prefill(
                self.params,
                self.cache,
                jnp.asarray(tokens),
                jnp.asarray(following),
                jnp.asarray(positions),
                CacheSlots(jnp.asarray(rows), jnp.asarray(fresh)),
            )
        self.slots = self._admit(self.slots, *self._admission(reqs, P, rows))

    def _admission(self, reqs, P, rows):
        """Host arrays describing the admitted rows, padded to P."""
        vals = collections.defaultdict(list)
        # prompt[:-1] (the last token is the slot's `token`), width bucketed as the prefill
        # chunks are (no recompile per prompt length); padding id V is dropped by the scatter
        body = max(max(len(r.prompt_ids) - 1 for r in reqs), 1)
        width = _bucket(body, self.cfg.max_model_len, minimum=16)
        prompts = np.full((P, width), self.vocab, np.int32)
        for i, r in enumerate(reqs):
            p = r.params
            stop = ([] if p.ignore_eos else self.eos_ids) + p.stop_token_ids
            stop = list(dict.fromkeys(stop))[:MAX_STOP_IDS]
            vals["token"].append(r.prompt_ids[-1])
            vals["pos"].append(len(r.prompt_ids) - 1)
            vals["max_gen"].append(p.max_tokens or self.cfg.max_model_len)
            vals["min_gen"].append(p.min_tokens)
            vals["stop_ids"].append(stop + [-1] * (MAX_STOP_IDS - len(stop)))
            for k, v in SamplerRows.row_values(p, r.seed).items():
                vals["s_" + k].append(v)
            prompts[i, : len(r.prompt_ids) - 1] = r.prompt_ids[:-1]
        pad = P - len(reqs)
        out = {}
        for k, v in vals.items():
            arr = np.asarray(v)
            out[k] = (
                np.concatenate([arr, np.zeros((pad,) + arr.shape[1:], arr.dtype)]) if pad else arr
            )
        sampler = SamplerRows(
            **{k[2:]: jnp.asarray(v) for k, v in out.items() if k.startswith("s_")}
        )
        plain = {k: jnp.asarray(v) for k, v in out.items() if not k.startswith("s_")}
        return jnp.asarray(rows), plain, sampler, jnp.asarray(prompts)

    # ---- jitted device functions -----------------------------------------------------------
    def _model(self, params):
        return nnx.merge(self.graphdef, params)

    def _prefill_impl(self, params, cache, tokens, following, positions, slots: CacheSlots):
        self.compiles["prefill", tokens.shape] += 1
        model = self._model(params)
        out = model.forward(tokens, positions, cache, slots=slots)
        if not self.k:
            return out.cache
        # the MTP head's KV cache covers the prompt too: it reads (h_i, x_{i+1}) at position i
        return model.mtp_forward(following, out.hidden, positions, out.cache, slots=slots)[1]

    def _admit_impl(self, state: Slots, rows, plain, sampler: SamplerRows, prompts):
        self.compiles["admit", prompts.shape] += 1
        put = lambda x, v: x.at[rows].set(v.astype(x.dtype), mode="drop")
        P = rows.shape[0]
        V = state.counts.shape[1]
        seen = jnp.zeros((P, V), bool).at[jnp.arange(P)[:, None], prompts].set(True, mode="drop")
        seen = seen.at[jnp.arange(P), plain["token"]].set(True)  # the prompt's last token
        return Slots(
            token=put(state.token, plain["token"]),
            pos=put(state.pos, plain["pos"]),
            active=put(state.active, jnp.ones((P,), bool)),
            generated=put(state.generated, jnp.zeros((P,), jnp.int32)),
            max_gen=put(state.max_gen, plain["max_gen"]),
            min_gen=put(state.min_gen, plain["min_gen"]),
            stop_ids=put(state.stop_ids, plain["stop_ids"]),
            sampler=jax.tree.map(put, state.sampler, sampler),
            counts=put(state.counts, jnp.zeros((P, V), jnp.int32)),
            seen=put(state.seen, seen),
            drafts=put(state.drafts, jnp.zeros((P, state.drafts.shape[1]), jnp.int32)),
            spec_accepted=put(
                state.spec_accepted, jnp.zeros((P, state.drafts.shape[1]), jnp.int32)
            ),
            spec_steps=put(state.spec_steps, jnp.zeros((P,), jnp.int32)),
        )

    @staticmethod
    def _release_impl(state: Slots, mask):
        return state.replace(active=state.active & ~mask)

    def _decode_impl(
        self, params, cache, state: Slots, n_steps, block: int, greedy: bool, unit: int
    ):
        """Up to `n_steps` (<= block) decode steps on the device (each a plain step, or an MTP
        draft-verify step emitting up to k+1 tokens); stops early once no row is active.
        greedy (static): every running request is greedy (one program with the sampling left
        out, one with it). unit (static, divides n_steps): steps per iteration of the loop,
        between two checks of its condition; a row that finished (or never ran) rides along
        in them, emitting nothing. Returns (cache, state, tokens [B, block * (k+1)], -1 where
        nothing was produced)."""
        self.compiles["decode", block, unit] += 1
        model = self._model(params)
        B, k = state.token.shape[0], self.k
        step = functools.partial(self._spec_step if k else self._plain_step, greedy=greedy)

        def cond(carry):
            i, _, state, _, _ = carry
            return (i < n_steps) & jnp.any(state.active)

        def one_step(carry):
            i, cache, state, out, cursor = carry
            cache, state, emitted, n_emit = step(model, cache, state)
            j = jnp.arange(emitted.shape[1])[None]
            at = jnp.where(j < n_emit[:, None], cursor[:, None] + j, out.shape[1])  # else dropped
            out = out.at[jnp.arange(B)[:, None], at].set(emitted, mode="drop")
            return i + 1, cache, state, out, cursor + n_emit

        def body(carry):
            for _ in range(unit):  # traced in sequence: no inner loop
                carry = one_step(carry)
            return carry

        out = jnp.full((B, block * (k + 1)), -1, jnp.int32)
        carry = (jnp.int32(0), cache, state, out, jnp.zeros((B,), jnp.int32))
        _, cache, state, out, _ = jax.lax.while_loop(cond, body, carry)
        return cache, state, out

    def _plain_step(self, model, cache, state: Slots, greedy: bool):
        """One token per active row: forward, sample, stop rules."""
        positions = jnp.where(state.active, state.pos, -1)[:, None]
        fwd = model.forward(state.token[:, None], positions, cache)
        logits = model.compute_logits(fwd.hidden[:, 0]).astype(jnp.float32)
        logits = block_stops(logits, state.generated, state.min_gen, state.stop_ids)
        tok = sample(
            logits, state.sampler, state.counts, state.seen, state.generated, greedy_only=greedy
        )
        emitted = tok[:, None]
        n_emit, done = self._stops(state, emitted, jnp.zeros_like(state.pos))
        return fwd.cache, self._advance(state, emitted, n_emit, done, tok), emitted, n_emit

    def _spec_step(self, model, cache, state: Slots, greedy: bool):
        """Verify the drafts in one forward, accept a prefix, rewind the GDN states, draft anew."""
        k, active = self.k, state.active
        inputs = jnp.concatenate([state.token[:, None], state.drafts], axis=1)  # [B, k+1]
        positions = jnp.where(active[:, None], state.pos[:, None] + jnp.arange(k + 1), -1)
        fwd = model.forward(inputs, positions, cache, collect_states=True)
        logits = model.compute_logits(fwd.hidden).astype(jnp.float32)  # [B, k+1, V]
        a, emitted = speculative.accept(
            logits, state.drafts, state, state.generated, block_stops, greedy_only=greedy
        )
        cache = speculative.rewind_gdn(fwd.cache, fwd.states, a)
        n_emit, done = self._stops(state, emitted, a)
        last = jnp.take_along_axis(emitted, a[:, None], axis=1)[:, 0]
        drafts, cache = speculative.draft(
            model, cache, fwd.hidden, emitted, state.pos, a, active, k
        )
        state = self._advance(state, emitted, n_emit, done, last)
        j = jnp.arange(k)[None]
        state = state.replace(
            drafts=drafts,
            spec_accepted=state.spec_accepted + (active[:, None] & (j < a[:, None])),
            spec_steps=state.spec_steps + active,
        )
        return cache, state, emitted, n_emit

    def _stops(self, state: Slots, emitted, a):
        """How many of the emitted tokens e_0..e_a a row keeps, and whether it finishes: the
        first stop token, max_tokens or the cache end cuts the block there."""
        j = jnp.arange(emitted.shape[1])[None]
        gen = state.generated[:, None] + j + 1  # tokens generated once e_j is kept
        is_stop = jnp.any(
            (emitted[..., None] == state.stop_ids[:, None]) & (state.stop_ids[:, None] >= 0), -1
        )
        ends = (
            is_stop
            | (gen >= state.max_gen[:, None])
            | (state.pos[:, None] + j + 2 >= self.cfg.max_model_len)
        )
        ends = ends & (j <= a[:, None])
        first_end = jnp.argmax(ends, axis=1)
        done = jnp.any(ends, axis=1) & state.active
        n_emit = jnp.where(done, first_end + 1, a + 1) * state.active
        return n_emit, done

    @staticmethod
    def _advance(state: Slots, emitted, n_emit, done, last):
        """Count the kept tokens and move each active row to its new last token."""
        B, V = state.counts.shape
        keep = jnp.arange(emitted.shape[1])[None] < n_emit[:, None]
        rows = jnp.broadcast_to(jnp.arange(B)[:, None], emitted.shape)
        ids = jnp.where(keep, emitted, V)  # dropped where not kept
        active = state.active
        return state.replace(
            token=jnp.where(active, last, state.token),
            pos=state.pos + n_emit,
            active=active & ~done,
            generated=state.generated + n_emit,
            counts=state.counts.at[rows, ids].add(1, mode="drop"),
            seen=state.seen.at[rows, ids].set(True, mode="drop"),
        )


def block_stops(logits, generated, min_gen, stop_ids):
    """Below min_tokens, EOS and stop token ids cannot be sampled. logits [N, V]; others [N]."""
    blocked = (generated < min_gen)[:, None] & (stop_ids >= 0)
    rows = jnp.arange(logits.shape[0])[:, None]
    ids = jnp.where(blocked, stop_ids, logits.shape[1])  # out of range -> dropped
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def _empty_slots(B: int, V: int, k: int) -> Slots:
    z = lambda dt=jnp.int32: jnp.zeros((B,), dt)
    return Slots(
        token=z(),
        pos=z(),
        active=z(bool),
        generated=z(),
        max_gen=z(),
        min_gen=z(),
        stop_ids=jnp.full((B, MAX_STOP_IDS), -1, jnp.int32),
        sampler=SamplerRows.zeros(B),
        counts=jnp.zeros((B, V), jnp.int32),
        seen=jnp.zeros((B, V), bool),
        drafts=jnp.zeros((B, k), jnp.int32),
        spec_accepted=jnp.zeros((B, k), jnp.int32),
        spec_steps=z(),
    )


def _bucket(n: int, cap: int, minimum: int = 1) -> int:
    """The next power of two >= n, at least `minimum`, at most `cap` (n <= cap for rows)."""
    b = minimum
    while b < n:
        b *= 2
    return min(b, max(cap, minimum))


def check_memory(
    model_cfg,
    engine_cfg: EngineConfig,
    param_bytes: int,
    *,
    utilization: float = 0.9,
    mtp: bool = False,
) -> int:
    """Bytes the cache needs; raises MemoryError (naming what to lower) if it does not fit
    the device's free memory. On devices that do not report memory, only returns the size."""
    need = cache_bytes(
        model_cfg,
        engine_cfg.max_num_seqs,
        engine_cfg.max_model_len,
        state_bytes=jnp.dtype(engine_cfg.state_dtype).itemsize,
        mtp=mtp,
    )
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit:
        free = limit * utilization - stats.get("bytes_in_use", 0)
        if need > free:
            raise MemoryError(
                f"the KV/GDN cache needs {need / 2**30:.2f} GiB for max_num_seqs="
                f"{engine_cfg.max_num_seqs} x max_model_len={engine_cfg.max_model_len}, but only "
                f"{free / 2**30:.2f} GiB of device memory is free: lower max_model_len or "
                "max_num_seqs (or use more devices with tensor_parallel_size)"
            )
    return need
