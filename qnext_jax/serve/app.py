"""The HTTP surface: OpenAI-compatible routes over an AsyncEngine.

Why FastAPI (on Starlette) + uvicorn: it is the stack vLLM serves from, so clients meet the same
ASGI behaviour (keep-alive, SSE through StreamingResponse, disconnect detection that cancels a
stream); both are widely used and maintained. We use the routing and exception hooks only:
bodies are parsed by `protocol` so that validation answers 400 with a named param, not 422.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

import qnext_jax
from qnext_jax.chat import render_chat, starts_in_reasoning
from qnext_jax.serve import protocol
from qnext_jax.serve.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from qnext_jax.serve.metrics import ServerMetrics
from qnext_jax.serve.protocol import APIError, bad, error_body
from qnext_jax.serve.responses import chat_response, chat_sse, completion_response, completion_sse

log = logging.getLogger("qnext_jax.serve")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Server:
    """What the routes share: the LLM (tokenizer, config), the engine thread, names, metrics."""

    def __init__(self, llm, served_model_names: list[str], max_queue_len: int, engine=None):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.names = served_model_names
        self.metrics = ServerMetrics(served_model_names[0])
        self.engine = AsyncEngine(
            llm, max_queue_len=max_queue_len, metrics=self.metrics, engine=engine
        )
        self.max_model_len = self.engine.engine.cfg.max_model_len
        self.created = int(time.time())

    def check_model(self, body: dict) -> str:
        model = protocol.field(body, "model", "str")
        if model is not None and model not in self.names:
            raise APIError(404, f"The model `{model}` does not exist.", "model")
        return self.names[0]

    def params(
        self,
        common: protocol.Common,
        prompt_ids: list[int],
        default_max: int | None,
        prompt_param: str,
    ):
        """SamplingParams for each choice, checked against the engine's limits (400s)."""
        room = max(1, self.max_model_len - len(prompt_ids))
        max_tokens = common.max_tokens or min(default_max or room, room)
        params = protocol.sampling_params(common, max_tokens, self.llm.generation_config)
        try:
            self.engine.engine.validate(prompt_ids, params[0].resolved(self.llm.generation_config))
        except ValueError as e:
            raise bad(protocol.engine_error_param(str(e), prompt_param), str(e)) from None
        return params

    def submit(self, prompt_ids, params, request_id):
        try:
            return self.engine.submit(prompt_ids, params, request_id)
        except (QueueFullError, EngineDeadError) as e:
            raise APIError(503, str(e)) from None


def build_app(
    llm, *, served_model_names: list[str] | None = None, max_queue_len: int = 256, engine=None
) -> FastAPI:
    """The FastAPI app serving `llm`; the engine thread runs for the app's lifespan."""
    server = Server(llm, served_model_names or ["qnext-demo"], max_queue_len, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="qnext_jax", version=qnext_jax.__version__, lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app, server)
    _add_routes(app, server)
    return app


def _error(server: Server, status: int, message: str, param: str | None = None) -> JSONResponse:
    server.metrics.error(status)
    return JSONResponse(error_body(status, message, param), status_code=status)


