"""`python -m qnext_jax.serve` as users start it (here with MTP speculative decoding): a
subprocess on a free loopback port, stopped by this test (by its own pid)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
from serve_utils import JAX_CACHE, free_port, metric


def _env():
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": JAX_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }


def test_cli_serves_the_embedded_model():
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "qnext_jax.serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # the in-process fixture's cache geometry: warm-up shapes come from XLA's disk cache
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
        "--seed",
        "1",
        "--served-model-name",
        "demo",
        "alias",
        "--log-level",
        "warning",
        "--speculative-config",
        '{"method": "qwen3_next_mtp", "num_speculative_tokens": 1}',
    ]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the server did not come up"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        models = httpx.get(base + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["demo", "alias"]
        assert models[0]["max_model_len"] == 512
        r = httpx.post(
            base + "/v1/completions",
            timeout=120,
            json={"model": "alias", "prompt": "1 + 1 =", "max_tokens": 4},
        )
        assert r.status_code == 200 and r.json()["model"] == "demo"
        assert r.json()["usage"]["prompt_tokens"] == 5
        draft = metric(base, "qnext:spec_decode_num_draft_tokens_total")
        accepted = metric(base, "qnext:spec_decode_num_accepted_tokens_total")
        assert 0 < draft and 0 <= accepted <= draft  # MTP drafts were proposed and counted
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_cli_refuses_max_model_len_above_the_checkpoint():
    cmd = [
        sys.executable,
        "-m",
        "qnext_jax.serve",
        "--port",
        str(free_port()),
        "--max-model-len",
        "100000",
    ]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "max_position_embeddings" in out.stderr
