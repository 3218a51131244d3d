"""Sharding: the 8-device checks (mesh_checks.py) run in a subprocess with 8 fake CPU devices, so
this pytest process keeps its single device; the two-process test runs two jax.distributed
processes (2 devices each) on 127.0.0.1 and compares their sharded logits with ours."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent


def _env(devices: int) -> dict[str, str]:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )


def test_tensor_parallel_size_must_divide_the_heads():
    from qnext_jax import sharding
    from qnext_jax.config import QWEN3_NEXT_80B_A3B

    valid = r"tensor_parallel_size=3 .* valid sizes: \[1, 2, 4, 8, 16\]"
    with pytest.raises(ValueError, match=valid):
        sharding.make_mesh(QWEN3_NEXT_80B_A3B, 3)


def test_attention_replicas_must_divide_the_devices():
    from qnext_jax import LLM

    with pytest.raises(
        ValueError, match=r"attention_replicas=2 must divide tensor_parallel_size=1"
    ):
        LLM(attention_replicas=2)


def test_on_eight_fake_devices():
    """Sharded forward == unsharded (TP/EP 2, 4, 8; KV heads split and replicated), the table's
    parameter and cache shardings, greedy generation, sharded loading (safetensors, orbax)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE / "mesh_checks.py"),
        "-q",
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_sharded_forward(tmp_path):
    import multihost_worker as w
    from flax import nnx

    from qnext_jax.config import RuntimeOptions
    from qnext_jax.model import Qwen3NextForCausalLM

    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multihost_worker.py"), str(i), str(port), str(tmp_path)],
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:  # only our own workers (each in its own session)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]

    model = Qwen3NextForCausalLM(w.CFG, RuntimeOptions(dtype="float32"), rngs=nnx.Rngs(0))
    want = np.asarray(w.prefill_and_step(model, w.PROMPT, w.NEXT, model.init_cache(2, 16)))
    got = np.load(tmp_path / "logits.npy")
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-5