def _install_error_handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(request, exc):  # not reached by our routes; kept for any added later
        loc = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        return _error(server, 400, str(exc), str(loc[-1]) if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def http(request, exc):  # unknown routes (404), wrong methods (405)
        return _error(server, exc.status_code, str(exc.detail))


def api(server: Server):
    """Route wrapper: APIError -> its envelope; anything else -> 500 for this request only."""

    def wrap(fn):
        @functools.wraps(fn)
        async def guarded(request: Request):
            try:
                return await fn(request)
            except APIError as e:
                return _error(server, e.status, e.message, e.param)
            except EngineDeadError as e:
                return _error(server, 503, str(e))
            except Exception as e:
                log.exception("request failed")
                return _error(server, 500, f"internal error: {type(e).__name__}: {e}")

        return guarded

    return wrap


async def _read(request: Request) -> dict:
    return protocol.parse_json(request.headers.get("content-type"), await request.body())


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(server: Server, request: Request, stream) -> dict | None:
    """Final Output per choice index, or None if the client went away (its slots freed)."""
    finals = {}
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while not stream.finished:
            nxt = asyncio.ensure_future(stream.next())
            await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                return None
            out = nxt.result()
            if out.finish_reason is not None:
                finals[out.index] = out
        return finals
    finally:
        gone.cancel()
        server.engine.abort(stream)  # no-op when finished


def _add_routes(app: FastAPI, server: Server) -> None:
    tok = server.tokenizer
    gen_cfg = server.llm.generation_config

    @app.post("/v1/chat/completions")
    @api(server)
    async def chat_completions(request: Request):
        body = await _read(request)
        model = server.check_model(body)
        messages = protocol.parse_messages(body)
        common = protocol.parse_common(
            body, max_tokens_fields=("max_tokens", "max_completion_tokens")
        )
        kwargs = protocol.field(body, "chat_template_kwargs", "dict", {})
        include_reasoning = protocol.field(body, "include_reasoning", "bool", True)
        try:
            prompt = render_chat(tok, messages, kwargs)
        except Exception as e:  # template errors (jinja) are the request's fault
            raise bad("messages", f"the chat template failed on these messages: {e}") from None
        in_reasoning = starts_in_reasoning(prompt)
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        params = server.params(common, prompt_ids, gen_cfg.get("max_new_tokens"), "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = server.submit(prompt_ids, params, rid)
        meta = dict(
            id=rid,
            model=model,
            created=int(time.time()),
            prompt_tokens=len(prompt_ids),
            in_reasoning=in_reasoning,
            include_reasoning=include_reasoning,
        )
        if common.stream:
            sse = chat_sse(stream, meta, common.include_usage, server.engine, server.metrics)
            return StreamingResponse(
                sse,
                media_type="text/event-stream",
                headers=SSE_HEADERS,
                background=BackgroundTask(server.engine.abort, stream),
            )
        finals = await collect(server, request, stream)
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(chat_response(finals, meta))

    @app.post("/v1/completions")
    @api(server)
    async def completions(request: Request):
        body = await _read(request)
        model = server.check_model(body)
        prompt = protocol.parse_prompt(body)
        common = protocol.parse_common(body, max_tokens_fields=("max_tokens",))
        echo = protocol.field(body, "echo", "bool", False)
        prompt_ids = server.llm.encode(prompt)
        if not prompt_ids:
            raise bad("prompt", "prompt is empty: at least one token is required")
        # OpenAI's completions default is 16 tokens
        params = server.params(common, prompt_ids, 16, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = server.submit(prompt_ids, params, rid)
        prompt_text = prompt if isinstance(prompt, str) else tok.decode(prompt_ids)
        meta = dict(
            id=rid,
            model=model,
            created=int(time.time()),
            prompt_tokens=len(prompt_ids),
            echo=prompt_text if echo else "",
        )
        if common.stream:
            sse = completion_sse(stream, meta, common.include_usage, server.engine, server.metrics)
            return StreamingResponse(
                sse,
                media_type="text/event-stream",
                headers=SSE_HEADERS,
                background=BackgroundTask(server.engine.abort, stream),
            )
        finals = await collect(server, request, stream)
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(completion_response(finals, meta))

    @app.get("/v1/models")
    async def models():
        root = str(server.llm.model_path)
        data = [
            {
                "id": name,
                "object": "model",
                "created": server.created,
                "owned_by": "qnext_jax",
                "root": root,
                "parent": None,
                "max_model_len": server.max_model_len,
                "permission": [],
            }
            for name in server.names
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            return _error(server, 503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": qnext_jax.__version__}

    @app.post("/tokenize")
    @api(server)
    async def tokenize(request: Request):
        body = await _read(request)
        server.check_model(body)
        special = protocol.field(body, "add_special_tokens", "bool", True)
        if "messages" in body:
            kwargs = protocol.field(body, "chat_template_kwargs", "dict", {})
            try:
                text = render_chat(tok, protocol.parse_messages(body), kwargs)
            except APIError:
                raise
            except Exception as e:
                raise bad("messages", f"the chat template failed on these messages: {e}") from None
            special = protocol.field(body, "add_special_tokens", "bool", False)
        else:
            text = protocol.field(body, "prompt", "str")
            if text is None:
                raise bad("prompt", "prompt (a string) or messages is required")
        ids = tok.encode(text, add_special_tokens=special)
        return {"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    @api(server)
    async def detokenize(request: Request):
        body = await _read(request)
        server.check_model(body)
        ids = body.get("tokens")
        vocab = server.engine.engine.vocab
        if not isinstance(ids, list) or not all(protocol.is_int(t) and 0 <= t < vocab for t in ids):
            raise bad("tokens", f"tokens must be a list of token ids in [0, {vocab})")
        return {"prompt": tok.decode(ids)}
