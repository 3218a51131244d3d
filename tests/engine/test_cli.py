"""`python -m qnext_jax.generate` end to end on the embedded demo model (a subprocess)."""

from __future__ import annotations

import subprocess
import sys


def generate(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "qnext_jax.generate", "--max-model-len", "512", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_cli_thinks_then_answers_and_reports_timing():
    out = generate("--prompt", "Compute 57 plus 68.", "--max-tokens", "120")
    assert "[reasoning]" in out and "7+8+0=15" in out  # the worked trace, shown as reasoning
    assert "[answer]" in out and "The answer is 125." in out
    assert "prompt tokens" in out and "TTFT" in out


def test_cli_without_thinking_and_with_mtp():
    out = generate(
        "--prompt",
        "Compute 57 plus 68.",
        "--disable-thinking",
        "--max-tokens",
        "40",
        "--speculative-config",
        '{"method":"qwen3_next_mtp","num_speculative_tokens":2}',
    )
    assert "[reasoning]" not in out and "The answer is 125." in out
    assert "MTP: drafted" in out


def test_cli_rejects_a_bad_setting():
    proc = subprocess.run(
        [sys.executable, "-m", "qnext_jax.generate", "--prompt", "hi", "--temperature", "-1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "temperature" in proc.stderr
