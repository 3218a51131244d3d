"""Decode projections on one GPU: the Pallas kernel (`pallas_kernels.linear`, reading one layer
of a weight stack in place) vs XLA's dot on the layer's dynamic slice (what the layer scan ran
before), on the 80B model's per-GPU shapes under 2-way tensor parallelism.

  python benchmarks/bench_linear.py [--sweep]      # on the GPU
  python benchmarks/bench_linear.py --dry-run      # tiny shapes, interpret mode, on the CPU

Both read layer 1 of a 2-layer stack [2, K, M] in bf16 with the layer index traced. Floor: the
weight's bytes at 4.3 TB/s. Times: the median of `reps` calls of one jitted loop of `inner`
chained calls unrolled, per call (the chaining adds one small fusion per call to both).
--sweep times the K splits on every case.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import HBM_BPS, time_chained, time_layer_walk  # noqa: E402

from pallas_kernels.linear import LinearBlocks, linear, linear_ref, plan  # noqa: E402

# (name, K, M): per GPU at TP = 2 (D = 2048)
SHAPES = [
    ("gdn in_proj_qkvz", 2048, 6144),
    ("gdn out_proj", 2048, 2048),
    ("attn q_proj", 2048, 4096),
    ("attn k_proj", 2048, 256),
    ("router", 2048, 512),
    ("shared gate_proj", 2048, 256),
    ("shared down_proj", 256, 2048),
]
DRY_SHAPES = [("tiny", 256, 128), ("tiny split", 512, 64)]


def feed(x, y):
    return x + (y[:, :1] * 1e-3).astype(x.dtype)


def xla_dot(x, w, layer):
    w1 = jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)
    return jnp.dot(x, w1.astype(x.dtype))


# (name, K, M): per GPU, one GPU (TP = 1) and two (TP = 2)
LAYER_SHAPES = [
    ("gdn in_proj_qkvz tp1", 2048, 12288),
    ("gdn out_proj tp1", 4096, 2048),
    ("attn q_proj tp1", 2048, 8192),
    ("gdn in_proj_qkvz tp2", 2048, 6144),
    ("gdn out_proj tp2", 2048, 2048),
]
LAYER_GRID = [
    {},
    dict(block_k=256),
    dict(block_k=256, num_stages=3),
    dict(num_stages=6),
    dict(block_m=128, num_warps=8),
    dict(target_programs=256),
]


def layers_sweep(rows, interpret):
    """us per call of each LinearBlocks change on each shape and row count, 12-layer stacks."""
    shapes = DRY_SHAPES if interpret else LAYER_SHAPES
    grid = [{}, dict(block_k=64)] if interpret else LAYER_GRID
    L = 2 if interpret else 12
    print(f"\nprojections over a {L}-layer stack, us per call (floor: bytes at 4.3 TB/s):")
    print("| shape | N | floor | " + " | ".join(str(g or "defaults") for g in grid) + " |")
    print("|---|---|---|" + "---|" * len(grid))
    for name, K, M in shapes:
        key = jax.random.split(jax.random.key(K + M), 2)
        w = (0.02 * jax.random.normal(key[0], (L, K, M), jnp.float32)).astype(jnp.bfloat16)
        for N in rows:
            x = jax.random.normal(key[1], (N, K), jnp.bfloat16)
            line = []
            for g in grid:
                b = LinearBlocks(**g)
                try:
                    plan(K, M, b)
                    fn = lambda x, w, layer, b=b: linear(x, w, layer, interpret=interpret, blocks=b)  # noqa: E731
                    step = lambda x, layer, w, fn=fn: feed(x, fn(x, w, jnp.int32(layer)))  # noqa: E731
                    t = time_layer_walk(step, x, (w,), L, 1 if interpret else 4, reps=5)
                    line.append(f"{t * 1e6:.2f}")
                except Exception as e:  # a shape the blocks do not divide, or the compiler rejects
                    line.append(f"- ({type(e).__name__})")
            floor = K * M * 2 / HBM_BPS * 1e6
            print(f"| {name} | {N} | {floor:.2f} | " + " | ".join(line) + " |", flush=True)
        del w


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--inner", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--layers-sweep",
        action="store_true",
        help="blocks per shape over a 12-layer stack, one GPU's and two GPUs' shapes",
    )
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    interpret = args.dry_run
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    inner, reps = (2, 1) if args.dry_run else (args.inner, args.reps)
    print(f"jax {jax.__version__} | {jax.devices()[0].device_kind}")
    if args.layers_sweep:
        layers_sweep(args.rows, interpret)
        return
    rows, chain_us = [], {}
    for name, K, M in shapes:
        key = jax.random.split(jax.random.key(K + M), 2)
        w = (0.02 * jax.random.normal(key[0], (2, K, M), jnp.float32)).astype(jnp.bfloat16)
        layer = jnp.int32(1)
        floor_us = K * M * 2 / HBM_BPS * 1e6
        for N in args.rows:
            x = jax.random.normal(key[1], (N, K), jnp.bfloat16)
            err = float(
                jnp.max(
                    jnp.abs(
                        linear(x, w, layer, interpret=interpret).astype(jnp.float32)
                        - linear_ref(x, w, layer).astype(jnp.float32)
                    )
                )
            )
            splits = [None] + ([1, 2, 4, 8, 16] if args.sweep else [])
            best = None
            for S in splits:
                b = LinearBlocks(splits=S)
                try:
                    plan(K, M, b)
                except ValueError:
                    continue
                fn = lambda x, w, layer, b=b: linear(x, w, layer, interpret=interpret, blocks=b)  # noqa: E731
                us = time_chained(fn, (x, w, layer), feed, inner, reps, unroll=True) * 1e6
                tag = "auto" if S is None else S
                print(f"  {name} N={N} splits={tag} plan={plan(K, M, b)}: {us:.2f} us")
                if S is None:
                    auto_us = us
                best = us if best is None else min(best, us)
            if (N, K) not in chain_us:  # the chaining's own cost per call, in both columns
                chain_us[N, K] = (
                    time_chained(lambda x, w, layer: x, (x, w, layer), feed, inner, reps, True)
                    * 1e6
                )
                print(f"  chaining alone N={N} K={K}: {chain_us[N, K]:.2f} us")
            xla_us = time_chained(xla_dot, (x, w, layer), feed, inner, reps, unroll=True) * 1e6
            rows.append((name, N, K, M, auto_us, best, xla_us, floor_us, err))
    print(
        "\n| projection | N | K x M | ours us | best split us | XLA us | floor us | XLA / ours "
        "| max err |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, N, K, M, ours, best, xla, floor, err in rows:
        print(
            f"| {name} | {N} | {K} x {M} | {ours:.2f} | {best:.2f} | {xla:.2f} | {floor:.2f} "
            f"| {xla / ours:.2f} | {err:.1e} |"
        )


if __name__ == "__main__":
    main()
