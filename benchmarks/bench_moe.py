"""Routed experts of one MoE layer on the GPU: the grouped Pallas kernels vs the XLA paths, on
the 80B geometry (D=2048, F=512, k=10), bf16, random top-k routing.

  python benchmarks/bench_moe.py [--sweep]       # on the GPU
  python benchmarks/bench_moe.py --dry-run       # tiny shapes, interpret mode, on the CPU

Cases: decode (N = 1 / 16 / 64 tokens, E = 512: the Pallas GEMV vs XLA's gather of the touched
experts) and prefill (N = 1K / 8K tokens with E = 256 experts on this device, the other half of
the ids held by another device as under 2-way expert parallelism; and N = 16K with all 512,
one GPU: the Pallas grouped GEMM vs the capacity-padded XLA grouped matmul). Floors: decode,
the touched experts' bytes at 4.3 TB/s; prefill, the expert FLOPs of the local pairs at the
XLA bf16 matmul ceiling, 770 TFLOP/s (shared/spec/anchors.md). Times: the median of `reps`
calls of one jitted program that runs the layer `inner` times back to back (so host dispatch
is amortised), per call. --sweep times a few prefill block shapes at N = 8K; --rows-sweep
the decode row paths (grouped with results gathered back or stored by pair,
MoEBlocks.y_by_pair; or a tile per pair, MoEBlocks.pair_tiles) at N = 1-16 over a stack of
layers; --prefill-rows the prefill row paths (MoEBlocks.x_by_token, prefill_y_by_pair);
--route-sweep the router's top-k kernel per warp count against XLA; --decode-sweep the decode
kernels' block shapes, split_d, gate and up apart (gate_up_apart) and
down's pipeline depth at N = 1 and 8, with all 512
experts on this device and with half of them (the other half's ids held elsewhere, as under
2-way expert parallelism: ~5 of one token's 10 experts are local).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    HBM_BPS,
    MATMUL_FLOPS,
    dataclass_changes,
    time_chained,
    time_layer_walk,
)

from pallas_kernels.moe import (  # noqa: E402
    PREFILL_BLOCKS,
    MoEBlocks,
    moe_experts_decode,
    moe_experts_decode_ref,
    moe_experts_prefill,
    route_topk,
    route_topk_ref,
)
from qnext_jax import ops  # noqa: E402


def inputs(N, E_all, E_here, D, F, k, seed=0):
    """x [N, D] bf16; experts [N, k]: top-k of random logits over E_all, ids >= E_here set to
    E_here (another device's); weights [E_here, D, 2F], [E_here, F, D] bf16."""
    key = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(key[0], (N, D), jnp.bfloat16)
    _, ids = jax.lax.top_k(jax.random.normal(key[1], (N, E_all)), k)
    ids = jnp.where(ids < E_here, ids, E_here).astype(jnp.int32)
    w_gu = (jax.random.normal(key[2], (E_here, D, 2 * F)) * D**-0.5).astype(jnp.bfloat16)
    w_d = (jax.random.normal(key[3], (E_here, F, D)) * F**-0.5).astype(jnp.bfloat16)
    return x, ids, w_gu, w_d


def time_per_call(fn, args, inner: int, reps: int, unroll: bool = False) -> float:
    """Seconds per call of fn(*args), chained through x (common.time_chained)."""
    feed = lambda x, h: x + (jnp.sum(h, axis=1) * 1e-30).astype(x.dtype)
    return time_chained(fn, args, feed, inner, reps, unroll)


def layer_stack(L, E_all, E_here, D, F, k, seed=0):
    """L layers' routing ids (top-k of random logits over E_all, ids >= E_here another
    device's) for 64 tokens, [L, 64, k], and weight stacks [L, E_here, D, 2F], [L, E_here, F, D]
    bf16, made one layer at a time in bf16."""
    keys = jax.random.split(jax.random.key(seed), 3 * L).reshape(L, 3)
    _, ids = jax.lax.top_k(jax.random.normal(keys[0, 0], (L, 64, E_all)), k)
    ids = jnp.where(ids < E_here, ids, E_here).astype(jnp.int32)
    w_gu = jnp.stack([jax.random.normal(kk[1], (E_here, D, 2 * F), jnp.bfloat16) for kk in keys])
    w_d = jnp.stack([jax.random.normal(kk[2], (E_here, F, D), jnp.bfloat16) for kk in keys])
    return ids, w_gu * D**-0.5, w_d * F**-0.5


def time_layers(fn, N, ids, w_gu, w_d, reps: int, passes: int = 4) -> float:
    """Seconds per layer of fn(x, ids[l, :N], w_gu, w_d, l) walking the L layers of the stacks
    (`common.time_layer_walk`): each call reads other experts than the last (a loop over one
    layer's experts would find them in L2 at small N)."""

    def step(x, layer, ids, w_gu, w_d):
        h = fn(x, ids[layer, :N], w_gu, w_d, jnp.int32(layer))
        return x + (jnp.sum(h, axis=1) * 1e-30).astype(x.dtype)

    x = jax.random.normal(jax.random.key(1), (N, w_gu.shape[2]), jnp.bfloat16)
    return time_layer_walk(step, x, (ids, w_gu, w_d), w_gu.shape[0], passes, max(reps, 15))


def grouped_xla(x, experts, w_gu, w_d):
    E = w_gu.shape[0]
    ids = jnp.where((experts >= 0) & (experts < E), experts, E)
    return ops._expert_grouped(x, ids, w_gu, w_d)


def gather_xla(x, experts, w_gu, w_d):
    return ops._expert_gather(x, jnp.clip(experts, 0, w_gu.shape[0] - 1), w_gu, w_d)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--rows-sweep",
        action="store_true",
        help="decode: grouped (results gathered back or stored by pair) or a tile per pair",
    )
    ap.add_argument(
        "--decode-sweep",
        action="store_true",
        help="decode: block shapes and split_d at N = 1 / 8, E = 512 and 256 of 512 local",
    )
    ap.add_argument(
        "--batch-sweep",
        action="store_true",
        help="decode: rows per tile and down's blocks at N = 32 / 64 (grouped batches)",
    )
    ap.add_argument(
        "--prefill-rows",
        action="store_true",
        help="prefill: x read by token or copied, results stored by pair or gathered back",
    )
    ap.add_argument(
        "--prefill-down-sweep",
        action="store_true",
        help="prefill: down's blocks (block_dout, block_fin) and the results' dtype at N = 8K",
    )
    ap.add_argument(
        "--route-sweep",
        action="store_true",
        help="the router's top-k at N = 1 / 8 / 64: the kernel's warps vs XLA's softmax + top_k",
    )
    ap.add_argument(
        "--blocks",
        nargs="+",
        default=None,
        help="--decode-sweep / --batch-sweep: these MoEBlocks changes instead of the built-in "
        "grid ('default' or key=value,..., e.g. gate_up_apart=1,down_stages=2)",
    )
    ap.add_argument("--sweeps-only", action="store_true", help="skip the table of default cases")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    dry = args.dry_run
    D, F, k, E = (64, 32, 4, 16) if dry else (2048, 512, 10, 512)
    interp = dict(interpret=dry)
    small = dict(block_f=16, block_d=32, block_dout=32, block_fin=16) if dry else {}
    dec_blocks = dataclasses.replace(MoEBlocks(), **small)
    pre_blocks = dataclasses.replace(PREFILL_BLOCKS, **small, **({"block_m": 16} if dry else {}))
    decode = functools.partial(moe_experts_decode, blocks=dec_blocks, **interp)
    prefill = functools.partial(moe_experts_prefill, blocks=pre_blocks, **interp)
    inner = 1 if dry else 10
    reps = 1 if dry else args.reps
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)

    def block_sweep(title, grid, cases):
        """us per layer of each MoEBlocks change in `grid` on each (tokens, local experts)."""
        L = 2 if dry else 8
        stacks = {e: layer_stack(L, E, e, D, F, k) for e in {e for _, e in cases}}
        print(f"\n{title}, us per layer ({L} layers' experts, each its own ids):")
        print("| blocks | " + " | ".join(f"N={n}, {e}/{E} local" for n, e in cases) + " |")
        print("|---|" + "---|" * len(cases))
        if args.blocks:
            grid = [dataclass_changes(spec, dec_blocks) for spec in args.blocks]
        for g in grid:
            b = dataclasses.replace(dec_blocks, **g)
            fn = functools.partial(moe_experts_decode, blocks=b, **interp)
            line = []
            for N, E_here in cases:
                try:
                    t = time_layers(fn, N, *stacks[E_here], reps)
                    line.append(f"{t * 1e6:.1f}")
                except Exception as e:  # a shape the compiler rejects (shared memory, ...)
                    line.append(f"failed ({type(e).__name__})")
            print(f"| {g or 'defaults'} | " + " | ".join(line) + " |", flush=True)

    rows = []
    # decode: the touched experts' bytes are the floor
    for N in () if args.sweeps_only else (1, 4) if dry else (1, 16, 64):
        a = inputs(N, E, E, D, F, k)
        touched = len(np.unique(np.asarray(a[1])))
        floor = touched * 3 * D * F * 2 / HBM_BPS
        ours = time_per_call(decode, a, inner, reps)
        xla = time_per_call(gather_xla, a, inner, reps)
        err = float(jnp.max(jnp.abs(decode(*a) - moe_experts_decode_ref(*a))))
        rows.append((f"decode N={N} E={E}", ours, "XLA gather", xla, floor, err))
        print(rows[-1], flush=True)
    # prefill: the local pairs' FLOPs at the matmul ceiling are the floor
    cases = [(64, E, E // 2), (200, E, E)] if dry else [(1024, E, E // 2), (8192, E, E // 2),
                                                       (16384, E, E)]  # fmt: skip
    for N, E_all, E_here in () if args.sweeps_only else cases:
        a = inputs(N, E_all, E_here, D, F, k)
        pairs = int(jnp.sum(a[1] < E_here))
        floor = pairs * 3 * D * F * 2 / MATMUL_FLOPS
        ours = time_per_call(prefill, a, inner, reps)
        xla = time_per_call(grouped_xla, a, inner, reps)
        # against the reference on the first 64 tokens (it gathers [N, k, D, 2F] of weights)
        h = prefill(*a)[:64]
        ref = moe_experts_decode_ref(a[0][:64], a[1][:64], *a[2:])
        err = float(jnp.max(jnp.abs(h - ref)) / jnp.max(jnp.abs(ref)))
        rows.append((f"prefill N={N} E={E_here}/{E_all}", ours, "XLA grouped", xla, floor, err))
        print(rows[-1], flush=True)

    if args.rows_sweep:
        L = 2 if dry else 8
        print(f"\ndecode row paths, us per layer ({L} layers' experts, each its own ids):")
        paths = [
            ("grouped, gathered", dict(y_by_pair=(0, 0), pair_tiles=0)),
            ("grouped, stored by pair", dict(y_by_pair=(1, 64), pair_tiles=0)),
            ("a tile per pair", dict(pair_tiles=64)),
        ]
        print("| tokens, local experts | " + " | ".join(p[0] for p in paths) + " |")
        print("|---|" + "---|" * len(paths))
        for E_here in (E // 2, E):
            stack = layer_stack(L, E, E_here, D, F, k)
            for N in (1, 4) if dry else (1, 2, 4, 8, 16):
                line = []
                for _, change in paths:
                    b = dataclasses.replace(dec_blocks, **change)
                    fn = functools.partial(moe_experts_decode, blocks=b, **interp)
                    line.append(f"{time_layers(fn, N, *stack, reps) * 1e6:.1f}")
                print(f"| N={N}, {E_here}/{E} | " + " | ".join(line) + " |", flush=True)
            del stack

    if args.decode_sweep:
        grid = [
            {},
            dict(split_d=2),
            dict(split_d=4),
            dict(block_f=32),
            dict(block_f=32, split_d=2),
            dict(block_f=128),
            dict(block_f=128, num_warps=8),
            dict(block_f=128, split_d=2),
            dict(block_f=128, split_d=4, num_warps=8),
            dict(block_f=256, block_d=64, split_d=4, num_warps=8),
            dict(block_f=512, block_d=32, split_d=8, num_warps=8),
            dict(block_f=512, block_d=16, split_d=16, num_warps=8, num_stages=3),
            dict(block_dout=64),
            dict(block_dout=32),
            dict(block_dout=256, num_warps=8),
            dict(block_fin=256, block_dout=64),
            dict(num_stages=3),
            dict(num_stages=5),
            dict(num_warps=8),
            dict(down_stages=2),
            dict(down_stages=3),
            dict(down_stages=2, down_warps=8),
            dict(gate_up_apart=True),
            dict(gate_up_apart=True, down_stages=2),
            dict(gate_up_apart=True, down_stages=3),
            dict(gate_up_apart=True, down_stages=2, block_dout=64),
            dict(gate_up_apart=True, num_stages=3, down_stages=2),
            dict(gate_up_apart=True, split_d=2, down_stages=2),
        ]
        if dry:
            grid = [{}, dict(split_d=2), dict(gate_up_apart=True, down_stages=2)]
        cases = [(1, E), (1, E // 2), (8, E // 2)] if not dry else [(1, E), (1, E // 2)]
        block_sweep("decode block sweep", grid, cases)

    if args.route_sweep:
        print(f"\nrouter top-k (E={E}, k={k}), us per call (unrolled chain of {inner}):")
        warps = (1, 2, 4, 8)
        print("| tokens | XLA | " + " | ".join(f"kernel, {w} warps" for w in warps) + " |")
        print("|---|---|" + "---|" * len(warps))
        feed = lambda x, out: x + (jnp.sum(out[0]) * 1e-30).astype(x.dtype)  # noqa: E731
        for N in (1, 4) if dry else (1, 8, 64):
            logits = jax.random.normal(jax.random.key(N), (N, E), jnp.float32)
            fns = [functools.partial(route_topk_ref, k=k, normalize=True)] + [
                functools.partial(route_topk, k=k, normalize=True, num_warps=w, **interp)
                for w in warps
            ]
            line = [time_chained(f, (logits,), feed, inner, reps, unroll=True) for f in fns]
            print(f"| {N} | " + " | ".join(f"{t * 1e6:.2f}" for t in line) + " |", flush=True)

    if args.batch_sweep:
        r16 = dict(decode_tile_rows=16)
        grid = [
            {},
            dict(decode_tile_rows=32),
            r16,
            dict(r16, block_dout=256),
            dict(r16, block_dout=256, num_warps=8),
            dict(r16, block_dout=512, block_fin=32),
            dict(r16, block_dout=512, block_fin=64, num_warps=8),
            dict(r16, block_fin=64),
            dict(r16, block_f=128),
            dict(r16, num_stages=5),
            dict(r16, block_dout=256, block_fin=64, block_f=128),
            dict(decode_tile_rows=32, block_dout=256),
            dict(y_by_pair=(2, 8)),
            dict(x_by_token=True),
            dict(block_f=128),
        ]
        cases = [(64, E), (64, E // 2), (32, E // 2)]
        if dry:
            grid = [{}, dict(decode_tile_rows=16, block_dout=64)]
            cases = [(20, E), (20, E // 2)]
        block_sweep("grouped decode sweep", grid, cases)

    if args.prefill_rows:
        print("\nprefill row paths, ms per call (x: grouped copy or read by token; results:"
              " gathered back or stored by pair):")  # fmt: skip
        paths = [
            ("copy, gathered", False, False),
            ("by token, gathered", True, False),
            ("copy, by pair", False, True),
            ("by token, by pair", True, True),
        ]
        print("| case | " + " | ".join(p[0] for p in paths) + " |")
        print("|---|" + "---|" * len(paths))
        cases = [(64, E, E // 2)] if dry else [(1024, E, E // 2), (8192, E, E // 2), (16384, E, E)]
        for N, E_all, E_here in cases:
            a = inputs(N, E_all, E_here, D, F, k)
            line = []
            for _, by_token, by_pair in paths:
                b = dataclasses.replace(pre_blocks, x_by_token=by_token, prefill_y_by_pair=by_pair)
                fn = functools.partial(moe_experts_prefill, blocks=b, **interp)
                line.append(f"{time_per_call(fn, a, inner, max(reps, 7)) * 1e3:.3f}")
            print(f"| N={N}, {E_here}/{E_all} local | " + " | ".join(line) + " |", flush=True)

    if args.prefill_down_sweep:
        # down only changes with block_dout / block_fin (gate_up keeps its blocks); warps and
        # stages apply to both kernels. The results in bf16, as the model stores them, except
        # the one fp32 row (the kernel's default).
        N = 64 if dry else 8192
        a = inputs(N, E, E // 2, D, F, k)
        grid = (
            [dict(block_dout=16), dict(block_fin=32)]
            if dry
            else [
                dict(),
                dict(block_fin=32),
                dict(block_fin=128),
                dict(block_dout=64),
                dict(block_dout=64, block_fin=128),
                dict(block_dout=256),
                dict(block_dout=256, block_fin=128),
                dict(block_dout=256, num_warps=8),
                dict(block_dout=256, block_fin=128, num_warps=8),
                dict(num_stages=4),
                dict(block_m=128, num_warps=8),
            ]
        )
        print(f"\nprefill down sweep, N={N}, {E // 2}/{E} local, ms per call:")
        for g, dtype in [({}, jnp.float32)] + [(g, jnp.bfloat16) for g in grid]:
            b = dataclasses.replace(pre_blocks, **g)
            fn = functools.partial(moe_experts_prefill, blocks=b, out_dtype=dtype, **interp)
            try:
                t = time_per_call(fn, a, inner, max(reps, 7))
                print(f"  {g} {jnp.dtype(dtype).name}: {t * 1e3:.3f}", flush=True)
            except Exception as e:  # a shape the compiler rejects (shared memory, registers)
                print(f"  {g}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)

    if args.sweep:
        N = 64 if dry else 8192
        a = inputs(N, E, E // 2, D, F, k)
        grid = (
            [dict(block_m=16)]
            if dry
            else [
                dict(block_m=64, block_f=64, block_d=64, num_warps=4, num_stages=3),
                dict(block_m=64, block_f=64, block_d=64, num_warps=4, num_stages=4),
                dict(block_m=128, block_f=64, block_d=64, num_warps=8, num_stages=3),
                dict(block_m=128, block_f=128, block_d=32, num_warps=8, num_stages=3),
                dict(block_m=64, block_f=128, block_d=64, num_warps=8, num_stages=3),
                dict(
                    block_m=128, block_f=64, block_d=64, block_dout=256, num_warps=8, num_stages=3
                ),  # fmt: skip
                dict(block_m=32, block_f=64, block_d=128, num_warps=4, num_stages=3),
            ]
        )
        print(f"\nprefill block sweep, N={N}:")
        for g in grid:
            b = dataclasses.replace(pre_blocks, **g)
            try:
                t = time_per_call(functools.partial(moe_experts_prefill, blocks=b, **interp),
                                  a, inner, reps)  # fmt: skip
                print(f"  {g}: {t * 1e3:.3f} ms", flush=True)
            except Exception as e:  # a shape the compiler rejects (shared memory, registers)
                print(f"  {g}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)

    print("\n| case | ours ms | anchor | anchor ms | ours / anchor | floor ms | ours / floor "
          "| max rel err vs ref |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, ours, anchor, xla, floor, err in rows:
        print(
            f"| {name} | {ours * 1e3:.3f} | {anchor} | {xla * 1e3:.3f} | {ours / xla:.2f} | "
            f"{floor * 1e3:.3f} | {ours / floor:.2f} | {err:.1e} |"
        )


if __name__ == "__main__":
    main()
