"""The model's all-reduce alone: a psum of bf16 [N, 2048] (the residual stream of N tokens)
over every visible device, through `shard_map`, as the tensor- and expert-parallel layers
issue it. N = 1, 8, 64 (decode) and 1K, 8K (prefill chunks).

Timed as `inner` chained psums in one jitted loop (each feeds the next), median of reps;
algbw = bytes / time, busbw = algbw * 2 (n - 1) / n (NCCL's convention: the bytes each link
carries). NCCL's protocol and algorithm are chosen by NCCL unless the environment sets them
(NCCL_PROTO, NCCL_ALGO), so run it once per setting to compare:

  python benchmarks/bench_collectives.py [--sizes 1 8 64 1024 8192] [--json FILE]
  NCCL_PROTO=Simple python benchmarks/bench_collectives.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_chained  # noqa: E402

D = 2048


def psum_seconds(mesh: Mesh, n: int, inner: int, reps: int) -> float:
    """Seconds per psum of a replicated bf16 [n, D] over the mesh's one axis."""
    axis = mesh.axis_names[0]
    psum = jax.shard_map(
        lambda x: jax.lax.psum(x, axis),
        mesh=mesh,
        in_specs=PartitionSpec(),
        out_specs=PartitionSpec(),
        check_vma=False,
    )
    # halve after each sum so the values stay finite over the chain
    feed = lambda x, out: (out * 0.5).astype(x.dtype)  # noqa: E731
    x = jnp.ones((n, D), jnp.bfloat16)
    return time_chained(psum, (x,), feed, inner=inner, reps=reps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 1024, 8192])
    ap.add_argument("--inner", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="append the rows to this file (JSON lines)")
    args = ap.parse_args(argv)
    devices = jax.devices()
    n_dev = len(devices)
    if n_dev < 2:
        raise SystemExit(f"needs 2 or more devices, found {n_dev} ({devices[0].platform})")
    mesh = Mesh(np.array(devices), ("x",))
    chosen = [f"{k}={os.environ[k]}" for k in ("NCCL_PROTO", "NCCL_ALGO") if k in os.environ]
    setting = ", ".join(chosen) or "NCCL's choice"
    rows = []
    for n in args.sizes:
        t = psum_seconds(mesh, n, args.inner, args.reps)
        nbytes = n * D * 2
        algbw = nbytes / t / 1e9
        rows.append(
            dict(
                setting=setting,
                devices=n_dev,
                tokens=n,
                bytes=nbytes,
                us=t * 1e6,
                algbw_gbs=algbw,
                busbw_gbs=algbw * 2 * (n_dev - 1) / n_dev,
            )
        )
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"\njax={jax.__version__} | {devices[0].device_kind} x {n_dev} | {setting}")
    print("| tokens | MiB | us | algbw GB/s | busbw GB/s |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['bytes'] / 2**20:.3g} | {r['us']:.1f} | "
            f"{r['algbw_gbs']:.1f} | {r['busbw_gbs']:.1f} |"
        )


if __name__ == "__main__":
    main()
