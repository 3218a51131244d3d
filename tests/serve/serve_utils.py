"""The real server on 127.0.0.1 (a free port) in a background thread of this process, with the
embedded demo model; tests stop it themselves. Helpers for SSE and /metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time

import httpx
import pytest
import uvicorn

MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 8
# One prefill chunk length for every prompt: the suite compiles prefill for 4 row buckets only
PREFILL_CHUNK = 16
# XLA's persistent cache: a second run of the suite skips most compilation (CPU compiles of
# the demo model take 10-30 s each on a busy 2-core machine)
JAX_CACHE = os.environ.get("QNEXT_JAX_CACHE_DIR", os.path.expanduser("~/.cache/qnext_jax/xla"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Running:
    base: str  # http://127.0.0.1:PORT
    app: object
    server: object  # qnext_jax.serve.app.Server
    uv: uvicorn.Server
    thread: threading.Thread

    @property
    def llm(self):
        return self.server.llm

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def start(app) -> Running:
    """Serve `app` with uvicorn in a daemon thread; returns once the port accepts requests."""
    port = free_port()
    uv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=30)
    )
    thread = threading.Thread(target=uv.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uv.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn failed to start"
        time.sleep(0.02)
    return Running(f"http://127.0.0.1:{port}", app, app.state.server, uv, thread)


@pytest.fixture(scope="session")
def demo_llm():
    import jax

    from qnext_jax.llm import LLM
    from qnext_jax.sampling import SamplingParams

    jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    llm = LLM(max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, prefill_chunk=PREFILL_CHUNK)
    # compile every prefill row bucket and the decode block before any test measures anything
    for rows in (1, 2, 4, 8):
        llm.generate([[5] * 8] * rows, SamplingParams(max_tokens=2, ignore_eos=True))
    return llm


@pytest.fixture(scope="session")
def served(demo_llm):
    """The demo model behind the real HTTP stack, for the whole session."""
    from qnext_jax.serve.app import build_app

    running = start(build_app(demo_llm, served_model_names=["qnext-demo"], max_queue_len=128))
    yield running
    running.stop()


def sse_events(lines) -> list:
    """The JSON payloads of an SSE stream, with the literal "[DONE]" kept as a string."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric(base: str, name: str, **labels) -> float:
    """One sample of /metrics (0.0 when absent)."""
    text = httpx.get(base + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


def chat_body(question: str, **kw) -> dict:
    return {"model": "qnext-demo", "messages": [{"role": "user", "content": question}], **kw}
