"""Decode step time on the Qwen3-Next-80B geometry, depth-truncated to fit one GPU, with random
bf16 weights: qnext_jax's engine (plain and MTP speculative steps) vs HF transformers (+ fla)
on the same truncated geometry in the same process, next to the HBM floor of the bytes a step
must read.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_decode.py --layers 4 --batch 1 8 64

Prefill (--prefill 16384): the engine admitting one prompt (chunked prefill, blocked on the
cache), median of 3 after a compiling call, vs HF's forward with logits for the last position
only (`logits_to_keep=1`), torch.cuda synchronised, same process.

Timing: wall time of `engine.step(block=N)` (N decode steps inside one jitted device loop, one
host readback per block) after a warm-up block, divided by N; median of --reps blocks.
HF: `generate` with a static number of new tokens, (t(n2) - t(n1)) / (n2 - n1), torch.cuda
synchronised. Floor: (weights touched + KV / GDN state traffic) / 4.3 TB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import floor_seconds, time_admission  # noqa: E402
from flax import nnx  # noqa: E402

from qnext_jax.config import QWEN3_NEXT_80B_A3B, RuntimeOptions, default_layer_types  # noqa: E402
from qnext_jax.engine import Engine, EngineConfig  # noqa: E402
from qnext_jax.model import Qwen3NextForCausalLM  # noqa: E402
from qnext_jax.sampling import SamplingParams  # noqa: E402


def truncated_config(layers: int):
    return QWEN3_NEXT_80B_A3B.replace(
        num_hidden_layers=layers, layer_types=default_layer_types(layers, 4)
    )


def time_engine(model, batch: int, context: int, k: int, block: int, reps: int):
    cfg = EngineConfig(
        max_num_seqs=batch,
        max_model_len=context + block * (reps + 2) * (k + 1) + 8,
        decode_block=block,
        num_speculative_tokens=k,
        prefill_chunk=1024,
    )
    engine = Engine(model, cfg, eos_ids=[])
    rng = np.random.default_rng(0)
    params = SamplingParams(
        max_tokens=block * (reps + 2) * (k + 1), temperature=0.0, ignore_eos=True
    )
    reqs = [
        engine.add_request(list(map(int, rng.integers(0, 1000, context))), params)
        for _ in range(batch)
    ]
    t0 = time.perf_counter()
    engine.step(block=block)  # prefill + compile + one block
    compile_s = time.perf_counter() - t0
    times, emitted = [], []
    for _ in range(reps):
        before = sum(len(r.output_ids) for r in reqs)
        t = time.perf_counter()
        engine.step(block=block)
        times.append(time.perf_counter() - t)
        emitted.append((sum(len(r.output_ids) for r in reqs) - before) / batch)
    step = statistics.median(times) / block
    tokens_per_step = statistics.median(emitted) / block
    return step, tokens_per_step, compile_s


def hf_model(cfg):
    """HF transformers' Qwen3-Next of the same geometry, random bf16 weights, on the GPU."""
    import torch
    from transformers import Qwen3NextConfig as HFConfig
    from transformers import Qwen3NextForCausalLM as HFModel

    hf_cfg = HFConfig(
        **{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}
    )
    with torch.device("cuda"):
        return HFModel(hf_cfg).to(torch.bfloat16).eval()


def time_hf(cfg, batch: int, context: int, n1=8, n2=40):
    import torch

    model = hf_model(cfg)
    ids = torch.randint(0, 1000, (batch, context), device="cuda")
    mask = torch.ones_like(ids)

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(n1)
    return statistics.median([(run(n2) - run(n1)) / (n2 - n1) for _ in range(2)])


def time_prefill(model, tokens: int, chunk: int, reps: int = 3) -> tuple[float, float]:
    """(steady seconds, first-call seconds) of the engine admitting one `tokens`-token prompt
    (chunked prefill of prompt[:-1] + slot setup), blocked on the cache."""
    engine = Engine(
        model,
        EngineConfig(max_num_seqs=1, max_model_len=tokens + 16, prefill_chunk=chunk),
        eos_ids=[],
    )
    prompt = list(map(int, np.random.default_rng(1).integers(0, 1000, tokens + 1)))
    return time_admission(engine, prompt, reps)


