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


def _project(layer, x_ref, w_ref, y_ref, j, s, mine, *, rows, block_m, block_k, k_split, partial):
    # the block_m columns j of one weight's output, from the s-th slice of K
    cols = pl.ds(pl.multiple_of(j * block_m, block_m), block_m)

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


def _kernel(layer_ref, x_ref, *refs, rows, n, parts, block_k, k_split, partial):
    # layer_ref [1] int32; x_ref [N (or rows), K]; then one w_ref [L, K, M_i] (the whole stack)
    # per weight, then its y_ref [N, M_i] in x's dtype, or [splits, N, M_i] fp32 partial sums
    # when `partial`. parts[i] = (first program, column blocks, block_m) of weight i: programs
    # first .. first + blocks - 1 along axis 0 own weight i's columns.
    w_refs, y_refs = refs[: len(parts)], refs[len(parts) :]
    j, s = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    mine = (jnp.arange(rows) < n)[:, None]  # [R, 1]: rows past N are padding
    kw = dict(rows=rows, block_k=block_k, k_split=k_split, partial=partial)
    if len(parts) == 1:
        _project(layer, x_ref, w_refs[0], y_refs[0], j, s, mine, block_m=parts[0][2], **kw)
        return
    for (first, count, block_m), w_ref, y_ref in zip(parts, w_refs, y_refs, strict=True):

        @pl.when((j >= first) & (j < first + count))
        def _(w_ref=w_ref, y_ref=y_ref, first=first, block_m=block_m):
            _project(layer, x_ref, w_ref, y_ref, j - first, s, mine, block_m=block_m, **kw)


def plan_many(K: int, Ms: tuple[int, ...], blocks: LinearBlocks):
    """(block_m per weight, block_k, splits) for weights [K, M_i] sharing one launch: each
    weight's columns in its own blocks, one K split for all (enough for about
    target_programs programs over all the weights' column blocks)."""
    BMs = tuple(dot_block("block_m", blocks.block_m, M, "M (w's columns)") for M in Ms)
    BK = dot_block("block_k", blocks.block_k, K, "K (w's rows)")
    col_blocks = sum(M // BM for M, BM in zip(Ms, BMs, strict=True))
    S = blocks.splits
    if S is None:
        S = 1
        while col_blocks * S < blocks.target_programs and K // (2 * S) >= max(
            BK, blocks.min_k_per_split
        ):
            S *= 2
    if S < 1 or K % (S * BK):
        raise ValueError(f"splits={S}: K={K} must split into slices of whole {BK}-row chunks")
    return BMs, BK, S


def plan(K: int, M: int, blocks: LinearBlocks) -> tuple[int, int, int]:
    """(block_m, block_k, splits) for a [K, M] weight."""
    (BM,), BK, S = plan_many(K, (M,), blocks)
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
    return linear_many(x, (w,), layer, interpret=interpret, blocks=blocks)[0]


@functools.partial(jax.jit, static_argnames=("interpret", "blocks"))
def linear_many(
    x, ws, layer=None, *, interpret=False, blocks: LinearBlocks = LinearBlocks()
) -> tuple[jax.Array, ...]:
    """(x @ w[layer] for w in ws) in one launch: projections that share their input (GDN's
    in_proj_qkvz and in_proj_ba; attention's q, k and v) as one kernel, each weight read in
    place. A small weight then adds a few programs to a large one's grid instead of a launch
    (and a partial-sum reduction) of its own.

    Args:
      x: [N, K] as in `linear`.
      ws: weights [K, M_i], or stacks [L, K, M_i] with `layer`; all stacked (over the same L)
        or none.
    Returns:
      a tuple of y_i [N, M_i] in x's dtype.
    """
    ws = tuple(ws)
    if not ws:
        raise ValueError("ws must hold at least one weight, got none")
    shapes = [validate_linear_inputs(x, w, layer) for w in ws]  # each K is x's
    if len({L for L, _, _ in shapes}) > 1:
        raise ValueError(
            "ws: stacked weights must have the same number of layers L; got shapes "
            + ", ".join(str(tuple(w.shape)) for w in ws)
        )
    L, K = shapes[0][:2]
    Ms = tuple(M for _, _, M in shapes)
    N = x.shape[0]
    if not all(kernel_applies(N, K, M) for M in Ms):
        raise ValueError(
            f"x {tuple(x.shape)} @ w {', '.join(str(tuple(w.shape)) for w in ws)}: the kernel "
            f"takes 1 <= N <= {MAX_ROWS} rows and K, M multiples of {MIN_DOT}"
        )
    BMs, BK, S = plan_many(K, Ms, blocks)
    parts, first = [], 0
    for M, BM in zip(Ms, BMs, strict=True):
        parts.append((first, M // BM, BM))
        first += M // BM
    R = max(MIN_DOT, pl.next_power_of_2(N))
    if interpret and R > N:  # interpret mode slices rows 0..R in bounds; the GPU masks them
        x = jnp.pad(x, ((0, R - N), (0, 0)))
    ws = tuple(w if w.ndim == 3 else w[None] for w in ws)
    layer = jnp.clip(jnp.asarray(0 if layer is None else layer, jnp.int32), 0, L - 1)
    partial = S > 1
    out_shape = tuple(
        jax.ShapeDtypeStruct((S, N, M), jnp.float32)
        if partial
        else jax.ShapeDtypeStruct((N, M), x.dtype)
        for M in Ms
    )
    whole = pl.BlockSpec()  # whole arrays: the kernel indexes its layer, rows and columns
    ys = pl.pallas_call(
        functools.partial(
            _kernel,
            rows=R,
            n=N,
            parts=tuple(parts),
            block_k=BK,
            k_split=K // S,
            partial=partial,
        ),
        grid=(first, S),
        in_specs=[whole] * (2 + len(ws)),
        out_specs=(whole,) * len(ws),
        out_shape=out_shape,
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="linear",
    )(layer.reshape(1), x, *ws)
    return tuple(y.sum(0).astype(x.dtype) if partial else y for y in ys)
