"""Gated delta rule kernels on the GPU: ours (Pallas) vs fla 0.6.0 (Triton), same inputs, one run.

Qwen3-Next shape: H=16 q/k heads, HV=32 value heads, K=V=128, bf16 in, fp32 state, q/k l2-normed
in the kernel. Prints, per case: ours, fla, ours/fla, and the hardware floor; and the relative
error of our output against fla's and against the fp32 reference.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_gdn_kernels.py [--sweep] [--quick]
      [--prefill-sweep --configs ... --cases ...] [--timing-check]

Timing. fla: triton.testing.do_bench median (as the anchors in shared/spec/anchors.md).
Ours: "dev" = per-call device time, from jitted programs that run the kernel back to back
(state carried from call to call, each call on its own copy of the inputs), the marginal time
of `reps` more calls (`time_ours`): what a model step sees. (Calls that all read the same
inputs timed the prefill 2-5x too fast on an H100; RESULTS.md, run BJ.) "call" = median wall
time of single jitted calls with block_until_ready, which adds ~tens of us of host dispatch
(jax) that do_bench does not count for fla's launches either.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.gated_delta_rule import (  # noqa: E402
    ChunkBlocks,
    DecodeBlocks,
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule,
)

H, HV, K, V = 16, 32, 128, 128
# BENCH_CPU_DRY_RUN=1: tiny shapes in interpret mode on the CPU, to check this script itself.
DRY = os.environ.get("BENCH_CPU_DRY_RUN") == "1"
if DRY:
    H, HV, K, V = 2, 4, 32, 32
HBM_BPS = 4.3e12  # device-to-device copy measured on this H200 (KINDS.md)
MMA_FLOPS = 7.7e14  # bf16 matmul through XLA (anchors.md)


def make_inputs(B, T, seed=0, heads=(H, HV)):
    """numpy fp32 inputs; callers cast to bf16 in their framework. heads: (H, HV)."""
    h, hv = heads
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, h, K), np.float32)
    k = rng.standard_normal((B, T, h, K), np.float32)
    v = rng.standard_normal((B, T, hv, V), np.float32)
    g = np.log(1 / (1 + np.exp(-rng.standard_normal((B, T, hv), np.float32)))) / 16  # logsigmoid
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, hv), np.float32)))
    s0 = 0.1 * rng.standard_normal((B, hv, K, V), np.float32)
    return q, k, v, g.astype(np.float32), beta.astype(np.float32), s0


def to_jax(q, k, v, g, beta, s0):
    bf = jnp.bfloat16
    return (
        jnp.asarray(q, bf),
        jnp.asarray(k, bf),
        jnp.asarray(v, bf),
        jnp.asarray(g),
        jnp.asarray(beta, bf),
        jnp.asarray(s0),
    )


def to_torch(q, k, v, g, beta, s0):
    import torch

    r = v.shape[2] // q.shape[2]  # fla measured with q/k repeated to the value heads (anchors.md)
    t = lambda x, dt: torch.from_numpy(x).to("cuda", dt)
    qt = t(q, torch.bfloat16).repeat_interleave(r, dim=2).contiguous()
    kt = t(k, torch.bfloat16).repeat_interleave(r, dim=2).contiguous()
    return (
        qt,
        kt,
        t(v, torch.bfloat16),
        t(g, torch.float32),
        t(beta, torch.bfloat16),
        t(s0, torch.float32),
    )


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def torch_np(x):
    return x.float().cpu().numpy()


def _chained(fn):
    """many(sets, s): fn applied once per operand set in `sets`, the state carried from call to
    call, unrolled; returns (the sum of each output's first element, the final state)."""

    def many(sets, s):
        acc = jnp.float32(0)
        for a in sets:
            o, s = fn(a, s)
            acc = acc + o.reshape(-1)[0].astype(jnp.float32)
        return acc, s

    return many


def marginal_us(fn, sets, s0, rounds=5):
    """Per-call device time of fn (us): programs of the first half of `sets` and of all of
    them, timed alternately `rounds` times; (median(all) - median(half)) / half. The difference
    cancels what a program costs once (dispatch, the GPU's clock ramp after idle host work,
    output allocation)."""
    many, n = jax.jit(_chained(fn)), len(sets) // 2

    def timed(part):
        t0 = time.perf_counter()
        jax.block_until_ready(many(part, s0))
        return time.perf_counter() - t0

    timed(sets[:n]), timed(sets)  # compile both programs and warm up
    once, twice = [], []
    for _ in range(rounds):
        once.append(timed(sets[:n]))
        twice.append(timed(sets))
    return (statistics.median(twice) - statistics.median(once)) / n * 1e6


def wall_us(fn, args, s0, calls=10):
    """Median wall time (us) of single jitted calls, dispatch included."""
    one = jax.jit(fn)
    jax.block_until_ready(one(args, s0))
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(one(args, s0))
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls) * 1e6


