"""A projection of a few rows (decode: N <= 64 tokens) as one Pallas (Triton backend) kernel.

At decode sizes a projection only streams its weight: x is a few KiB, w is megabytes (the 80B
model's GDN in_proj is 25 MB per GPU at TP=2). Two things cost time on that path in XLA:
  - a weight that is one layer of a stack (inside the layer scan) is a dynamic slice, and a
    slice cannot be a library call's operand, so it is copied first (12 us per 25 MB);
  - a dot of a single row is emitted as a multiply fusion and a reduce fusion (two kernels,
    the first writing the [K, M] products).
This kernel reads w[layer] in place from the stack, in one launch. Program (j, s) owns the
block_m columns j of the output and the s-th of `splits` slices of K: it loops over its K
slice in block_k chunks, multiplying the rows (padded to >= 16, the smallest tl.dot shape, by
masked loads) with the weight chunk in fp32. With one split it writes y in x's dtype; with
more, each split writes an fp32 partial sum and one XLA reduction adds them (splits give the
GPU enough programs when M is small: 2048 columns make 32 programs of 64, a quarter of the
H200's 132 SMs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._triton import MIN_DOT, compiler_params, dot_block
from pallas_kernels.linear.reference import validate_linear_inputs

MAX_ROWS = 64  # rows held by every program; more rows belong to a GEMM


@dataclasses.dataclass(frozen=True)
class LinearBlocks:
    """block_m: output columns per program; block_k: the K chunk per loop step (each capped at
    the largest power of 2 dividing its dimension, and >= 16); splits: K slices per column
    block, None picks enough for about target_programs programs while each slice keeps at
    least min_k_per_split of K. Defaults from an H200 sweep of the 80B model's per-GPU shapes
    (1-64 rows, benchmarks/bench_linear.py): about one program per SM was best; more splits
    cost more in the partial sums than they gained in parallelism."""

    block_m: int = 64
    block_k: int = 128
    splits: int | None = None
    target_programs: int = 128
    min_k_per_split: int = 256
    num_warps: int = 4
    num_stages: int = 4


def _kernel(layer_ref, x_ref, w_ref, y_ref, *, rows, n, block_m, block_k, k_split, partial):
    # layer_ref [1] int32; x_ref [N (or rows), K]; w_ref [L, K, M] (the whole stack)
    # y_ref [N, M] in x's dtype, or [splits, N, M] fp32 partial sums when `partial`
    j, s = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    cols = pl.ds(pl.multiple_of(j * block_m, block_m), block_m)
    mine = (jnp.arange(rows) < n)[:, None]  # [R, 1]: rows past N are padding

    def body(i, acc):
        ks = pl.ds(pl.multiple_of(s * k_split + i * block_k, block_k), block_k)
        xs = plt.load(x_ref.at[pl.ds(0, rows), ks], mask=mine, other=0)  # [R, BK]
        ws = w_ref[layer, ks, cols].astype(xs.dtype)  # [BK, BM]
        return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k_split // block_k, body, jnp.zeros((rows, block_m), jnp.float32))
    if partial:
        plt.store(y_ref.at[s, pl.ds(0, rows), cols], acc, mask=mine)
    else:
        plt.store(y_ref.at[pl.ds(0, rows), cols], acc.astype(y_ref.dtype), mask=mine)


def plan(K: int, M: int, blocks: LinearBlocks) -> tuple[int, int, int]:
    """(block_m, block_k, splits) for a [K, M] weight."""
    BM = dot_block("block_m", blocks.block_m, M, "M (w's columns)")
    BK = dot_block("block_k", blocks.block_k, K, "K (w's rows)")
    S = blocks.splits
    if S is None:
        S = 1
        while M // BM * S < blocks.target_programs and K // (2 * S) >= max(
            BK, blocks.min_k_per_split
        ):
            S *= 2
    if S < 1 or K % (S * BK):
        raise ValueError(f"splits={S}: K={K} must split into slices of whole {BK}-row chunks")
    return BM, BK, S


def kernel_applies(N: int, K: int, M: int) -> bool:
    """Whether `linear` takes an [N, K] x [K, M] projection."""
    return 1 <= N <= MAX_ROWS and K % MIN_DOT == 0 and M % MIN_DOT == 0


@functools.partial(jax.jit, static_argnames=("interpret", "blocks"))
def linear(x, w, layer=None, *, interpret=False, blocks: LinearBlocks = LinearBlocks()):
    """y = x @ w[layer] (or x @ w) for N <= 64 rows, reading w in place.

    Args:
      x: [N, K] bf16 or fp32, 1 <= N <= 64.
      w: [K, M], or stacked over layers [L, K, M] with `layer` (an int32 scalar, may be
        traced; clamped to [0, L)). Cast to x's dtype in the kernel. K and M multiples of 16.
    Returns:
      y [N, M] in x's dtype: products in x's dtype, sums in fp32 (as `linear_ref`).
    """
    L, K, M = validate_linear_inputs(x, w, layer)
    N = x.shape[0]
    if not kernel_applies(N, K, M):
        raise ValueError(
            f"x {tuple(x.shape)} @ w {tuple(w.shape)}: the kernel takes 1 <= N <= {MAX_ROWS} "
            f"rows and K, M multiples of {MIN_DOT}"
        )
    BM, BK, S = plan(K, M, blocks)
    R = max(MIN_DOT, pl.next_power_of_2(N))
    if interpret and R > N:  # interpret mode slices rows 0..R in bounds; the GPU masks them
        x = jnp.pad(x, ((0, R - N), (0, 0)))
    w = w if w.ndim == 3 else w[None]
    layer = jnp.clip(jnp.asarray(0 if layer is None else layer, jnp.int32), 0, L - 1)
    partial = S > 1
    out_shape = (
        jax.ShapeDtypeStruct((S, N, M), jnp.float32)
        if partial
        else jax.ShapeDtypeStruct((N, M), x.dtype)
    )
    whole = pl.BlockSpec()  # whole arrays: the kernel indexes its layer, rows and columns
    y = pl.pallas_call(
        functools.partial(
            _kernel, rows=R, n=N, block_m=BM, block_k=BK, k_split=K // S, partial=partial
        ),
        grid=(M // BM, S),
        in_specs=[whole] * 3,
        out_specs=whole,
        out_shape=out_shape,
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="linear",
    )(layer.reshape(1), x, w)
    return y.sum(0).astype(x.dtype) if partial else y
