"""Continuous batching behind an asyncio server: one thread owns the Engine.

The engine thread loops `Engine.step()` while there is work and sleeps on a condition when
idle. Handlers never touch the Engine: they hand new requests and aborts over under a lock
(held for a list append, never across a device call) and read results from an asyncio queue
per HTTP request, fed with `loop.call_soon_threadsafe`. So the event loop never waits on the
device, and requests join the running batch between decode blocks.

What crosses threads is immutable: `Output` snapshots (the text so far, token count, finish
reason). The text is what `LLM._final_text` gives, held back while unfinished where it could
still change: a trailing incomplete UTF-8 character, and the last len(stop)-1 characters when
stop strings are set (a stop string may yet cut them). So the streamed deltas always add up to
the final text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

from qnext_jax.sampling import SamplingParams
from qnext_jax.serve.metrics import ServerMetrics

log = logging.getLogger("qnext_jax.serve")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (crashed or shut down); nothing more will be served."""


class QueueFullError(RuntimeError):
    """More requests are waiting for a slot than --max-queue-len allows."""


@dataclasses.dataclass(frozen=True)
class Output:
    """One choice's state after an engine step."""

    index: int
    text: str  # output text so far; final once finish_reason is set
    num_tokens: int  # generated token ids (the EOS / stop token included)
    finish_reason: str | None  # stop | length | abort
    stop_reason: str | int | None = None


@dataclasses.dataclass(frozen=True)
class Failure:
    index: int
    error: BaseException


