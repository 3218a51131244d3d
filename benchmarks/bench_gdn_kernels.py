"""Gated delta rule kernels on the GPU: ours (Pallas) vs fla 0.6.0 (Triton), same inputs, one run.

Qwen3-Next shape: H=16 q/k heads, HV=32 value heads, K=V=128, bf16 in, fp32 state, q/k l2-normed
in the kernel. Prints, per case: ours, fla, ours/fla, and the hardware floor; and the relative
error of our output against fla's and against the fp32 reference.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_gdn_kernels.py [--sweep] [--quick]

Timing. fla: triton.testing.do_bench median (as the anchors in shared/spec/anchors.md).
Ours: "dev" = per-call device time, from one jitted program that runs the kernel `reps` times
back to back (state carried from call to call, so nothing is hoisted), divided by reps: what a
model step sees. "call" = median wall time of single jitted calls with block_until_ready, which
adds ~tens of us of host dispatch (jax) that do_bench does not count for fla's launches either.
"""

from __future__ import annotations

import argparse
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


def make_inputs(B, T, seed=0):
    """numpy fp32 inputs; callers cast to bf16 in their framework."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K), np.float32)
    k = rng.standard_normal((B, T, H, K), np.float32)
    v = rng.standard_normal((B, T, HV, V), np.float32)
    g = np.log(1 / (1 + np.exp(-rng.standard_normal((B, T, HV), np.float32)))) / 16  # logsigmoid
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, HV), np.float32)))
    s0 = 0.1 * rng.standard_normal((B, HV, K, V), np.float32)
    return q, k, v, g.astype(np.float32), beta.astype(np.float32), s0


def to_jax(q, k, v, g, beta, s0):
    bf = jnp.bfloat16
    return (jnp.asarray(q, bf), jnp.asarray(k, bf), jnp.asarray(v, bf), jnp.asarray(g),
            jnp.asarray(beta, bf), jnp.asarray(s0))


def to_torch(q, k, v, g, beta, s0):
    import torch

    r = HV // H  # fla measured with q/k repeated to the value heads (as in anchors.md)
    t = lambda x, dt: torch.from_numpy(x).to("cuda", dt)
    qt = t(q, torch.bfloat16).repeat_interleave(r, dim=2).contiguous()
    kt = t(k, torch.bfloat16).repeat_interleave(r, dim=2).contiguous()
    return (qt, kt, t(v, torch.bfloat16), t(g, torch.float32), t(beta, torch.bfloat16),
            t(s0, torch.float32))


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def torch_np(x):
    return x.float().cpu().numpy()


def time_ours(fn, s0, reps):
    """fn(state) -> (o, state). Returns (device us per call, wall us per single call)."""

    @jax.jit
    def many(s):
        acc = jnp.float32(0)
        for _ in range(reps):
            o, s = fn(s)
            acc = acc + o[0, 0, 0, 0].astype(jnp.float32)
        return acc, s

    one = jax.jit(fn)
    jax.block_until_ready(many(s0))
    jax.block_until_ready(one(s0))
    dev = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(many(s0))
        dev.append((time.perf_counter() - t0) / reps)
    wall = []
    for _ in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(one(s0))
        wall.append(time.perf_counter() - t0)
    return statistics.median(dev) * 1e6, statistics.median(wall) * 1e6


def time_fla(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def prefill_floor_us(B, T):
    nbytes = B * T * (2 * H * K * 2 + 2 * HV * V * 2 + 2 * HV * 4)  # q,k,v,o bf16; g,beta
    chunks = B * HV * T / 64
    flops = chunks * (2 * 64 * 64 * K * 2 + 2 * 64 * 64 * 64 * 10 + 2 * 64 * 64 * (K + V)
                      + 3 * 2 * 64 * K * V + 2 * 64 * 64 * V)
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
        f = lambda: fla_chunk(qt, kt, vt, gt, bt, initial_state=st, output_final_state=True,
                              use_qk_l2norm_in_kernel=True)
        o_fla = torch_np(f()[0])
        fla_us = time_fla(f)
        del qt, kt, vt
        torch.cuda.empty_cache()
    except Exception:
        log(traceback.format_exc())
    best = None
    for blocks in blocks_list:
        try:
            fn = lambda s, blocks=blocks: chunk_gated_delta_rule(
                q, k, v, g, beta, initial_state=s, use_qk_l2norm=True, blocks=blocks, interpret=DRY)
            dev, wall = time_ours(fn, s0, reps=5)
            log(f"  prefill B={B} T={T} {blocks}: dev {dev:.1f} us, call {wall:.1f} us")
            if best is None or dev < best[0]:
                best = (dev, wall, blocks)
        except Exception:
            log(f"  prefill B={B} T={T} {blocks}: FAILED\n" + traceback.format_exc())
    if best is None:
        rows.append((f"prefill B={B} T={T}", float("nan"), float("nan"), fla_us,
                     prefill_floor_us(B, T), "failed"))
        return
    o, st_ours = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True,
                                        blocks=best[2], interpret=DRY)
    note = f"ns={best[2].num_segments} bv={best[2].block_v}"
    if o_fla is not None:
        note += f" | o vs fla {rel(o, o_fla):.1e}"
    if ref_check:
        o_r, s_r = jax.jit(lambda: chunk_gated_delta_rule_ref(
            q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True))()
        note += f" | vs fp32 ref: o {rel(o, o_r):.1e} state {rel(st_ours, s_r):.1e}"
        if o_fla is not None:
            note += f" (fla o {rel(o_fla, o_r):.1e})"
    rows.append((f"prefill B={B} T={T}", best[0], best[1], fla_us, prefill_floor_us(B, T), note))


def bench_decode(B, T, rows, log, blocks_list):
    np_in = make_inputs(B, T, seed=1)
    q, k, v, g, beta, s0 = to_jax(*np_in)
    fla_us, o_fla = float("nan"), None
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_rec

        qt, kt, vt, gt, bt, st = to_torch(*np_in)
        f = lambda: fla_rec(qt, kt, vt, gt, bt, initial_state=st, output_final_state=True,
                            use_qk_l2norm_in_kernel=True)
        o_fla = torch_np(f()[0])
        fla_us = time_fla(f)
    except Exception:
        log(traceback.format_exc())
    best = None
    for blocks in blocks_list:
        try:
            fn = lambda s, blocks=blocks: fused_recurrent_gated_delta_rule(
                q, k, v, g, beta, initial_state=s, use_qk_l2norm=True, blocks=blocks, interpret=DRY)
            dev, wall = time_ours(fn, s0, reps=20)
            log(f"  decode B={B} T={T} {blocks}: dev {dev:.1f} us, call {wall:.1f} us, "
                f"{2 * B * HV * K * V * 4 / dev / 1e6:.2f} TB/s")
            if best is None or dev < best[0]:
                best = (dev, wall, blocks)
        except Exception:
            log(f"  decode B={B} {blocks}: FAILED\n" + traceback.format_exc())
    if best is None:
        rows.append((f"decode B={B} T={T}", float("nan"), float("nan"), fla_us,
                     decode_floor_us(B), "failed"))
        return
    o, s = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0,
                                            use_qk_l2norm=True, blocks=best[2], interpret=DRY)
    o_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True)
    tbs = 2 * B * HV * K * V * 4 / best[0] / 1e6
    note = f"bv={best[2].block_v} {tbs:.2f} TB/s (fla {2 * B * HV * K * V * 4 / fla_us / 1e6:.2f})"
    if o_fla is not None:
        note += f" | o vs fla {rel(o, o_fla):.1e}"
    note += f" | vs fp32 ref: o {rel(o, o_r):.1e} state {rel(s, s_r):.1e}"
    rows.append((f"decode B={B} T={T}", best[0], best[1], fla_us, decode_floor_us(B), note))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="try several block configs per case")
    ap.add_argument("--quick", action="store_true", help="T=8192 prefill and decode B=1, 64 only")
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
    rows = []
    if args.sweep:
        pre = [ChunkBlocks(num_segments=ns, block_v=bv) for bv in (64, 32) for ns in (1, 2, 4, 8)]
        dec = [DecodeBlocks(block_v=bv) for bv in (16, 32, 64)]
        if DRY:
            pre, dec = [ChunkBlocks(block_v=16, num_segments=n) for n in (1, 2)], dec[:1]
    else:
        pre, dec = [ChunkBlocks()], [DecodeBlocks()]
    cases = [(1, 8192)] if args.quick else [(1, 8192), (1, 32768), (4, 8192)]
    if DRY:
        cases = [(1, 256)]
    for B, T in cases:
        bench_prefill(B, T, rows, log, pre, ref_check=True)
    for B in (1, 64) if args.quick else (1, 64, 256):
        bench_decode(B, 1, rows, log, dec)
    log("\n| case | ours dev (us) | ours call (us) | fla (us) | ours/fla | floor (us) | notes |")
    log("|---|---|---|---|---|---|---|")
    for name, dev, wall, fla_us, floor, note in rows:
        log(f"| {name} | {dev:.1f} | {wall:.1f} | {fla_us:.1f} | {dev / fla_us:.2f} | "
            f"{floor:.1f} | {note} |")


if __name__ == "__main__":
    main()
