"""Routed experts as two grouped Pallas (Triton backend) kernels, for decode and for prefill.

Outside the kernels (a few XLA ops, `pallas_kernels.moe.grouping`) the N * k (token, slot)
pairs are grouped by expert, so each expert's rows are one contiguous run, and the runs are
cut into row tiles of one expert each. Decode batches store each result at its (token, slot)
row, skipping the gather back (`MoEBlocks.y_by_pair`).
Kernel 1 (gate_up + SwiGLU) has a program per (tile, block_f columns of F), kernel 2 (down) one
per (tile, block_dout columns of D). A program streams its slice of the tile's expert weights
and multiplies it with the tile's rows (a fixed number of rows, of which those past the tile's
count are masked); a tile with count 0 (the static grid is an upper bound) exits at once.
Untouched experts are never read. Program id 0 (the tile) is the fastest-varying launch index,
so the tiles of one expert run side by side and share each weight block through L2.

Decode (`moe_experts_decode`, N <= 64 tokens) is bound by reading expert weights: one expert
is 3 * D * F bf16 values (6 MiB at D=2048, F=512), and N tokens touch at most min(E, N * k)
experts. The pairs are grouped by compare-and-count without a sort, each touched expert's run
cut into tiles of R = 16 rows (the smallest tl.dot shape; `MoEBlocks.decode_tile_rows`), and
batches of up to 16 tokens are not grouped at all: each (token, slot) pair is its own tile
(an expert two tokens share is then read twice, which cost less than the grouping ops).
N = 1, k = 10 touches 10 experts, 60 MiB, 14.6 us at 4.3 TB/s. H200, bf16, E=512, k=10, per
call inside a jitted loop: N=1 56 us vs 97 us for the XLA gather of the touched experts;
N=16 260 vs 693 us (floor 203); N=64 684 vs 2617 us (floor 540, tiles of 64 rows then). The
shared expert may ride along as more tiles of both kernels (its rows: the N tokens), so at
decode sizes it launches nothing of its own.

Prefill (`moe_experts_prefill`, any N) is a grouped matmul: the pairs are sorted by expert and
each expert's run is cut into tiles of block_m rows, so an expert with c rows costs
ceil(c / block_m) tiles and the padding is under one tile per touched expert; gate_up reads
x's rows by token (no grouped copy). FLOPs:
2 * N * k * 3 * D * F; the 8K-token chunk of the 80B geometry (k = 10) is 515 GFLOP per layer.
(`jax.lax.ragged_dot` falls back to a dense matmul over every group on NVIDIA GPUs.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._triton import MIN_DOT, compiler_params, dot_block
from pallas_kernels.moe.grouping import group_by_expert, group_by_sort, one_tile_per_pair
from pallas_kernels.moe.reference import validate_moe_inputs

MAX_TOKENS = 64  # decode batches; larger ones belong to the grouped matmul (prefill)


@dataclasses.dataclass(frozen=True)
class MoEBlocks:
    """Block sizes (powers of 2 >= 16; each is capped at the largest power of 2 dividing its
    dimension). block_f: F columns of gate and of up per gate_up program; block_d: the D chunk
    of the gate_up reduction; block_dout: D columns per down program; block_fin: the F chunk
    of the down reduction. Defaults from an H200 sweep (E=512, D=2048, F=512, k=10, bf16):
    block_f=64 reads 128-byte pieces of each [2F] weight row (32: 64 B, about 10% slower at
    N=1); 4 stages keep loads in flight (the rows of a 64-token batch still fit in shared
    memory). Splitting gate_up's D across programs (split_d) paid only with few local
    experts in the kernel's own loop: one token with 5 of its 10 experts on this device
    30.2 -> 25.2 us per layer at split_d=4, all 10 local 30.2 -> 43.7, 8 tokens unchanged
    (bench_moe.py --decode-sweep). In the 80B model on 2 GPUs at batch 1 the expert kernels
    gained ~1 us per layer and the step did not (5.55 -> 5.70 ms, the parts' sum one more
    kernel per layer), so the default is no split."""

    block_f: int = 64
    block_d: int = 128
    block_dout: int = 128
    block_fin: int = 128
    num_warps: int = 4
    num_stages: int = 4
    block_m: int = 64  # rows per tile (prefill only; decode tiles hold R rows)
    # gate_up's reduction over D split across up to this many programs per (tile, block_f)
    # (the most that divide D / block_d evenly): more programs in flight when few experts are
    # touched; the fp32 parts are added and SwiGLU applied by XLA between the two kernels.
    split_d: int = 1
    # gate and up as separate programs (a program per (tile, block_f columns of [gate | up]):
    # twice the gate_up programs, each streaming one weight block per chunk, for the batches
    # that fill few SMs otherwise: one token's 11 experts are 88 programs on 132 SMs). The
    # fp32 sums go to memory ([P, 2F]) and down applies SwiGLU as it loads them (with split_d
    # > 1, XLA does, after adding the parts). Results identical to the fused form.
    gate_up_apart: bool = False
    # down's pipeline depth and warps (None: num_stages / num_warps). At one token down has
    # 11 x D / block_dout programs; at 4 stages one fits an SM's shared memory, so 176 of them
    # take two waves on 132 SMs.
    down_stages: int | None = None
    down_warps: int | None = None
    # One token's pair tiles read x from an XLA broadcast of its row to the P grouped rows
    # (one small fusion per layer); False: gate_up loads the row itself, each tile's one real
    # row by a masked load, like the pair tiles of several tokens.
    broadcast_one_token: bool = True
    # Grouped decode batches of y_by_pair[0] .. y_by_pair[1] tokens skip the gather of the
    # results back to pair order: down stores each result at its pair's row. H200, E=512, one
    # call (benchmarks/bench_moe.py): 8 tokens 178 -> 163 us; 1 token 40.5 -> 47 us, 16
    # tokens 258 -> 266 us, 64 tokens 684 -> 680 us. (Below pair_tiles no batch is grouped.)
    # In the model the gather back is worse than alone: XLA fused it into the combine and
    # recomputed the grouping's index arithmetic per element (11 us per layer at 64 tokens;
    # 3.9 us stored by pair; 12-layer slice, one H200).
    y_by_pair: tuple[int, int] = (2, 64)
    # Batches of at most pair_tiles tokens run each (token, slot) pair as its own tile and skip
    # the grouping ops (`one_tile_per_pair`; 0: always grouped). One token's k ids are k
    # distinct experts, so at N = 1 nothing is read twice; with more tokens an expert two of
    # them share is read once per pair. H200, us per layer over a stack of 8 layers, 256 of
    # 512 experts local (bench_moe.py --rows-sweep), grouped (best of gathered / by pair) vs a
    # tile per pair: N=2 43.2 -> 34.7, N=8 82.1 -> 76.8, N=16 130.0 -> 127.2; with all 512
    # local N=8 136.3 -> 133.0. Not measured above 16 tokens, where shared experts (hence
    # repeated reads) grow.
    pair_tiles: int = 16
    # gate_up reads x's rows by token instead of from a grouped copy made by one XLA gather
    # (the copy holds every pair's row, those of experts on other devices too). With tiles of
    # 64 rows the copy was faster at 64 tokens (0.68 vs 0.76 ms per call); with 16-row tiles
    # reading by token is not slower (us per layer, bench_moe.py --batch-sweep: 64 tokens
    # 591.4 -> 589.2 all 512 local, 314.6 -> 301.4 with 256 of 512; 32 tokens 213.4 -> 210.2)
    # and the copy's XLA gather is gone. (Pair tiles read by token anyway; one token is
    # broadcast.)
    x_by_token: bool = True
    # Prefill: down stores each result at its pair's row (as y_by_pair for decode sizes).
    prefill_y_by_pair: bool = False
    # Grouped decode batches (more than pair_tiles tokens): rows per tile (a power of 2 >= 16);
    # an expert with more pairs gets several tiles. At 64 tokens an expert holds 1-3 pairs
    # and tiles of 64 rows mostly held padding (in shared memory and registers, 4 stages
    # deep). H200, us per layer over a stack of 8 layers (bench_moe.py --batch-sweep), 64 /
    # 32 / 16 rows: 64 tokens, all 512 experts local 646.5 / 641.7 / 592.7; 64 tokens, 256
    # of 512 local 337.9 / 342.2 / 316.1; 32 tokens, 256 local 240.9 / 240.6 / 215.0.
    decode_tile_rows: int = 16


# Prefill: tiles of 64 rows, 64-wide reduction chunks, 3 stages. An H200 sweep at 8K tokens
# (block_m 32-128, block_f 64-128, block_d 32-128, 4-8 warps, 3-4 stages) kept every shape
# within 12% of this one (benchmarks/RESULTS.md). x read by token: no grouped copy of every
# pair's row (foreign pairs' too), 8K tokens with 256 of 512 experts local 1.69 -> 1.36 ms
# per layer, 16K with all 512 4.44 -> 3.91 ms. Results stored by pair measured the same as
# gathered back (XLA fuses that gather into the combine).
PREFILL_BLOCKS = MoEBlocks(block_d=64, block_fin=64, num_stages=3)
# The blocks the model's decode batches run with (`qnext_jax.ops` reads this name when it
# traces a step, so a benchmark may put other blocks here before building an engine).
DECODE_BLOCKS = MoEBlocks()


def _tile(tile_ref, s):
    """Tile s of the table [U, 3] int32: (expert, count, start): expert e on the grouped rows
    [start, start + count) (count 0: an empty slot)."""
    return tile_ref[s, 0], tile_ref[s, 1], tile_ref[s, 2]


def _tokens(rows_p, pairs):
    """The token of each grouped row, from its pair index p (rows_p [R, 1]): p // k for a
    pair, and for a spare row (its own index, p >= M) the tokens in order, then the last one
    (the shared expert's rows). pairs = (M, k, N), static."""
    M, k, N = pairs
    return jnp.where(rows_p < M, rows_p // k, jnp.minimum(rows_p - M, N - 1))


def _gate_up_kernel(tile_ref, *refs, rows, block_f, block_d, split, apart, shared, x_rows, pairs):
    # tile_ref [U, 3] int32: slot s runs expert e on the grouped rows [start, start + cnt)
    # x_rows "grouped": x_ref [P, D] holds the grouped rows (R spare rows at the end);
    #   "pairs": pair_ref [P] int32 (each grouped row's pair; spare rows their own index)
    #   first and x_ref [N, D] the tokens, read row by row (`_tokens`); "identity": the
    #   same with grouped row j being pair j (no pair_ref)
    # w_ref [E, D, 2F] gate | up
    # with `shared` = (tile u, rows n, row m): layer_ref [1] int32, sg_ref / su_ref [L, D, Fs],
    #   the shared expert's gate and up: tiles u, u + 1, .. (past the routed ones) run it on
    #   the n rows from grouped row m (the tokens in order), R rows each, Fs <= F columns
    # out: h_ref [P, F] silu(gate) * up in x's dtype; rows of other slots left untouched.
    # With split > 1, program (s, f, j) sums the j-th of `split` parts of D and stores the
    # fp32 partial sums of gate and up in h_ref [split, P, 2F] (the caller adds the parts
    # and applies SwiGLU). With `apart`, program (s, f, j) computes block f of the [2F]
    # columns gate | up alone (gate for f < F / block_f) and stores its fp32 sums in h_ref
    # [split, P, 2F] as well; SwiGLU is the down kernel's (split 1) or the caller's.
    pair_ref, refs = (refs[0], refs[1:]) if x_rows == "pairs" else (None, refs)
    if shared:
        x_ref, w_ref, layer_ref, sg_ref, su_ref, h_ref = refs
    else:
        (x_ref, w_ref, h_ref), layer_ref = refs, None
    s, f, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    F = w_ref.shape[2] // 2
    n_chunks = x_ref.shape[1] // block_d // split
    first = j * n_chunks if split > 1 else 0
    gate = pl.ds(f * block_f, block_f)  # with `apart`: this program's columns of gate | up

    def run(start, cnt, load_w):
        # load_w(d) -> the weight blocks [BD, BF] of this program: (gate, up), or (one,)
        mine = (jnp.arange(rows) < cnt)[:, None]  # [R, 1]: rows past cnt are the next expert's
        if x_rows != "grouped":
            if pair_ref is None:  # identity: grouped row j is pair j
                p = (start + jnp.arange(rows))[:, None]  # [R, 1]
            else:
                p = pair_ref[pl.ds(start, rows)][:, None]
            tokens = _tokens(p, pairs)

        def body(i, acc):
            d0 = pl.multiple_of((first + i) * block_d, block_d)
            d = pl.ds(d0, block_d)
            if x_rows == "grouped":
                xs = plt.load(x_ref.at[pl.ds(start, rows), d], mask=mine, other=0)  # [R, BD]
            else:
                cols = (d0 + jnp.arange(block_d))[None, :]
                xs = plt.load(x_ref.at[tokens, cols], mask=mine, other=0)  # [R, BD]
            return tuple(
                a + jnp.dot(xs, w.astype(xs.dtype), preferred_element_type=jnp.float32)
                for a, w in zip(acc, load_w(d), strict=True)
            )

        zeros = jnp.zeros((rows, block_f), jnp.float32)
        acc = jax.lax.fori_loop(0, n_chunks, body, (zeros,) if apart else (zeros, zeros))
        rows_j = pl.ds(start, rows)
        if apart:
            plt.store(h_ref.at[j, rows_j, gate], acc[0], mask=mine)
        elif split > 1:
            plt.store(h_ref.at[j, rows_j, gate], acc[0], mask=mine)
            plt.store(h_ref.at[j, rows_j, pl.ds(F + f * block_f, block_f)], acc[1], mask=mine)
        else:
            act = (jax.nn.silu(acc[0]) * acc[1]).astype(h_ref.dtype)  # rounded as the ref
            plt.store(h_ref.at[rows_j, gate], act, mask=mine)

    if shared:
        u, n, m = shared
        layer, nf = layer_ref[0], sg_ref.shape[2] // block_f  # the shared expert's F blocks
        start, cnt = m + (s - u) * rows, jnp.minimum(rows, n - (s - u) * rows)

        @pl.when((s >= u) & (f < nf))
        def _shared():
            cols = lambda d: (sg_ref[layer, d, gate],)  # noqa: E731 (apart: gate alone)
            if not apart:
                cols = lambda d: (sg_ref[layer, d, gate], su_ref[layer, d, gate])  # noqa: E731
            run(start, cnt, cols)

        if apart:  # up's columns: program blocks F / block_f .. F / block_f + nf

            @pl.when((s >= u) & (f >= F // block_f) & (f < F // block_f + nf))
            def _shared_up():
                up = pl.ds((f - F // block_f) * block_f, block_f)
                run(start, cnt, lambda d: (su_ref[layer, d, up],))

    e, cnt, start = _tile(tile_ref, s)  # the shared tiles' slots are empty routed ones

    @pl.when(cnt > 0)
    def _routed():
        if apart:  # one block of the [2F] columns gate | up
            run(start, cnt, lambda d: (w_ref[e, d, gate],))
        else:
            up = pl.ds(F + f * block_f, block_f)
            run(start, cnt, lambda d: (w_ref[e, d, gate], w_ref[e, d, up]))


def _down_kernel(tile_ref, *refs, rows, block_dout, block_fin, scatter, shared, swiglu):
    # tile_ref as above  h_ref [P, F] silu(gate) * up  w_ref [E, F, D]
    # (swiglu = x's dtype: h_ref [P, 2F] holds the fp32 sums gate | up, and silu(gate) * up
    # is taken here as they are loaded, rounded to that dtype as gate_up would have)
    #   ->  y_ref [P, D] (fp32 or x's dtype); rows of other slots untouched. With
    # `scatter`, pair_ref [P] int32 first: each grouped row's result is stored at its pair's
    # row of y (token-major), not at its grouped row. With `shared` = (tile u, rows n, row m):
    # layer_ref [1] and sd_ref [L, Fs, D] last; tiles u, u + 1, .. reduce the shared rows' Fs
    # columns of h with it and store at rows m .. m + n, R rows each.
    pair_ref, refs = (refs[0], refs[1:]) if scatter else (None, refs)
    if shared:
        h_ref, w_ref, layer_ref, sd_ref, y_ref = refs
    else:
        h_ref, w_ref, y_ref = refs
    s, o = pl.program_id(0), pl.program_id(1)
    out = pl.ds(o * block_dout, block_dout)
    F = h_ref.shape[1] // 2 if swiglu else h_ref.shape[1]

    def reduce(start, cnt, width, load_w):
        mine = (jnp.arange(rows) < cnt)[:, None]  # [R, 1]

        def body(i, acc):
            f0 = pl.multiple_of(i * block_fin, block_fin)
            f, h_rows = pl.ds(f0, block_fin), pl.ds(start, rows)
            # Masked: h rows past the last slot's run were never written (uninitialised).
            hs = plt.load(h_ref.at[h_rows, f], mask=mine, other=0)  # [R, BFin]
            if swiglu:
                up = plt.load(h_ref.at[h_rows, pl.ds(F + f0, block_fin)], mask=mine, other=0)
                hs = (jax.nn.silu(hs) * up).astype(swiglu)
            return acc + jnp.dot(hs, load_w(f).astype(hs.dtype), preferred_element_type=jnp.float32)

        zeros = jnp.zeros((rows, block_dout), jnp.float32)
        acc = jax.lax.fori_loop(0, width // block_fin, body, zeros)
        return mine, acc.astype(y_ref.dtype)  # fp32 sums, rounded on store

    if shared:
        u, n, m = shared

        @pl.when(s >= u)
        def _shared():
            layer, start = layer_ref[0], m + (s - u) * rows
            cnt = jnp.minimum(rows, n - (s - u) * rows)
            mine, acc = reduce(start, cnt, sd_ref.shape[1], lambda f: sd_ref[layer, f, out])
            plt.store(y_ref.at[pl.ds(start, rows), out], acc, mask=mine)

    e, cnt, start = _tile(tile_ref, s)

    @pl.when(cnt > 0)
    def _routed():
        mine, acc = reduce(start, cnt, F, lambda f: w_ref[e, f, out])
        if scatter:
            pairs = pair_ref[pl.ds(start, rows)][:, None]  # [R, 1]
            cols = (o * block_dout + jnp.arange(block_dout))[None, :]
            plt.store(y_ref.at[pairs, cols], acc, mask=mine)
        else:
            plt.store(y_ref.at[pl.ds(start, rows), out], acc, mask=mine)


def _check_stack(w_gate_up, w_down, layer):
    """(L, per-layer shapes) of expert weights given whole ([E, ...]) or stacked over layers
    ([L, E, ...], with `layer`)."""
    stacked = w_gate_up.ndim == 4
    if stacked != (layer is not None) or (stacked and w_down.ndim != 4):
        raise ValueError(
            "w_gate_up / w_down stacked over layers ([L, E, ...], got shapes "
            f"{tuple(w_gate_up.shape)}, {tuple(w_down.shape)}) need `layer`, and only they do "
            f"(layer={'given' if layer is not None else None})"
        )
    if stacked and w_gate_up.shape[0] != w_down.shape[0]:
        raise ValueError(
            f"w_gate_up {tuple(w_gate_up.shape)} and w_down {tuple(w_down.shape)} must stack "
            "the same number of layers"
        )
    L = w_gate_up.shape[0] if stacked else 1
    return L, [jax.ShapeDtypeStruct(w.shape[stacked:], w.dtype) for w in (w_gate_up, w_down)]


def shared_tile_applies(F: int, Fs: int, blocks: MoEBlocks = MoEBlocks()) -> bool:
    """Whether `moe_experts_decode` can run a shared expert of width Fs beside routed experts
    of width F as extra tiles: Fs <= F and a multiple of the F blocks of both kernels."""
    BF = dot_block("block_f", blocks.block_f, F, "F")
    BFin = dot_block("block_fin", blocks.block_fin, F, "F")
    return 0 < Fs <= F and Fs % BF == 0 and Fs % BFin == 0


def _check_shared(shared, L, D, F, layer, blocks):
    """The shared expert's (w_gate [D, Fs], w_up [D, Fs], w_down [Fs, D]), each whole or
    stacked over the routed stack's L layers ([L, ...], with `layer`), as [L, ...] stacks
    (a reshape: no copy); ValueError unless the shapes match and `shared_tile_applies`."""
    w_gate, w_up, w_down = shared
    stacked = layer is not None and w_gate.ndim == 3
    lead = (L,) if stacked else ()
    Fs = w_gate.shape[-1]
    want = ((*lead, D, Fs), (*lead, D, Fs), (*lead, Fs, D))
    got = tuple(tuple(w.shape) for w in shared)
    if got != want or not shared_tile_applies(F, Fs, blocks):
        raise ValueError(
            f"shared (w_gate, w_up, w_down) must be {want} (stacked like the routed experts "
            f"or whole) with Fs <= F={F} and Fs a multiple of block_f and block_fin "
            f"({blocks.block_f}, {blocks.block_fin}, capped to F), got {got}"
        )
    return stacked, tuple(w if stacked else w[None] for w in shared)


def _grouped_experts(
    x,
    experts,
    w_gate_up,
    w_down,
    layer,
    group,
    rows,
    blocks,
    interpret,
    y_by_pair,
    out_dtype,
    shared=None,
):
    """Validate, group the pairs (`group(experts, E, rows, P, extra, offset)` -> pos, order,
    tiles: see `pallas_kernels.moe.grouping`), run the two kernels over the tiles of `rows`
    rows and return [N, k, D] in (token, slot) order (and the shared expert's [N, D] when
    `shared` is given), in out_dtype (down's fp32 sums rounded on store).

    The kernels see P = M + R grouped rows (R spare rows at the end, so that a run of R rows
    from any start stays inside; their loads and stores are masked; R * ceil(N / R) with the
    shared expert). gate_up reads x's rows by token through `order` (blocks.x_by_token), else
    from a grouped copy (one XLA gather). y_by_pair: down stores each row's result at its
    pair's row (token-major), else at its grouped row and one XLA gather puts the results
    back in pair order. A grouping that returns pos = order = None (`one_tile_per_pair`, up
    to `pair_tiles` tokens) needs neither: the grouped rows are already in pair order, and x
    is a broadcast of the one token or read by token.
    shared: ceil(N / R) more tiles, past the routed ones, run the shared expert on the N
    tokens, on the first spare rows (rows M .. M + N)."""
    L, per_layer = _check_stack(w_gate_up, w_down, layer)
    E, D, F = validate_moe_inputs(x, experts, *per_layer)
    if not jnp.issubdtype(jnp.dtype(out_dtype), jnp.floating):
        raise ValueError(f"out_dtype={out_dtype!r} must be a floating dtype (fp32 or x's dtype)")
    # one layer's experts are rows [layer * E, (layer + 1) * E) of the flattened stack (a
    # reshape of leading dims: no copy)
    w_gate_up = w_gate_up.reshape(L * E, D, 2 * F)
    w_down = w_down.reshape(L * E, F, D)
    BF = dot_block("block_f", blocks.block_f, F, "F")
    BD = dot_block("block_d", blocks.block_d, D, "D")
    BO = dot_block("block_dout", blocks.block_dout, D, "D")
    BFin = dot_block("block_fin", blocks.block_fin, F, "F")
    N, k = experts.shape
    M = N * k
    n_shared = 0 if shared is None else -(-N // rows)  # the shared expert's tiles
    P = M + rows * max(1, n_shared)
    layer_index = jnp.clip(jnp.asarray(0 if layer is None else layer, jnp.int32), 0, L - 1)
    offset = layer_index * E if layer is not None else 0
    pos, order, tiles = group(experts, E, rows, P, n_shared, offset)
    U = tiles.shape[0]
    extra = ()  # the shared expert's operands, after each kernel's own
    shared_tile = None
    if shared is not None:
        stacked, (sg, su, sd) = _check_shared(shared, L, D, F, layer, blocks)
        shared_layer = layer_index if stacked else jnp.zeros((), jnp.int32)
        # the table's last n_shared slots are empty routed ones: the shared expert's
        extra, shared_tile = (shared_layer.reshape(1),), (U - n_shared, N, M)
    identity = order is None  # grouped row j is pair j (token j // k)
    pairs = ()  # gate_up's pair_ref, where it reads x by token through the grouping
    if identity and N == 1 and blocks.broadcast_one_token:
        # (gate_up reading x's one row and broadcasting it in registers ran at half speed:
        # 22 vs 11 us per layer on the 80B at batch 1)
        x_rows, x_grouped, y_by_pair = "grouped", jnp.broadcast_to(x, (P, x.shape[1])), False
    elif identity:  # pair tiles: the rows' tokens are static, no copy of x at all
        x_rows, x_grouped, y_by_pair = "identity", x, False
    elif blocks.x_by_token:
        # gate_up reads x's rows by token. At one token reading by token was slower than the
        # broadcast (47 vs 40.5 us per call, grouped then).
        x_rows, x_grouped, pairs = "pairs", x, (order,)
    else:
        # a grouped copy by one gather, not a scatter of x into grouped order (a scatter
        # kernel was 10 us per layer at 64 tokens)
        x_rows = "grouped"
        x_grouped = jnp.take(x, _tokens(order, (M, k, N)), axis=0)
    # stored by pair: spare rows store to rows M, M + 1, ... (order's own indices there)
    y_rows = (order,) if y_by_pair else ()

    whole = pl.BlockSpec()  # the whole array: the kernels index their expert and rows by hand
    if not isinstance(blocks.split_d, int) or blocks.split_d < 1:
        raise ValueError(f"split_d={blocks.split_d!r} must be an integer >= 1")
    # the most parts, up to split_d, that divide the D / BD chunks evenly
    S = max(s for s in range(1, blocks.split_d + 1) if (D // BD) % s == 0)
    apart = bool(blocks.gate_up_apart)
    gate_up_extra = (*extra, sg, su) if shared is not None else ()
    h_grouped = pl.pallas_call(
        functools.partial(
            _gate_up_kernel,
            rows=rows,
            block_f=BF,
            block_d=BD,
            split=S,
            apart=apart,
            shared=shared_tile,
            x_rows=x_rows,
            pairs=(M, k, N),
        ),
        grid=(U, (2 if apart else 1) * F // BF, S),
        in_specs=[whole] * (1 + len(pairs) + 2 + len(gate_up_extra)),
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((P, F), x.dtype)
        if S == 1 and not apart
        else jax.ShapeDtypeStruct((S, P, 2 * F), jnp.float32),
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="moe_gate_up",
    )(tiles, *pairs, x_grouped, w_gate_up, *gate_up_extra)
    swiglu = None  # down applies SwiGLU to gate_up's fp32 sums (one part, apart)
    if S > 1:  # the parts' sums, then SwiGLU rounded to x's dtype as in the kernel
        gu = jnp.sum(h_grouped, axis=0)
        h_grouped = (jax.nn.silu(gu[:, :F]) * gu[:, F:]).astype(x.dtype)
    elif apart:
        h_grouped, swiglu = h_grouped[0], x.dtype  # [P, 2F]: a reshape, no copy
    down_extra = (*extra, sd) if shared is not None else ()
    y_out = pl.pallas_call(
        functools.partial(
            _down_kernel,
            rows=rows,
            block_dout=BO,
            block_fin=BFin,
            scatter=y_by_pair,
            shared=shared_tile,
            swiglu=swiglu,
        ),
        grid=(U, D // BO),
        in_specs=[whole] * (1 + len(y_rows) + 2 + len(down_extra)),
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((P, D), out_dtype),
        compiler_params=compiler_params(
            blocks.down_warps or blocks.num_warps, blocks.down_stages or blocks.num_stages
        ),
        interpret=interpret,
        name="moe_down",
    )(tiles, *y_rows, h_grouped, w_down, *down_extra)

    here = (experts >= 0) & (experts < E)
    if y_by_pair or identity:
        y = y_out[:M]
    else:
        # The gather back to pair order: a pair of another device's expert reads spare row M
        # (every such pair the same row, from L2) rather than a row of its own, so only this
        # device's pairs' rows come from memory (half of them with 2-way expert parallelism).
        y = y_out[jnp.where(here.reshape(-1), pos, M)]
    y = y.reshape(N, k, D)  # pair order
    # Rows of ids not on this device were never written (uninitialised memory): zero them.
    y = jnp.where(here[..., None], y, jnp.zeros((), y.dtype))
    return y if shared is None else (y, y_out[M : M + N])


@functools.partial(jax.jit, static_argnames=("interpret", "blocks", "out_dtype"))
def moe_experts_decode(
    x,
    experts,
    w_gate_up,
    w_down,
    layer=None,
    *,
    shared=None,
    interpret=False,
    blocks: MoEBlocks = MoEBlocks(),
    out_dtype=jnp.float32,
):
    """Routed experts of a few tokens (N <= 64), reading each touched expert's weights once:
    tiles of up to `decode_tile_rows` rows of one touched expert (or one tile per (token,
    slot) pair, up to `pair_tiles` tokens); optionally the shared expert as more tiles.

    Args:
      x: [N, D] bf16 or fp32.
      experts: [N, k] int ids; an id outside [0, E) (an expert on another device) gives a zero
        row. The ids of one token must be distinct (top-k routing).
      w_gate_up: [E, D, 2F] (gate | up); w_down: [E, F, D]; cast to x's dtype in the kernels.
        Or stacked over layers, [L, E, D, 2F] and [L, E, F, D], with `layer` (an int32
        scalar, may be traced) picking one: the kernels index the stack directly. Inside a
        scan over layers this matters: a per-layer slice as a kernel operand is a copy
        (XLA cannot hand a slice of a buffer to a custom call), i.e. every layer's local
        experts, all of them, copied every step.
      shared: the shared expert's (w_gate [D, Fs], w_up [D, Fs], w_down [Fs, D]), whole or
        stacked over the same layers ([L, ...]); Fs <= F, a multiple of the F blocks
        (`shared_tile_applies`). Its tiles run beside the routed ones in both kernels, so
        the layer's shared expert costs no launches of its own.
      out_dtype: the results' dtype: fp32 (the default), or x's dtype to round each
        (token, slot) result as the transformers model does before the routing weights
        apply (half the bytes down writes and the caller's combine reads back).
    Returns:
      h [N, k, D] in out_dtype: (silu(x @ Wg) * (x @ Wu)) @ Wd per (token, slot), as
      `moe_experts_decode_ref` (products in x's dtype, fp32 sums, silu * up rounded to x's
      dtype). The caller applies the routing weights and sums over k. With `shared`, the
      pair (h, h_shared [N, D]), h_shared the shared expert's output computed the same way
      (the caller applies its gate).
    """
    N, k = experts.shape
    if not 1 <= N <= MAX_TOKENS or k < 1:
        raise ValueError(
            f"experts must be [N, k] with 1 <= N <= {MAX_TOKENS} tokens and k >= 1, got "
            f"{tuple(experts.shape)} (decode kernel: next_pow2(N) rows per expert program; "
            "more tokens: moe_experts_prefill)"
        )
    R = max(MIN_DOT, pl.next_power_of_2(N))
    by_pair = blocks.y_by_pair[0] <= N <= blocks.y_by_pair[1]
    if N <= blocks.pair_tiles:
        group = one_tile_per_pair
    else:
        cap = blocks.decode_tile_rows
        if not isinstance(cap, int) or cap < MIN_DOT or cap & (cap - 1):
            raise ValueError(f"decode_tile_rows={cap!r} must be a power of 2 >= {MIN_DOT}")
        R = min(R, cap)
        group = group_by_expert
    return _grouped_experts(
        x,
        experts,
        w_gate_up,
        w_down,
        layer,
        group,
        R,
        blocks,
        interpret,
        by_pair,
        out_dtype,
        shared,
    )


@functools.partial(jax.jit, static_argnames=("interpret", "blocks", "out_dtype"))
def moe_experts_prefill(
    x,
    experts,
    w_gate_up,
    w_down,
    layer=None,
    *,
    interpret=False,
    blocks: MoEBlocks = PREFILL_BLOCKS,
    out_dtype=jnp.float32,
):
    """Routed experts of any number of tokens as a grouped matmul: the pairs sorted by expert,
    each expert's run cut into tiles of blocks.block_m rows. Arguments and result as
    `moe_experts_decode`, with any N >= 1."""
    if experts.ndim != 2 or experts.shape[0] < 1 or experts.shape[1] < 1:
        raise ValueError(f"experts must be [N, k] with N, k >= 1, got {tuple(experts.shape)}")
    BM = blocks.block_m
    if BM < MIN_DOT or BM & (BM - 1):
        raise ValueError(f"block_m={BM} must be a power of 2 >= {MIN_DOT}")
    group = group_by_sort
    by_pair = blocks.prefill_y_by_pair
    return _grouped_experts(
        x, experts, w_gate_up, w_down, layer, group, BM, blocks, interpret, by_pair, out_dtype
    )
