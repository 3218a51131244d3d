"""The Qwen3-Next-80B-A3B geometry with random bf16 weights, created directly sharded over
`--tp` GPUs: decode step time (batch 1 / 8 / 64), prefill time, compile times, memory per GPU and
a per-component breakdown of the decode step from a profile (collectives included).

  python benchmarks/bench_80b.py --tp 2                       # full 48 layers on 2 GPUs
  python benchmarks/bench_80b.py --tp 1 --layers 12           # a depth slice on one GPU
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_80b.py --dry-run

Decode: the engine's jitted on-device loop, `engine.step(block=N)` wall time / N (one host
readback per block), median of --reps blocks after a warm-up block. Prefill: the engine's
admission of one request (chunked prefill of prompt[:-1] + slot setup), blocked on the cache,
median of 3 after a compiling call. Floors: bytes a decode step must read / (tp x 4.3 TB/s);
prefill matmul FLOPs / (tp x 790 TFLOP/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    admit,
    dataclass_changes,
    decode_bytes,
    device_memory,
    floor_seconds,
    prefill_flops,
    profile_breakdown,
    time_admission,
)
from flax import nnx  # noqa: E402

import pallas_kernels.moe as pallas_moe  # noqa: E402
from qnext_jax import sharding  # noqa: E402
from qnext_jax.cache import CacheSlots  # noqa: E402
from qnext_jax.config import (  # noqa: E402
    QWEN3_NEXT_80B_A3B,
    RuntimeOptions,
    default_layer_types,
    tiny_config,
)
from qnext_jax.engine import Engine, EngineConfig  # noqa: E402
from qnext_jax.loading import init_random  # noqa: E402

PEAK_FLOPS = 790e12  # bf16 dense, measured on the H200 (8192^3 matmul)
ROWS: list[dict] = []


def log(msg: str) -> None:
    print(msg, flush=True)


def record(**row) -> dict:
    ROWS.append(row)
    log(json.dumps({k: v for k, v in row.items() if k != "top"}, default=str))
    return row


def build_model(cfg, tp: int, moe_impl: str, attention_replicas: int = 1):
    mesh = None
    if tp > 1 or attention_replicas > 1:  # make_mesh rejects replicas that do not divide tp
        mesh = sharding.make_mesh(cfg, tp, attention_replicas=attention_replicas)
    opts = RuntimeOptions(dtype="bfloat16", mesh=mesh, moe_impl=moe_impl)
    shardings_fn = functools.partial(sharding.param_shardings, mesh=mesh, cfg=cfg) if mesh else None
    t = time.perf_counter()
    model = init_random(cfg, opts, shardings_fn=shardings_fn)
    jax.block_until_ready(nnx.state(model))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log(f"random init: {n / 1e9:.2f} B parameters in {time.perf_counter() - t:.1f} s")
    return model, mesh


def moe_blocks(spec: str):
    """--moe-blocks: 'default' or 'key=value,...' of MoEBlocks' fields -> MoEBlocks."""
    base = pallas_moe.MoEBlocks()
    return dataclasses.replace(base, **dataclass_changes(spec, base))


def with_options(model, **changes):
    """The same parameters under other runtime options (static ones: moe_impl, attention_impl,
    scan_layers)."""
    cfg = model.config
    opts = dataclasses.replace(model.opts, **changes)
    graphdef = nnx.split(nnx.eval_shape(lambda: type(model)(cfg, opts)))[0]
    return nnx.merge(graphdef, nnx.state(model))


def make_engine(model, mesh, batch: int, max_len: int, block: int, chunk: int, check: int = 1):
    cfg = EngineConfig(
        max_num_seqs=batch,
        max_model_len=max_len,
        decode_block=block,
        prefill_chunk=chunk,
        steps_per_check=check,
    )
    return Engine(model, cfg, eos_ids=[], mesh=mesh)


