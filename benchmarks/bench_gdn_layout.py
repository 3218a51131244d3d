"""GDN decode state layouts on the GPU: the shipped kernel's [K, V] state vs a [V, K] one.

The decode step reads and writes the fp32 state once; in the [K, V] layout a program's [K,
block_v] slab is strided and both reductions (S^T k, S^T q) run across rows; in [V, K] the
slab is contiguous and the reductions run along rows. Both in place (the state aliased to
the output), B=64 and 256 sequences, HV=32, K=V=128, 20 chained calls per jitted program,
median of 7, TB/s of state read + write.

  python benchmarks/bench_gdn_layout.py   # GPU; on the CPU: tiny shapes in interpret mode
"""

import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pallas_kernels._triton import compiler_params  # noqa: E402
from pallas_kernels.gated_delta_rule import (  # noqa: E402
    DecodeBlocks,
    fused_recurrent_gated_delta_rule,
)

H, HV, K, V = 16, 32, 128, 128
INTERP = jax.default_backend() == "cpu"
if INTERP:
    H, HV, K, V = 2, 4, 32, 32


def vk_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s_ref, o_ref, so_ref, *, bv, hp, scale):
    # q, k [B, H, K]; v [B, HV, V]; g, beta [B, HV] fp32; state [B, HV, V, K] fp32 (in place).
    # Program (b, j, c): value heads j * hp .. j * hp + hp - 1, rows c * bv .. of V each.
    b = pl.program_id(0)
    for i in range(hp):
        h = pl.program_id(1) * hp + i
        rows = pl.ds(pl.program_id(2) * bv, bv)
        s = s_ref[b, h, rows, :]  # [bv, K]
        q = q_ref[b, h // (HV // H), :].astype(jnp.float32)
        k = k_ref[b, h // (HV // H), :].astype(jnp.float32)
        q = q * jax.lax.rsqrt(jnp.sum(q * q) + 1e-6)
        k = k * jax.lax.rsqrt(jnp.sum(k * k) + 1e-6)
        g, beta = g_ref[b, h], b_ref[b, h]
        s = s * jnp.exp(g)
        kv = jnp.sum(s * k[None, :], axis=1)
        d = beta * (v_ref[b, h, rows].astype(jnp.float32) - kv)
        s = s + d[:, None] * k[None, :]
        o_ref[b, h, rows] = jnp.sum(s * (q * scale)[None, :], axis=1).astype(o_ref.dtype)
        so_ref[b, h, rows, :] = s


def vk_call(q, k, v, g, beta, s, *, bv, hp, warps):
    """One decode step (T = 1) on the [V, K] state: (o [B, HV, V], the state updated)."""
    B = q.shape[0]
    whole = pl.BlockSpec()
    o, s = pl.pallas_call(
        functools.partial(vk_kernel, bv=bv, hp=hp, scale=K**-0.5),
        grid=(B, HV // hp, V // bv),
        in_specs=[whole] * 6,
        out_specs=[whole, whole],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(s.shape, s.dtype)],
        input_output_aliases={5: 1},
        compiler_params=compiler_params(warps, 1),
        interpret=INTERP,
    )(q, k, v, g, beta, s)
    return o, s


def time_fn(step, args, s, reps=20):
    """us per call of step(args, s) -> (o, s): reps chained calls in one jitted program, the
    state donated (updated in place across calls), median of 7."""

    @functools.partial(jax.jit, donate_argnums=1)
    def many(a, s):
        acc = jnp.float32(0)
        for _ in range(reps):
            o, s = step(a, s)
            acc = acc + o.reshape(-1)[0].astype(jnp.float32)
        return acc, s

    _, s = many(args, s)
    jax.block_until_ready(s)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        _, s = many(args, s)
        jax.block_until_ready(s)
        ts.append((time.perf_counter() - t0) / reps)
    return statistics.median(ts) * 1e6, s


def main():
    rows = []
    for B in (64, 256) if not INTERP else (2,):
        key = jax.random.split(jax.random.key(0), 6)
        q = jax.random.normal(key[0], (B, H, K), jnp.bfloat16)
        k = jax.random.normal(key[1], (B, H, K), jnp.bfloat16)
        v = jax.random.normal(key[2], (B, HV, V), jnp.bfloat16)
        g = -0.05 * jax.random.uniform(key[3], (B, HV), jnp.float32)
        beta = jax.random.uniform(key[4], (B, HV), jnp.float32)
        s0 = 0.1 * jax.random.normal(key[5], (B, HV, K, V), jnp.float32)
        nbytes = 2 * s0.size * 4
        # the [V, K] kernel against the shipped one
        o_ref_, s_ref_ = fused_recurrent_gated_delta_rule(
            q[:, None],
            k[:, None],
            v[:, None],
            g[:, None],
            beta[:, None],
            initial_state=s0,
            use_qk_l2norm=True,
            interpret=INTERP,
        )
        o_vk, s_vk = jax.jit(functools.partial(vk_call, bv=min(64, V), hp=1, warps=4))(
            q, k, v, g, beta, jnp.swapaxes(s0, 2, 3)
        )
        err_o = float(jnp.max(jnp.abs(o_vk.astype(jnp.float32) - o_ref_[:, 0].astype(jnp.float32))))
        err_s = float(jnp.max(jnp.abs(jnp.swapaxes(s_vk, 2, 3) - s_ref_)))
        print(f"B={B} [V, K] vs shipped, max abs: o {err_o:.2e} state {err_s:.2e}", flush=True)

        for bv, warps in ((32, 4), (64, 4), (64, 8), (128, 8)):
            if bv > V:
                continue
            blocks = DecodeBlocks(block_v=bv, num_warps=warps)
            step = lambda a, s, blocks=blocks: fused_recurrent_gated_delta_rule(
                *a,
                initial_state=s,
                state_layer=jnp.zeros((), jnp.int32),  # the model's form: a stack, in place
                use_qk_l2norm=True,
                blocks=blocks,
                interpret=INTERP,
            )
            us, _ = time_fn(
                step, (q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None]), s0[None] + 0
            )
            rows.append((B, f"[K, V] (shipped) bv={bv} w={warps}", us, nbytes / us / 1e6))
        for bv, hp, warps in (
            (32, 1, 4),
            (64, 1, 4),
            (64, 1, 8),
            (128, 1, 8),
            (32, 2, 4),
            (64, 2, 4),
            (64, 2, 8),
            (32, 4, 4),
            (16, 1, 2),
        ):
            if bv > V:
                continue
            step = lambda a, s, bv=bv, hp=hp, warps=warps: vk_call(*a, s, bv=bv, hp=hp, warps=warps)
            us, _ = time_fn(step, (q, k, v, g, beta), jnp.swapaxes(s0, 2, 3) + 0)
            rows.append((B, f"[V, K] bv={bv} hp={hp} w={warps}", us, nbytes / us / 1e6))
    print("\n| B | variant | us | TB/s |\n|---|---|---|---|")
    for B, name, us, tbs in rows:
        print(f"| {B} | {name} | {us:.1f} | {tbs:.2f} |")


if __name__ == "__main__":
    main()
