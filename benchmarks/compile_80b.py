"""Compile time of a full forward at the Qwen3-Next-80B-A3B geometry, from abstract shapes only.

Parameters come from `nnx.eval_shape` (jax.ShapeDtypeStruct leaves, no memory), so this runs on
any machine. The 48 layers are one scanned segment of 12 x [GDN, GDN, GDN, attention]; the point
is that compile time stays about that of one group, whatever the depth.

    python benchmarks/compile_80b.py [--batch 1] [--seq 16] [--layers 48] [--lower-only]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import QWEN3_NEXT_80B_A3B, RuntimeOptions
from qnext_jax.model import Qwen3NextForCausalLM


def abstract_forward(cfg, opts, batch: int, seq: int):
    """(jitted logits fn, abstract params, abstract input ids) for cfg at [batch, seq]."""
    model = nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, opts))
    graphdef, state = nnx.split(model)

    def logits(state, ids):
        return nnx.merge(graphdef, state)(ids)

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return jax.jit(logits), state, ids


def time_compile(cfg, opts, batch: int, seq: int, lower_only: bool = False) -> dict[str, float]:
    fn, state, ids = abstract_forward(cfg, opts, batch, seq)
    t0 = time.perf_counter()
    lowered = fn.lower(state, ids)
    t1 = time.perf_counter()
    out = {"lower_s": t1 - t0}
    if not lower_only:
        lowered.compile()
        out["compile_s"] = time.perf_counter() - t1
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--layers", type=int, nargs="*", default=[4, 48])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lower-only", action="store_true")
    args = ap.parse_args(argv)
    opts = RuntimeOptions(dtype=args.dtype)
    cpu = platform.processor() or platform.machine()
    shape = f"B={args.batch} T={args.seq} {args.dtype}"
    print(f"jax {jax.__version__}, {jax.default_backend()} ({cpu}), {shape}")
    print(f"{'layers':>6} {'lower s':>8} {'compile s':>10}")
    for n in args.layers:
        cfg = QWEN3_NEXT_80B_A3B.replace(num_hidden_layers=n, layer_types=())
        r = time_compile(cfg, opts, args.batch, args.seq, args.lower_only)
        print(f"{n:>6} {r['lower_s']:>8.2f} {r.get('compile_s', float('nan')):>10.2f}")


if __name__ == "__main__":
    main()