def decode_case(
    model, mesh, tp, batch, context, block, reps, profile, vocab, tag="", slots=0, check=1
):
    """`batch` running requests in an engine of max(batch, slots) slots (idle slots: a server
    with --max-num-seqs above its load); the decode loop checks its condition every `check`
    steps."""
    rng = np.random.default_rng(0)
    steps = block * (reps + 2)
    engine = make_engine(
        model, mesh, max(batch, slots), context + steps + 8, block, min(context, 8192), check
    )
    prompts = [list(map(int, rng.integers(0, vocab, context))) for _ in range(batch)]
    t = time.perf_counter()
    admit(engine, prompts, steps)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    engine.step(block=block)
    first_block = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        engine.step(block=block)
        times.append(time.perf_counter() - t)
    step = statistics.median(times) / block
    traces = engine.compiles["decode", block, math.gcd(block, check)]
    cfg = model.config
    floor = floor_seconds(cfg, batch, context, devices=tp)
    replicas = 1 if mesh is None else mesh.shape["rep"]
    row = dict(
        case=f"decode B={batch} ctx={context}{tag}"
        + (f" of {slots} slots" if slots > batch else ""),
        ours_ms=step * 1e3,
        floor_ms=floor * 1e3,
        ratio=step / floor,
        tok_s=batch / step,
        decode_compile_s=first_block - step * block,
        decode_traces=traces,  # 1 in steady state: a second trace means a recompile was timed
        prefill_with_compile_s=prefill_s,
        memory=device_memory(),
    )
    if replicas > 1:  # the floor column stays the model's; this one is the layout's
        row["layout_floor_ms"] = floor_seconds(cfg, batch, context, tp, replicas) * 1e3
    if profile:
        attach_profile(row, profile_decode, engine, block)
    record(**row)
    del engine


def profile_decode(engine, block: int):
    """Per-step kernel time by component on device 0, from one profiled block."""
    args = (
        engine.params,
        engine.cache,
        engine.slots,
        block,
        engine.cfg.decode_block,
        engine.all_greedy(),
    )
    return profile_program(engine._decode, args, lambda: engine.step(block=block), steps=block)


def profile_prefill(engine, prompt):
    """Kernel time by component of one admission (one prefill chunk when the prompt fits)."""
    C = engine.cfg.prefill_chunk
    ids = jnp.zeros((1, C), jnp.int32)
    slots = CacheSlots(jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool))
    args = (engine.params, engine.cache, ids, ids, ids, slots)

    def run():
        (req,) = admit(engine, [prompt], 1)
        engine.abort(req.request_id)

    return profile_program(engine._prefill, args, run, steps=1)


def attach_profile(row: dict, profile_fn, *args) -> None:
    """row["profile"] = profile_fn(*args); a failed profile is noted and the timing stands."""
    try:
        row["profile"] = profile_fn(*args)
    except Exception as e:
        row["profile_error"] = repr(e)[:300]


HLO_DIR = None  # --hlo-dir: where the profiled programs' compiled HLO and traces are written
PROFILE_TOP = 30  # --profile-top: costliest kernels kept per profile (in --json)


def profile_program(jitted, args, run, steps: int):
    hlo = jitted.lower(*args).compile().as_text()  # the program `run` executes: its op names
    trace = None
    if HLO_DIR:
        os.makedirs(HLO_DIR, exist_ok=True)
        stem = os.path.join(HLO_DIR, f"{jitted.__name__}_{len(ROWS)}")
        with open(stem + ".hlo.txt", "w") as fh:
            fh.write(hlo)
        trace = stem + ".trace.json.gz"
    out = profile_breakdown(run, hlo, steps=steps, top=PROFILE_TOP, keep_trace=trace)
    out["all_reduce_ops"] = hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")
    return out


def prefill_case(
    model, mesh, tp, tokens: int, chunk: int, vocab: int, profile: bool, reps=3, tag=""
):
    rng = np.random.default_rng(1)
    engine = make_engine(model, mesh, 1, tokens + 16, 1, chunk)
    prompt = list(map(int, rng.integers(0, vocab, tokens + 1)))  # prefill covers prompt[:-1]
    steady, first = time_admission(engine, prompt, reps)
    flops = prefill_flops(model.config, tokens)
    floor = flops / (PEAK_FLOPS * tp)
    row = dict(
        case=f"prefill {tokens} (chunk {chunk}){tag}",
        ours_ms=steady * 1e3,
        floor_ms=floor * 1e3,
        ratio=steady / floor,
        tok_s=tokens / steady,
        prefill_compile_s=first - steady,
        memory=device_memory(),
    )
    if profile:
        attach_profile(row, profile_prefill, engine, prompt)
    record(**row)
    del engine