class Stream:
    """The outputs of one HTTP request's n engine requests, in the order they happen."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request_ids: list[str]):
        self.loop = loop
        self.request_ids = request_ids
        self.queue: asyncio.Queue[Output | Failure] = asyncio.Queue()
        self.unfinished = set(range(len(request_ids)))

    def put(self, item: Output | Failure) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shutting down)
            pass

    @property
    def finished(self) -> bool:
        return not self.unfinished

    async def next(self) -> Output:
        """The next output; raises the error of a choice that failed."""
        item = await self.queue.get()
        if isinstance(item, Failure):
            self.unfinished.discard(item.index)
            raise item.error
        if item.finish_reason is not None:
            self.unfinished.discard(item.index)
        return item


@dataclasses.dataclass
class _Sub:
    """One engine request, as the engine thread tracks it."""

    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stream: Stream
    arrival: float
    last_token_time: float | None = None
    spec_seen: tuple[int, int] = (0, 0)


class AsyncEngine:
    """The engine thread and the thread-safe handoff to it."""

    def __init__(self, llm, *, max_queue_len: int, metrics: ServerMetrics, engine=None):
        self.llm = llm
        self.engine = engine if engine is not None else llm.engine
        self.metrics = metrics
        self.capacity = self.engine.cfg.max_num_seqs + max_queue_len
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._inbox: list[_Sub] = []
        self._aborts: list[str] = []
        self._in_system = 0  # submitted, not yet finished (guarded by _cond)
        self._stopping = False
        self._live: dict[str, _Sub] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="qnext-engine", daemon=True)

    # ---- event-loop side ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

    def submit(
        self, prompt_ids: list[int], params: list[SamplingParams], request_id: str
    ) -> Stream:
        """Queue one prompt with n sampling settings (one engine request each). Non-blocking."""
        if not self.alive:
            raise EngineDeadError(
                f"the engine is not running ({self.error!r})"
                if self.error
                else "the engine is not running"
            )
        n = len(params)
        ids = [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
        stream = Stream(asyncio.get_running_loop(), ids)
        now = time.perf_counter()
        subs = [_Sub(ids[i], i, prompt_ids, params[i], stream, now) for i in range(n)]
        with self._cond:
            if self._in_system + len(subs) > self.capacity:
                raise QueueFullError(
                    f"the server is at capacity: {self.engine.cfg.max_num_seqs} running and "
                    f"{self.capacity - self.engine.cfg.max_num_seqs} waiting requests "
                    "(--max-num-seqs + --max-queue-len); retry later"
                )
            self._in_system += len(subs)
            self._inbox += subs
            self._cond.notify()
        return stream

    def abort(self, stream: Stream) -> None:
        """Cancel every unfinished choice of `stream` (its slots are freed by the engine thread)."""
        if stream.finished:
            return
        with self._cond:
            self._aborts += [stream.request_ids[i] for i in stream.unfinished]
            self._cond.notify()

    # ---- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (
                        self._inbox or self._aborts or self._stopping or self.engine.has_work()
                    ):
                        self._cond.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                for sub in inbox:
                    self._add(sub)
                for rid in aborts:
                    self._abort(rid)
                if inbox or aborts:
                    self._update_gauges()  # an abort shows at once, not after the next block
                if self.engine.has_work():
                    for req, new in self.engine.step():
                        self._emit(req, new)
                self._update_gauges()
            self._fail_all(EngineDeadError("the server is shutting down"))
        except BaseException as e:  # the engine itself failed: every request fails, /health 503
            log.exception("engine thread died")
            self.error = e
            self._fail_all(EngineDeadError(f"the engine thread died: {e!r}"))

    def _add(self, sub: _Sub) -> None:
        try:
            self.engine.add_request(sub.prompt_ids, sub.params, request_id=sub.request_id)
        except Exception as e:  # validated before submit; anything here is this request's fault
            self._done(sub, Failure(sub.index, e))
            return
        self._live[sub.request_id] = sub
        self.metrics.prompt_tokens.inc(len(sub.prompt_ids))

    def _abort(self, request_id: str) -> None:
        sub = self._live.pop(request_id, None)
        if sub is None:
            return  # finished meanwhile
        self.engine.abort(request_id)
        self.metrics.finished("abort")
        self._done(sub, Output(sub.index, "", 0, "abort"))

    def _emit(self, req, new: list[int]) -> None:
        sub = self._live.get(req.request_id)
        if sub is None:
            return
        try:
            self._observe(sub, req, new)
            out = Output(
                sub.index, self._text(req), len(req.output_ids), req.finish_reason, req.stop_reason
            )
        except Exception as e:  # one request's failure (e.g. detokenising): fail it alone
            log.exception("request %s failed", req.request_id)
            self._live.pop(req.request_id, None)
            if not req.finished:
                self.engine.abort(req.request_id)
            self._done(sub, Failure(sub.index, e))
            return
        if not req.finished:
            sub.stream.put(out)
            return
        self._live.pop(req.request_id, None)
        self.metrics.finished(req.finish_reason)
        self.metrics.e2e.observe(time.perf_counter() - sub.arrival)
        self._done(sub, out)

    def _observe(self, sub: _Sub, req, new: list[int]) -> None:
        now = time.perf_counter()
        self.metrics.generation_tokens.inc(len(new))
        if sub.last_token_time is None:
            self.metrics.ttft.observe(now - sub.arrival)
        else:  # a decode block delivers several tokens at once: spread the wait over them
            gap = (now - sub.last_token_time) / len(new)
            for _ in new:
                self.metrics.itl.observe(gap)
        sub.last_token_time = now
        # MTP statistics, cumulative on the Request: verify steps x k drafts, accepted per position
        draft = (getattr(req, "spec_steps", 0) or 0) * getattr(self.engine, "k", 0)
        accepted = sum(getattr(req, "spec_accepted", None) or ())
        self.metrics.spec_draft.inc(max(0, draft - sub.spec_seen[0]))
        self.metrics.spec_accepted.inc(max(0, accepted - sub.spec_seen[1]))
        sub.spec_seen = (draft, accepted)

    def _text(self, req) -> str:
        text = self.llm._final_text(req)
        if req.finished:
            return text
        text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its last bytes
        hold = max((len(s) for s in req.params.stop), default=1) - 1
        return text[: len(text) - hold] if hold else text

    def _done(self, sub: _Sub, item: Output | Failure) -> None:
        sub.stream.put(item)
        with self._cond:
            self._in_system -= 1

    def _update_gauges(self) -> None:
        e = self.engine
        self.metrics.running.set(len(e.running))
        self.metrics.waiting.set(len(e.waiting) + len(self._inbox))
        self.metrics.free_slots.set(len(e.free))

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            pending, self._inbox = self._inbox, []
        for sub in [*self._live.values(), *pending]:
            try:
                self.engine.abort(sub.request_id)
            except Exception:  # the engine may be broken; the slot no longer matters
                pass
            self._done(sub, Failure(sub.index, error))
        self._live.clear()
        try:
            self._update_gauges()
        except Exception:
            pass
