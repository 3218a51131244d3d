"""Decode attention on one GPU: the Pallas kernel (split along the sequence) vs XLA's attention,
on the 80B geometry per GPU under 2-way tensor parallelism (8 query heads, 1 KV head, head dim
256), bf16 cache, one new query per sequence.

  python benchmarks/bench_attention.py [--sweep]      # on the GPU
  python benchmarks/bench_attention.py --dry-run      # tiny shapes, interpret mode, on the CPU

Both read layer 1 of a 2-layer cache stack [L, B, S, KVH, D], as the model does inside its layer
scan: the kernel reads the stack in place, XLA's path (`ops.attention`, impl "dense", what the
model ran before) reads the layer's slice. Every sequence's query sits at the last position, so
the whole cache is read. Floor: the K and V bytes at 4.3 TB/s. Times: the median of `reps`
calls of one jitted loop of `inner` chained calls, per call. --sweep times block_s x warps x
splits on three of the cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import HBM_BPS, time_chained  # noqa: E402

from pallas_kernels.attention import (  # noqa: E402
    DecodeAttentionBlocks,
    decode_attention,
    decode_attention_ref,
)
from qnext_jax import ops  # noqa: E402


def inputs(B, S, H, KVH, D, seed=0):
    key = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(key[0], (B, 1, H, D), jnp.bfloat16)
    k = jax.random.normal(key[1], (2, B, S, KVH, D), jnp.bfloat16)
    v = jax.random.normal(key[2], (2, B, S, KVH, D), jnp.bfloat16)
    pos = jnp.full((B, 1), S - 1, jnp.int32)
    return q, k, v, pos


def time_per_call(fn, args, inner: int, reps: int) -> float:
    """Seconds per call of fn(*args), chained through the query (common.time_chained)."""
    return time_chained(fn, args, lambda q, o: q + (o * 1e-3).astype(q.dtype), inner, reps)


def xla_attention(q, k, v, pos):
    """What the model ran before the kernel: the layer's slice, then XLA's dense attention."""
    k1, v1 = k[1], v[1]
    B, S = k1.shape[:2]
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    D = q.shape[-1]
    return ops.attention(q, k1, v1, pos, k_pos, scale=D**-0.5, impl="dense")


SWEEP_CASES = {(1, 32768), (8, 32768), (64, 1088)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    interpret = args.dry_run
    if args.dry_run:
        H, KVH, D, inner = 4, 2, 32, 2
        cases = [(2, 64), (1, 128)]
    else:
        H, KVH, D, inner = 8, 1, 256, 20
        cases = [(1, 1088), (1, 32768), (1, 262144), (8, 32768), (64, 1088)]
    blocks = DecodeAttentionBlocks()
    layer = jnp.int32(1)
    rows = []
    for B, S in cases:
        q, k, v, pos = inputs(B, S, H, KVH, D)

        def kernel(q, k, v, pos, blocks=blocks):
            return decode_attention(q, k, v, pos, layer=layer, interpret=interpret, blocks=blocks)

        got = jax.jit(kernel)(q, k, v, pos)
        want = decode_attention_ref(q, k, v, pos, layer=1)
        a, b = np.asarray(got, np.float32), np.asarray(want, np.float32)
        err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        t_ours = time_per_call(kernel, (q, k, v, pos), inner, args.reps)
        t_xla = time_per_call(xla_attention, (q, k, v, pos), inner, args.reps)
        floor = 2 * B * S * KVH * D * 2 / HBM_BPS
        rows.append((B, S, t_ours, t_xla, floor, err))
        print((B, S, t_ours, t_xla, floor, err), flush=True)
        if args.sweep and not args.dry_run and (B, S) in SWEEP_CASES:
            for bs in (32, 64, 128):
                for warps in (4, 8):
                    for splits in (None, 2 * 132 // (B * KVH) or 1):
                        cfg = dataclasses.replace(
                            blocks, block_s=bs, num_warps=warps, num_splits=splits
                        )
                        t = time_per_call(
                            lambda q, k, v, p, c=cfg: kernel(q, k, v, p, blocks=c),
                            (q, k, v, pos),
                            inner,
                            args.reps,
                        )
                        print(
                            f"  sweep B={B} S={S} block_s={bs} warps={warps} "
                            f"splits={splits}: {t * 1e6:.1f} us",
                            flush=True,
                        )

    print(
        f"\njax={jax.__version__} | device={jax.devices()[0].device_kind} | H={H} KVH={KVH} D={D}"
    )
    print(
        "| case | ours us | XLA dense us | XLA / ours | floor us | ours / floor | GB/s | rel err |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for B, S, t, tx, fl, err in rows:
        gbs = 2 * B * S * KVH * D * 2 / t / 1e9
        print(
            f"| B={B} S={S} | {t * 1e6:.1f} | {tx * 1e6:.1f} | {tx / t:.2f} | {fl * 1e6:.1f} | "
            f"{t / fl:.2f} | {gbs:.0f} | {err:.1e} |"
        )


if __name__ == "__main__":
    main()