def long_prompt_case(model, mesh, tokens: int, chunk: int, vocab: int):
    """One prompt of `tokens` (chunked prefill) then its first token: TTFT and peak memory.

    A short prompt first compiles the prefill chunk and the one-token decode. The long prompt
    still compiles its history write once (its width bucket is new), so it runs twice: the
    first TTFT includes that compile, the second is the steady figure. Run before the other
    cases so the process's peak memory is this case's.
    """
    rng = np.random.default_rng(2)
    engine = make_engine(model, mesh, 1, tokens + 16, 1, chunk)
    (warm,) = admit(engine, [list(map(int, rng.integers(0, vocab, chunk + 1)))], 2)
    engine.step(block=1)
    engine.abort(warm.request_id)
    ttfts = []
    for _ in range(2):
        t = time.perf_counter()
        (req,) = admit(engine, [list(map(int, rng.integers(0, vocab, tokens)))], 2)
        engine.step(block=1)
        ttfts.append(time.perf_counter() - t)
        first = req.output_ids[:1]
        engine.abort(req.request_id)
    record(
        case=f"long prompt {tokens} (chunk {chunk})",
        ttft_s=ttfts[-1],
        ttft_first_s=ttfts[0],
        tok_s=tokens / ttfts[-1],
        first_token=first,
        memory=device_memory(),
    )
    del engine


