"""Serving benchmark: `python -m qnext_jax.serve` on the 80B geometry with random weights
(`--load-format dummy`), driven by streaming OpenAI completions clients at fixed concurrency,
with `vllm bench serve`'s metrics (TTFT, TPOT, ITL p50/p99, output tok/s); then the engine alone
(no server) on the same load, for the server's overhead on TPOT.

  python benchmarks/bench_serve.py --tp 2 --layers 48 --concurrency 1 8 64
  python benchmarks/bench_serve.py --dry-run          # tiny geometry on the CPU

Set JAX_COMPILATION_CACHE_DIR so the engine-alone process reuses the server's compiled steps.

The model folder is generated: config.json of the geometry and a word-level tokenizer with
one word per id ("<17>"), so every generated id streams as text and prompts of exact token
counts are easy. Prompts are random token ids; every request asks for exactly --output-len
tokens (ignore_eos). The server listens on 127.0.0.1 only and is stopped by its pid.

TTFT: request sent -> first non-empty text chunk. TPOT: (latency - TTFT) / (tokens - 1) per
request. ITL: gaps between chunks (a decode block delivers --decode-block tokens in one chunk,
so ITL is bursty by design: p50 is near 0, p99 near one block's time).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_model_dir(path: Path, layers: int, dry_run: bool) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from qnext_jax.config import QWEN3_NEXT_80B_A3B, default_layer_types, tiny_config

    kw = dict(num_hidden_layers=layers, layer_types=default_layer_types(layers, 4))
    cfg = tiny_config(vocab_size=512, **kw) if dry_run else QWEN3_NEXT_80B_A3B.replace(**kw)
    path.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf()
    hf["eos_token_id"] = 0
    (path / "config.json").write_text(json.dumps(hf))
    vocab = {f"<{i}>": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<0>"})
    )
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0]}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ---- client -------------------------------------------------------------------------------
async def one_request(client, url, model, prompt, output_len):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    chunks, tokens = [], None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            if any(c.get("text") for c in msg.get("choices", [])):
                chunks.append(time.perf_counter())
    end = time.perf_counter()
    return {"start": t0, "chunks": chunks, "end": end, "tokens": tokens}


async def run_load(base, model, prompts, output_len, concurrency):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def guarded(p):
            async with sem:
                return await one_request(client, "/v1/completions", model, p, output_len)

        t = time.perf_counter()
        results = await asyncio.gather(*(guarded(p) for p in prompts))
        return results, time.perf_counter() - t


def summarise(results, wall, concurrency, label):
    ttft = [r["chunks"][0] - r["start"] for r in results if r["chunks"]]
    tpot = [
        (r["end"] - r["chunks"][0]) / (r["tokens"] - 1)
        for r in results
        if r["chunks"] and r["tokens"] and r["tokens"] > 1
    ]
    itl = [b - a for r in results for a, b in itertools.pairwise(r["chunks"])]
    out_tokens = sum(r["tokens"] or 0 for r in results)
    return {
        "case": f"{label} c={concurrency}",
        "requests": len(results),
        "completed": sum(1 for r in results if r["tokens"]),
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "tpot_p50_ms": percentile(tpot, 50) * 1e3,
        "tpot_mean_ms": statistics.fmean(tpot) * 1e3 if tpot else float("nan"),
        "itl_p50_ms": percentile(itl, 50) * 1e3,
        "itl_p99_ms": percentile(itl, 99) * 1e3,
        "output_tok_s": out_tokens / wall,
        "wall_s": wall,
    }


# ---- engine alone -------------------------------------------------------------------------
def engine_only(args, model_dir: Path) -> list[dict]:
    """The same requests through LLM.engine directly (no HTTP, no detokenising thread)."""
    import numpy as np

    from qnext_jax.llm import LLM
    from qnext_jax.sampling import SamplingParams

    llm = LLM(
        model_dir,
        load_format="dummy",
        tensor_parallel_size=args.tp,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        decode_block=args.decode_block,
    )
    engine = llm.engine
    vocab = llm.model.config.vocab_size
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    rows = []
    for c in args.engine_concurrency:
        for _ in range(2):  # the first pass compiles; the second is measured
            prompts = [list(map(int, rng.integers(1, vocab, args.input_len))) for _ in range(c)]
            t0 = time.perf_counter()
            reqs = [engine.add_request(p, params) for p in prompts]
            while engine.has_work():
                engine.step()
            wall = time.perf_counter() - t0
        results = [
            {
                "start": t0,
                "chunks": [r.first_token_time],
                "end": r.finish_time,
                "tokens": len(r.output_ids),
            }
            for r in reqs
        ]
        rows.append(summarise(results, wall, c, "engine"))
    return rows


# ---- server -------------------------------------------------------------------------------
def start_server(args, model_dir: Path, port: int, log_path: Path):
    cmd = [
        sys.executable, "-m", "qnext_jax.serve",
        "--model", str(model_dir),
        "--load-format", "dummy",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--tensor-parallel-size", str(args.tp),
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-model-len", str(args.max_model_len),
        "--decode-block", str(args.decode_block),
        "--served-model-name", "bench",
        "--log-level", "warning",
    ]  # fmt: skip
    log = open(log_path, "w")  # noqa: SIM115 (kept open for the child's lifetime)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc


def wait_healthy(base: str, proc, timeout: float) -> float:
    import httpx

    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - t
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server not healthy after {timeout} s")


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--decode-block", type=int, default=8)
    ap.add_argument("--engine-concurrency", type=int, nargs="*", default=[8])
    ap.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out", default=None, help="folder for the server log and the JSON rows")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        args.layers = min(args.layers, 4)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_serve_"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir(Path(args.model_dir or out / "model"), args.layers, args.dry_run)

    if args.engine_only:  # child process: print the rows as JSON on the last line
        print(json.dumps(engine_only(args, model_dir)), flush=True)
        return

    import numpy as np

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rows = []
    t = time.perf_counter()
    proc = start_server(args, model_dir, port, out / "server.log")
    try:
        ready = wait_healthy(base, proc, timeout=900)
        print(f"server healthy after {ready:.1f} s", flush=True)
        # warm-up: every admission width (a power of two up to the largest concurrency) compiles
        # here, not mid-measurement
        widths = [1 << i for i in range(max(args.concurrency).bit_length())]
        for c in widths:
            prompts = [list(map(int, rng.integers(1, vocab, args.input_len))) for _ in range(c)]
            asyncio.run(run_load(base, "bench", prompts, 4, c))
        print(f"warm-up done at {time.perf_counter() - t:.1f} s", flush=True)
        for c in args.concurrency:
            n = c * args.requests_per_client
            prompts = [list(map(int, rng.integers(1, vocab, args.input_len))) for _ in range(n)]
            results, wall = asyncio.run(run_load(base, "bench", prompts, args.output_len, c))
            rows.append(summarise(results, wall, c, "server"))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_server(proc)
    # the engine alone, in a fresh process (the server's devices are free again)
    cmd = [sys.executable, __file__, "--engine-only", "--model-dir", str(model_dir)]
    for k in ("tp", "layers", "input_len", "output_len", "max_num_seqs", "max_model_len",
              "decode_block"):  # fmt: skip
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += ["--engine-concurrency", *map(str, args.engine_concurrency)]
    if args.dry_run:
        cmd.append("--dry-run")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        print(res.stderr[-3000:], flush=True)
    else:
        rows += json.loads(res.stdout.strip().splitlines()[-1])
    (out / "bench_serve.json").write_text(json.dumps(rows, indent=1))

    print(
        f"\ninput {args.input_len} tokens, output {args.output_len}, decode block "
        f"{args.decode_block}, max_num_seqs {args.max_num_seqs}, tp {args.tp}, {args.layers} layers"
    )
    print(
        "| case | done | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms | ITL p99 ms "
        "| out tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['completed']}/{r['requests']} | {r['ttft_p50_ms']:.1f} | "
            f"{r['ttft_p99_ms']:.1f} | {r['tpot_p50_ms']:.2f} | {r['itl_p50_ms']:.2f} | "
            f"{r['itl_p99_ms']:.2f} | {r['output_tok_s']:.0f} |"
        )
    by = {r["case"]: r for r in rows}
    for c in args.engine_concurrency:
        s, e = by.get(f"server c={c}"), by.get(f"engine c={c}")
        if s and e:
            over = s["tpot_p50_ms"] / e["tpot_p50_ms"] - 1
            print(f"server overhead on TPOT p50 at concurrency {c}: {over * 100:+.1f}%")


if __name__ == "__main__":
    main()