def time_ours(fn, args, s0, reps, wall=True, rounds=5):
    """fn(args, state) -> (o, state). Returns (device us per call, wall us per single call).

    Device time per call is marginal (`marginal_us`: programs of reps and of 2 * reps calls);
    divided by a few reps, a program's fixed cost had doubled the per-call time of short
    programs. Every call reads its own copy of `args`: with one set of inputs read by every
    call the chunked prefill came out 2-5x too fast on an H100 although XLA merged no kernels
    (RESULTS.md, run BJ). (Not a while loop: on the GPU each of its iterations waits for the
    host to read the predicate.) Arrays go in as arguments (closing over them would make XLA
    constant-fold the wrapper)."""
    copies = [jax.tree.map(jnp.copy, args) for _ in range(2 * reps)]
    dev = marginal_us(fn, copies, s0, rounds)
    copies.clear()  # free the copies before the wall-time calls
    return dev, wall_us(fn, args, s0) if wall else float("nan")


def kernels_per_call(fn, args, s0, n=4):
    """Kernel custom-calls (the Pallas kernels) per call in the optimized program of n chained
    calls, {"shared": every call reads the same operands, "copies": each its own (as
    `time_ours`)}: a lower count with shared operands means XLA merged calls' kernels."""
    counts = {}
    for name in ("shared", "copies"):
        sets = [args if name == "shared" else jax.tree.map(jnp.copy, args) for _ in range(n)]
        hlo = jax.jit(_chained(fn)).lower(sets, s0).compile().as_text()
        counts[name] = sum(" custom-call(" in ln for ln in hlo.splitlines()) / n
    return counts