def time_hf_prefill(cfg, tokens: int, reps: int = 3) -> float:
    """HF transformers (+ fla) forward over one prompt, logits for the last position only."""
    import torch

    model = hf_model(cfg)
    ids = torch.randint(0, 1000, (1, tokens), device="cuda")

    def run():
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model(ids, logits_to_keep=1)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run()
    return statistics.median([run() for _ in range(reps)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--spec", type=int, nargs="*", default=[1, 2, 3], help="MTP k at batch 1")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hf-batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--prefill", type=int, nargs="*", default=[16384], help="prompt lengths")
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny config on the CPU: checks the script"
    )
    args = ap.parse_args()
    cfg = truncated_config(args.layers)
    if args.dry_run:
        from qnext_jax.config import tiny_config

        cfg = tiny_config(
            vocab_size=1024,
            num_hidden_layers=args.layers,
            layer_types=default_layer_types(args.layers, 4),
        )
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.layers}-layer 80B slice",
        flush=True,
    )
    t = time.perf_counter()
    model = Qwen3NextForCausalLM(cfg, RuntimeOptions(dtype="bfloat16"), rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"random init {n_params / 1e9:.2f} B params in {time.perf_counter() - t:.1f} s", flush=True
    )
    rows = []
    for b in args.batch:
        try:
            step, _, comp = time_engine(model, b, args.context, 0, args.block, args.reps)
            rows.append(
                dict(
                    case=f"decode B={b} ctx={args.context}",
                    ours_ms=step * 1e3,
                    floor_ms=floor_seconds(cfg, b, args.context) * 1e3,
                    compile_s=comp,
                )
            )
        except Exception as e:  # keep the other cases
            rows.append(dict(case=f"decode B={b}", error=repr(e)[:200]))
        print(rows[-1], flush=True)
    base = next(
        (r["ours_ms"] for r in rows if r["case"].startswith("decode B=1 ") and "ours_ms" in r), None
    )
    for k in args.spec:
        try:
            step, tps, comp = time_engine(model, 1, args.context, k, args.block, args.reps)
            rows.append(
                dict(
                    case=f"MTP k={k} B=1 verify step",
                    ours_ms=step * 1e3,
                    vs_plain=step * 1e3 / base if base else None,
                    tokens_per_step=tps,
                    compile_s=comp,
                )
            )
        except Exception as e:
            rows.append(dict(case=f"MTP k={k}", error=repr(e)[:200]))
        print(rows[-1], flush=True)
    for n in args.prefill:
        try:
            steady, first = time_prefill(model, n, min(args.prefill_chunk, n))
            rows.append(dict(case=f"prefill {n}", ours_ms=steady * 1e3, compile_s=first - steady))
        except Exception as e:
            rows.append(dict(case=f"prefill {n}", error=repr(e)[:200]))
        print(rows[-1], flush=True)
    del model

    def anchor(label: str, matches, timer) -> None:
        """HF's seconds from timer() into the rows matches(case) selects (HF / ours too)."""
        try:
            hf = timer()
            for r in rows:
                if matches(r["case"]) and "ours_ms" in r:
                    r["hf_ms"] = hf * 1e3
                    r["hf_over_ours"] = hf * 1e3 / r["ours_ms"]
            print(f"HF {label}: {hf * 1e3:.3f} ms", flush=True)
        except Exception as e:
            rows.append(dict(case=f"HF {label}", error=repr(e)[:300]))
            print(rows[-1], flush=True)

    for n in args.prefill if not args.dry_run else []:
        anchor(f"prefill {n}", f"prefill {n}".__eq__, lambda n=n: time_hf_prefill(cfg, n))
    for b in args.hf_batch if not args.dry_run else []:
        anchor(
            f"B={b} step",
            lambda case, b=b: case.startswith(f"decode B={b} "),
            lambda b=b: time_hf(cfg, b, 512),
        )
    print("\n| case | ours ms/step | HF ms/step | HF/ours | floor ms | ours/floor | compile s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:

        def f(key, fmt="{:.3f}", r=r):
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        ratio = r["ours_ms"] / r["floor_ms"] if r.get("floor_ms") and r.get("ours_ms") else None
        extra = (
            f" (x{r['vs_plain']:.2f} plain, {r['tokens_per_step']:.2f} tok/step)"
            if r.get("vs_plain")
            else ""
        )
        print(
            f"| {r['case']}{extra} | {f('ours_ms')} | {f('hf_ms')} | "
            f"{f('hf_over_ours', '{:.1f}')} | {f('floor_ms')} | "
            f"{'-' if ratio is None else f'{ratio:.1f}'} | {f('compile_s', '{:.1f}')} |"
            + (f" error {r['error']}" if "error" in r else "")
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