def print_table(meta: dict) -> None:
    log("\n" + " | ".join(f"{k}={v}" for k, v in meta.items()))
    log("| case | ours ms | floor ms | ours/floor | tok/s | compile s | peak GiB/GPU |")
    log("|---|---|---|---|---|---|---|")
    for r in ROWS:
        if "error" in r:
            log(f"| {r['case']} | error: {r['error'][:150]} |")
            continue
        if "ours_ms" not in r and "ttft_s" not in r:
            continue
        comp = r.get("decode_compile_s", r.get("prefill_compile_s"))
        peak = max((m["peak_gib"] for m in r.get("memory", [])), default=0)

        def f(key, fmt="{:.3f}", r=r):
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        if "ours_ms" in r:
            ours = f("ours_ms")
        else:
            ours = f"TTFT {r['ttft_s']:.2f} s (first {r['ttft_first_s']:.2f} s)"
        log(
            f"| {r['case']} | {ours} | {f('floor_ms')} | {f('ratio', '{:.2f}')} | "
            f"{f('tok_s', '{:.0f}')} | {'-' if comp is None else f'{comp:.1f}'} | {peak:.1f} |"
        )
    for r in ROWS:
        p = r.get("profile")
        if not p:
            continue
        log(f"\nbreakdown {r['case']} (us per step on GPU 0, {p['kernels']:.0f} kernels/step):")
        comps = sorted(
            (
                k
                for k in p
                if not isinstance(p[k], (dict, list))
                and k not in ("busy", "span", "kernels", "all_reduce_ops")
            ),
            key=lambda k: -p[k],
        )
        log(" | ".join(f"{k} {p[k]:.0f}" for k in comps))
        if "launches" in p:
            log("launches: " + " | ".join(f"{k} {v:.0f}" for k, v in p["launches"].items()))
        log(
            f"busy {p['busy']:.0f} us, span {p['span']:.0f} us, step {r['ours_ms'] * 1e3:.0f} us, "
            f"all-reduce ops in the step program {p['all_reduce_ops']}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument(
        "--attention-replicas",
        type=int,
        default=1,
        help="copies of the attention / GDN weights (= --tp: whole heads on every GPU, one "
        "all-reduce per layer)",
    )
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--long-context", type=int, default=32768, help="decode at this context too")
    ap.add_argument("--long-batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--prefill", type=int, nargs="*", default=[1024, 8192, 32768])
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--long-prompt", type=int, default=0, help="e.g. 262144 (chunked prefill)")
    ap.add_argument("--long-prompt-chunk", type=int, default=2048)
    ap.add_argument("--profile-batch", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--profile-prefill", type=int, nargs="*", default=[8192])
    ap.add_argument("--moe-impl", nargs="+", default=["auto"], help="decode cases per impl")
    ap.add_argument(
        "--moe-blocks",
        nargs="+",
        default=["default"],
        help="decode cases per MoE decode block setting: 'default' or key=value,... of "
        "pallas_kernels.moe.MoEBlocks (e.g. gate_up_apart=1,down_stages=2)",
    )
    ap.add_argument(
        "--scan-layers",
        nargs="+",
        type=int,
        default=[1],
        help="decode cases with the layer scan (1) and/or the layers unrolled (0)",
    )
    ap.add_argument(
        "--attention-impl", nargs="+", default=["auto"], help="prefill cases per attention impl"
    )
    ap.add_argument(
        "--linear-impl", nargs="+", default=["auto"], help="decode cases per projection impl"
    )
    ap.add_argument(
        "--norm-impl", nargs="+", default=["auto"], help="decode cases per norm impl (auto / xla)"
    )
    ap.add_argument(
        "--merge-projections",
        nargs="+",
        type=int,
        default=[1],
        help="decode cases with projections sharing an input in one launch (1) and/or not (0)",
    )
    ap.add_argument(
        "--steps-per-check",
        nargs="+",
        type=int,
        default=[1],
        help="decode cases per EngineConfig.steps_per_check (1: the loop's check every step)",
    )
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--slots", type=int, default=0, help="engine slots (default: the batch)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--hlo-dir",
        default=None,
        help="write the profiled programs' compiled HLO and profiler traces",
    )
    ap.add_argument("--profile-top", type=int, default=30, help="costliest kernels per profile")
    ap.add_argument("--dry-run", action="store_true", help="tiny config: checks the script")
    args = ap.parse_args()
    global HLO_DIR, PROFILE_TOP
    HLO_DIR, PROFILE_TOP = args.hlo_dir, args.profile_top

    if args.dry_run:
        cfg = tiny_config(
            vocab_size=512,
            num_hidden_layers=args.layers,
            layer_types=default_layer_types(args.layers, 4),
        )
    else:
        cfg = QWEN3_NEXT_80B_A3B.replace(
            num_hidden_layers=args.layers, layer_types=default_layer_types(args.layers, 4)
        )
    devs = jax.devices()
    meta = dict(
        jax=jax.__version__,
        device=devs[0].device_kind,
        tp=args.tp,
        attention_replicas=args.attention_replicas,
        layers=args.layers,
        date=time.strftime("%Y-%m-%d"),
    )
    log(json.dumps(meta))
    log(
        "decode bytes per step (B=1, ctx 1K, GB): "
        + json.dumps({k: round(v / 1e9, 3) for k, v in decode_bytes(cfg, 1, 1024).items()})
    )
    model, mesh = build_model(cfg, args.tp, args.moe_impl[0], args.attention_replicas)
    weights = record(case="weights", memory=device_memory())
    meta["weights_gib_per_gpu"] = round(max(m["in_use_gib"] for m in weights["memory"]), 2)

    def guarded(fn, case, *a, **kw):
        try:
            fn(*a, **kw)
        except Exception as e:
            traceback.print_exc()
            record(case=case, error=repr(e)[:300])

    if args.long_prompt:
        guarded(
            long_prompt_case,
            f"long prompt {args.long_prompt}",
            model,
            mesh,
            args.long_prompt,
            args.long_prompt_chunk,
            cfg.vocab_size,
        )
    blocks = [moe_blocks(spec) for spec in args.moe_blocks]  # fails early on a bad spec
    for impl, scan, lin, norm, merge, (spec, mb), check in itertools.product(
        args.moe_impl,
        args.scan_layers,
        args.linear_impl,
        args.norm_impl,
        args.merge_projections,
        zip(args.moe_blocks, blocks, strict=True),
        args.steps_per_check,
    ):
        pallas_moe.DECODE_BLOCKS = mb  # read when the engine below traces its decode step
        changes = {
            k: v
            for k, v in (
                ("moe_impl", impl),
                ("scan_layers", bool(scan)),
                ("linear_impl", lin),
                ("norm_impl", norm),
                ("merge_projections", bool(merge)),
            )
            if v != getattr(model.opts, k)
        }
        m = with_options(model, **changes) if changes else model
        tag = "" if len(args.moe_impl) == 1 else f" moe={impl}"
        tag += "" if scan else " unrolled"
        tag += "" if len(args.linear_impl) == 1 else f" linear={lin}"
        tag += "" if len(args.norm_impl) == 1 else f" norm={norm}"
        tag += "" if len(args.merge_projections) == 1 else f" merge={merge}"
        tag += "" if len(args.moe_blocks) == 1 else f" moe-blocks={spec}"
        tag += "" if len(args.steps_per_check) == 1 else f" check={check}"
        for b in args.batch:
            guarded(
                decode_case,
                f"decode B={b}{tag}",
                m,
                mesh,
                args.tp,
                b,
                args.context,
                args.block,
                args.reps,
                b in args.profile_batch,
                cfg.vocab_size,
                tag,
                args.slots,
                check,
            )
    for b in args.long_batch if args.long_context else []:
        guarded(
            decode_case,
            f"decode B={b} ctx={args.long_context}",
            model,
            mesh,
            args.tp,
            b,
            args.long_context,
            args.block,
            args.reps,
            False,
            cfg.vocab_size,
        )
    for impl in args.attention_impl:
        m = model if impl == "auto" else with_options(model, attention_impl=impl)
        tag = "" if impl == "auto" else f" attention={impl}"
        for n in args.prefill:
            guarded(
                prefill_case,
                f"prefill {n}{tag}",
                m,
                mesh,
                args.tp,
                n,
                min(args.prefill_chunk, n),
                cfg.vocab_size,
                n in args.profile_prefill,
                tag=tag,
            )
    print_table(meta)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": ROWS}, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