def timing_check(log, B=1, T=8192, reps=5, rounds=5):
    """One prefill case timed four ways, to tell what a timing method adds: the median wall
    time of single calls (with the dispatch), the marginal per-call time (`time_ours`) with
    every call on its own copy of the inputs and with all calls on the same inputs, and the
    prep kernel alone (copies), with the whole chunk's inverse and with it by halves."""
    from pallas_kernels.gated_delta_rule import chunk as ck

    q, k, v, g, beta, s0 = to_jax(*make_inputs(B, T))
    args = (q, k, v, g, beta)
    fn = lambda a, s: chunk_gated_delta_rule(  # noqa: E731
        *a, initial_state=s, use_qk_l2norm=True, interpret=DRY
    )

    def prep_only(a, s, split_inverse=False):
        q, k, v, g, beta = a
        C = ck._auto_chunk(B, HV, V, ChunkBlocks.block_v)  # as ChunkBlocks() picks
        gam = jnp.cumsum(g.transpose(0, 2, 1).reshape(B, HV, T // C, C), axis=-1)
        out = ck._prep(
            q,
            k,
            v,
            gam.reshape(B, HV, T),
            beta.transpose(0, 2, 1),
            R=HV // H,
            scale=K**-0.5,
            blocks=ChunkBlocks(chunk=C, split_inverse=split_inverse),
            l2norm=True,
            interpret=DRY,
        )
        return out[0], s

    copies = [jax.tree.map(jnp.copy, args) for _ in range(2 * reps)]
    log(f"timing check, prefill B={B} T={T}, us per call:")
    log(f"  single calls, wall time with dispatch: {wall_us(fn, args, s0):.1f}")
    log(f"  marginal, each call on its own inputs: {marginal_us(fn, copies, s0, rounds):.1f}")
    shared = marginal_us(fn, [args] * 2 * reps, s0, rounds)
    log(f"  marginal, all calls on the same inputs: {shared:.1f}")
    log(f"  prep kernel alone (own inputs): {marginal_us(prep_only, copies, s0, rounds):.1f}")
    halves = functools.partial(prep_only, split_inverse=True)
    log(f"  prep kernel alone, inverse by halves: {marginal_us(halves, copies, s0, rounds):.1f}")


def time_fla(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def prefill_floor_us(B, T, heads=(H, HV)):
    h, hv = heads
    nbytes = B * T * (2 * h * K * 2 + 2 * hv * V * 2 + 2 * hv * 4)  # q,k,v,o bf16; g,beta
    chunks = B * hv * T / 64
    flops = chunks * (
        2 * 64 * 64 * K * 2
        + 2 * 64 * 64 * 64 * 10
        + 2 * 64 * 64 * (K + V)
        + 3 * 2 * 64 * K * V
        + 2 * 64 * 64 * V
    )
    return max(nbytes / HBM_BPS, flops / MMA_FLOPS) * 1e6


def decode_floor_us(B):
    return 2 * B * HV * K * V * 4 / HBM_BPS * 1e6


def bench_prefill(B, T, rows, log, blocks_list, ref_check):
    np_in = make_inputs(B, T)
    q, k, v, g, beta, s0 = to_jax(*np_in)
    fla_us, o_fla = float("nan"), None
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        qt, kt, vt, gt, bt, st = to_torch(*np_in)
        f = lambda: fla_chunk(
            qt,
            kt,
            vt,
            gt,
            bt,
            initial_state=st,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        o_fla = torch_np(f()[0])
        fla_us = time_fla(f)
        log(f"  fla prefill B={B} T={T}: {fla_us:.1f} us")
        torch.cuda.empty_cache()
    except Exception:
        log(traceback.format_exc())
    best = None
    for blocks in blocks_list:
        try:
            fn = lambda a, s, blocks=blocks: chunk_gated_delta_rule(
                *a, initial_state=s, use_qk_l2norm=True, blocks=blocks, interpret=DRY
            )
            dev, wall = time_ours(fn, (q, k, v, g, beta), s0, reps=3, wall=len(blocks_list) == 1)
            log(f"  prefill B={B} T={T} {blocks}: dev {dev:.1f} us, call {wall:.1f} us")
            if best is None or dev < best[0]:
                best = (dev, wall, blocks)
        except Exception:
            log(f"  prefill B={B} T={T} {blocks}: FAILED\n" + traceback.format_exc())
    if best is None:
        rows.append(
            (
                f"prefill B={B} T={T}",
                float("nan"),
                float("nan"),
                fla_us,
                prefill_floor_us(B, T),
                "failed",
            )
        )
        return
    o, st_ours = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True, blocks=best[2], interpret=DRY
    )
    note = f"ns={best[2].num_segments} bv={best[2].block_v}"
    if o_fla is not None:
        note += f" | o vs fla {rel(o, o_fla):.1e}"
    if ref_check:
        o_r, s_r = jax.jit(
            lambda *a: chunk_gated_delta_rule_ref(*a[:5], initial_state=a[5], use_qk_l2norm=True)
        )(q, k, v, g, beta, s0)
        note += f" | vs fp32 ref: o {rel(o, o_r):.1e} state {rel(st_ours, s_r):.1e}"
        if o_fla is not None:
            note += f" (fla o {rel(o_fla, o_r):.1e})"
    rows.append((f"prefill B={B} T={T}", best[0], best[1], fla_us, prefill_floor_us(B, T), note))
    return best[2]


def bench_decode(B, T, rows, log, blocks_list):
    np_in = make_inputs(B, T, seed=1)
    q, k, v, g, beta, s0 = to_jax(*np_in)
    fla_us, o_fla = float("nan"), None
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_rec

        qt, kt, vt, gt, bt, st = to_torch(*np_in)
        # keywords: fla's fused_recurrent takes (q, k, v, g, gk, gv, beta, ...)
        f = lambda: fla_rec(
            qt,
            kt,
            vt,
            g=gt,
            beta=bt,
            initial_state=st,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        o_fla = torch_np(f()[0])
        fla_us = time_fla(f)
        log(f"  fla decode B={B} T={T}: {fla_us:.1f} us")
    except Exception:
        log(traceback.format_exc())
    best = None
    for blocks in blocks_list:
        try:
            fn = lambda a, s, blocks=blocks: fused_recurrent_gated_delta_rule(
                *a, initial_state=s, use_qk_l2norm=True, blocks=blocks, interpret=DRY
            )
            dev, wall = time_ours(fn, (q, k, v, g, beta), s0, reps=20, wall=B == 1)
            log(
                f"  decode B={B} T={T} {blocks}: dev {dev:.1f} us, call {wall:.1f} us, "
                f"{2 * B * HV * K * V * 4 / dev / 1e6:.2f} TB/s"
            )
            if best is None or dev < best[0]:
                best = (dev, wall, blocks)
        except Exception:
            log(f"  decode B={B} {blocks}: FAILED\n" + traceback.format_exc())
    if best is None:
        rows.append(
            (
                f"decode B={B} T={T}",
                float("nan"),
                float("nan"),
                fla_us,
                decode_floor_us(B),
                "failed",
            )
        )
        return
    o, s = fused_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True, blocks=best[2], interpret=DRY
    )
    o_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True)
    tbs = 2 * B * HV * K * V * 4 / best[0] / 1e6
    note = f"bv={best[2].block_v} {tbs:.2f} TB/s (fla {2 * B * HV * K * V * 4 / fla_us / 1e6:.2f})"
    if o_fla is not None:
        note += f" | o vs fla {rel(o, o_fla):.1e}"
    note += f" | vs fp32 ref: o {rel(o, o_r):.1e} state {rel(s, s_r):.1e}"
    rows.append((f"decode B={B} T={T}", best[0], best[1], fla_us, decode_floor_us(B), note))
    return best[2]


def bench_conv(B, T, rows, log):
    """Our conv kernel vs the jitted jnp reference (XLA fuses it), conv_dim 8192, W=4, bf16."""
    from pallas_kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update

    Cc = 64 if DRY else 8192
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((B, T, Cc)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((4, Cc)), jnp.bfloat16)
    s0 = jnp.asarray(rng.standard_normal((B, 3, Cc)), jnp.bfloat16)
    ours = causal_conv1d_update if T <= 8 else causal_conv1d
    try:
        fo = lambda a, s: ours(a, w, s, interpret=DRY)
        fr = lambda a, s: causal_conv1d_ref(a, w, s)
        # Each call must differ from the last (else XLA merges the identical pure calls), and the
        # whole of y must be used (else XLA computes only the element that is read).
        chain = lambda f: (
            lambda a, s: (lambda y, st: (y, (st + y[:, -3:].astype(st.dtype)).astype(st.dtype)))(
                *f(a[0] + s[:, :1], s)
            )
        )
        sumy = lambda f: (
            lambda a, s: (lambda y, st: (jnp.sum(y, axis=1, keepdims=True), st))(*chain(f)(a, s))
        )
        dev, _ = time_ours(sumy(fo), (x,), s0, reps=10, wall=False)
        ref, _ = time_ours(sumy(fr), (x,), s0, reps=10, wall=False)
        err = rel(fo(x, s0)[0], np.asarray(fr(x, s0)[0], np.float32))
        floor = 2 * x.size * 2 / HBM_BPS * 1e6
        rows.append(
            (
                f"conv1d B={B} T={T} (vs XLA jnp)",
                dev,
                float("nan"),
                ref,
                floor,
                f"rel err vs ref {err:.1e}; 'fla' column = XLA reference",
            )
        )
    except Exception:
        log(f"  conv B={B} T={T}: FAILED\n" + traceback.format_exc())


def prefill_sweep(log, configs=None, cases=None, reps=3, rounds=5):
    """Every block config on every prefill case (default: the three targets, and one GPU's
    heads at tensor parallelism 2: 8 q/k, 16 v heads), fla beside, outputs checked against the
    first config. Prints one table of us per call (median of `rounds` programs of `reps`)."""
    cases = cases or [
        (1, 8192, (H, HV)),
        (1, 32768, (H, HV)),
        (4, 8192, (H, HV)),
        (1, 8192, (H // 2, HV // 2)),
    ]
    configs = configs or [
        ChunkBlocks(),
        ChunkBlocks(split_inverse=True),
        ChunkBlocks(block_v=128, state_warps=8),
        ChunkBlocks(block_v=128, state_warps=8, split_inverse=True),
        ChunkBlocks(chunk=64),
        ChunkBlocks(chunk=32),
        ChunkBlocks(chunk=32, split_inverse=True),
    ]
    if DRY:
        cases = [(1, 256, (H, HV)), (1, 256, (H // 2, HV // 2))]
        configs = [ChunkBlocks(block_v=16), ChunkBlocks(block_v=16, chunk=32)]
    table = {}
    for B, T, heads in cases:
        name = f"B={B} T={T} H={heads[0]} HV={heads[1]}"
        np_in = make_inputs(B, T, heads=heads)
        q, k, v, g, beta, s0 = to_jax(*np_in)
        fn0 = lambda a, s: chunk_gated_delta_rule(  # noqa: E731
            *a, initial_state=s, use_qk_l2norm=True, blocks=configs[0], interpret=DRY
        )
        log(f"  {name} kernels per call: {kernels_per_call(fn0, (q, k, v, g, beta), s0)}")
        fla_us = float("nan")
        try:
            import torch
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

            ta = to_torch(*np_in)
            fla_us = time_fla(
                lambda ta=ta: fla_chunk(
                    *ta[:5],
                    initial_state=ta[5],
                    output_final_state=True,
                    use_qk_l2norm_in_kernel=True,
                )
            )
            log(f"  fla {name}: {fla_us:.1f} us")
            del ta
            torch.cuda.empty_cache()
        except Exception:
            log(traceback.format_exc())
        row = {"fla": fla_us, "floor": prefill_floor_us(B, T, heads)}
        o_first = None
        for blocks in configs:
            b = blocks
            label = f"C={b.chunk or 'auto'} bv={b.block_v} pw={b.prep_warps} sw={b.state_warps}"
            label += f" st={b.num_stages}"
            label += " o apart" if b.o_apart else ""
            label += " split inverse" if b.split_inverse else ""
            label += f" ns={b.num_segments}" if b.num_segments else ""
            try:
                fn = lambda a, s, blocks=blocks: chunk_gated_delta_rule(
                    *a, initial_state=s, use_qk_l2norm=True, blocks=blocks, interpret=DRY
                )
                dev, _ = time_ours(fn, (q, k, v, g, beta), s0, reps=reps, wall=False, rounds=rounds)
                o, _ = fn((q, k, v, g, beta), s0)
                if o_first is None:
                    o_first = np.asarray(o, np.float32)
                err = rel(o, o_first)
                row[label] = dev
                log(f"  {name} {label}: {dev:.1f} us (o vs first config {err:.1e})")
                if err > 2e-2:
                    row[label] = float("nan")
                    log(f"  {name} {label}: output differs from the first config's, dropped")
            except Exception:
                log(f"  {name} {label}: FAILED\n" + traceback.format_exc())
                row[label] = float("nan")
        table[name] = row
    labels = list(next(iter(table.values())).keys())
    log("\n| us per call | " + " | ".join(table) + " |")
    log("|---" * (len(table) + 1) + "|")
    for lab in labels:
        cells = []
        for row in table.values():
            x = row.get(lab, float("nan"))
            ratio = "" if lab in ("fla", "floor") else f" ({x / row['fla']:.2f})"
            cells.append(f"{x:.1f}{ratio}")
        log(f"| {lab} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="try several block configs per case")
    ap.add_argument("--quick", action="store_true", help="T=8192 prefill and decode B=1, 64 only")
    ap.add_argument(
        "--prefill-sweep",
        action="store_true",
        help="only the prefill cases, every block config in one table (ratio to fla)",
    )
    ap.add_argument(
        "--configs",
        nargs="*",
        default=[],
        help="sweep configs chunk,block_v,state_warps,stages[,o_apart 0/1[,segments (0: auto)"
        "[,prep_warps (0: default)[,split_inverse 0/1]]]]",
    )
    ap.add_argument("--cases", nargs="*", default=[], help="sweep cases BxTxH (HV = 2H)")
    ap.add_argument("--reps", type=int, default=3, help="sweep: calls per timed program")
    ap.add_argument("--rounds", type=int, default=5, help="sweep: timed programs (median)")
    ap.add_argument(
        "--timing-check",
        action="store_true",
        help="one prefill case timed with shared and with copied inputs, and its prep alone "
        "(whole-chunk inverse and by halves)",
    )
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    logf = open(args.log, "w") if args.log else None

    def log(msg):
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    log(f"jax {jax.__version__} devices {jax.devices()}")
    try:
        import fla
        import torch

        log(f"torch {torch.__version__} fla {fla.__version__}")
    except Exception:
        log("fla not importable:\n" + traceback.format_exc())
    if args.timing_check:
        timing_check(log, T=256 if DRY else 8192)
        return
    if args.prefill_sweep:
        configs = [
            ChunkBlocks(
                chunk=c,
                block_v=bv,
                state_warps=sw,
                num_stages=st,
                o_apart=bool(ap),
                num_segments=ns or None,
                prep_warps=pw or ChunkBlocks.prep_warps,
                split_inverse=bool(si),
            )
            for c, bv, sw, st, ap, ns, pw, si in (
                [*map(int, x.split(",")), 0, 0, 0, 0][:8] for x in args.configs
            )
        ]
        cases = [(b, t, (h, 2 * h)) for b, t, h in (map(int, x.split("x")) for x in args.cases)]
        prefill_sweep(log, configs, cases, args.reps, args.rounds)
        return
    rows = []
    R = dataclasses.replace
    if args.sweep:  # tuned on the first case of each kind, then reused
        pre = [
            ChunkBlocks(),
            ChunkBlocks(split_inverse=True),
            ChunkBlocks(num_segments=2),
            ChunkBlocks(o_apart=True),
        ]
        dec1 = [DecodeBlocks(block_v=32), DecodeBlocks(block_v=16, num_warps=2)]
        dec = [
            DecodeBlocks(block_v=bv, num_warps=w)
            for bv, w in ((32, 4), (64, 4), (128, 8), (128, 4))
        ]
    else:
        pre, dec1, dec = [ChunkBlocks()], [DecodeBlocks()], [DecodeBlocks()]
    if DRY:
        pre = [ChunkBlocks(block_v=16, num_segments=n) for n in (1, 2)]
        dec1 = dec = [DecodeBlocks(block_v=16)]
    T0 = 256 if DRY else 8192
    best = bench_prefill(1, T0, rows, log, pre, ref_check=True) or ChunkBlocks()
    if not args.quick:
        ns = best.num_segments or 1
        bench_prefill(1, 4 * T0, rows, log, [best, R(best, num_segments=2 * ns)], ref_check=True)
        bench_prefill(4, T0, rows, log, [R(best, num_segments=None)], ref_check=True)
    bench_decode(1, 1, rows, log, dec1)
    best = bench_decode(64, 1, rows, log, dec) or DecodeBlocks()
    if not args.quick:
        bench_decode(256, 1, rows, log, [best])
        bench_decode(64, 4, rows, log, [best])  # speculative verify: 4 tokens per sequence
    bench_conv(1, 256 if DRY else 8192, rows, log)
    bench_conv(64, 1, rows, log)
    log("\n| case | ours dev (us) | ours call (us) | fla (us) | ours/fla | floor (us) | notes |")
    log("|---|---|---|---|---|---|---|")
    for name, dev, wall, fla_us, floor, note in rows:
        log(
            f"| {name} | {dev:.1f} | {wall:.1f} | {fla_us:.1f} | {dev / fla_us:.2f} | "
            f"{floor:.1f} | {note} |"
        )


if __name__ == "__main__":
    main()
