"""Routed experts for decode (N <= 64 tokens) as two grouped Pallas (Triton backend) kernels.

Decode is bound by reading expert weights: one expert is 3 * D * F bf16 values (6 MiB at
D=2048, F=512), and N tokens touch at most min(E, N * k) of the E experts. Outside the kernels
(a few small XLA ops) the N * k (token, slot) pairs are grouped by expert, so each expert's
rows are one contiguous run, and each touched expert gets a slot. Kernel 1 (gate_up + SwiGLU)
has a program per (slot, block_f columns of F), kernel 2 (down) one per (slot, block_dout
columns of D). A program streams its slice of the expert's weights from HBM once and
multiplies it with all of that expert's rows (R = next power of two >= N, at least 16, the
smallest tl.dot shape, of which the rows past the expert's count are masked); an empty slot
(more slots than touched experts) reads its count and exits. Untouched experts are never read.
Bytes: 3 * D * F * 2 per touched expert plus the activations (N * k rows, re-read from L2 by
each column block): N = 1, k = 10 touches 10 experts, 60 MiB, 14.6 us at 4.3 TB/s.

H200, bf16, E=512, k=10, per call inside a jitted loop: N=1 40 us (the two kernels 15 + 11 us,
the rest the grouping ops and launches) vs 64 us for the XLA gather of the touched experts;
N=16 243 vs 660 us (floor 208); N=64 621 vs 2542 us (floor 533).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.moe.reference import validate_moe_inputs

MAX_TOKENS = 64  # R = 64 rows held per program; larger batches belong to a grouped matmul
_MIN_ROWS = 16  # tl.dot needs every operand dimension >= 16


@dataclasses.dataclass(frozen=True)
class MoEBlocks:
    """Block sizes (powers of 2 >= 16; each is capped at the largest power of 2 dividing its
    dimension). block_f: F columns of gate and of up per gate_up program; block_d: the D chunk
    of the gate_up reduction; block_dout: D columns per down program; block_fin: the F chunk
    of the down reduction. Defaults from an H200 sweep (E=512, D=2048, F=512, k=10, bf16):
    block_f=64 reads 128-byte pieces of each [2F] weight row (32: 64 B, about 10% slower at
    N=1); 4 stages keep loads in flight (the rows of a 64-token batch still fit in shared
    memory); splitting D across programs gained nothing at N=1, so there is no split."""

    block_f: int = 64
    block_d: int = 128
    block_dout: int = 128
    block_fin: int = 128
    num_warps: int = 4
    num_stages: int = 4


def _compiler_params(blocks: MoEBlocks):
    try:
        return plt.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    except AttributeError:  # pragma: no cover - older / newer jax
        return None


def _gate_up_kernel(
    expert_ref, count_ref, start_ref, x_ref, w_ref, h_ref, *, rows, block_f, block_d
):
    # expert_ref, count_ref, start_ref [U] int32: slot s runs expert e on the grouped rows
    #   [start, start + cnt) (cnt = 0: an empty slot)
    # x_ref [M + R, D] grouped rows (R zero rows of padding)  w_ref [E, D, 2F] gate | up
    # out: h_ref [M + R, F] silu(gate) * up in x's dtype; rows of other slots left untouched
    s, f = pl.program_id(0), pl.program_id(1)
    e, cnt, start = expert_ref[s], count_ref[s], start_ref[s]
    F = h_ref.shape[1]

    @pl.when(cnt > 0)
    def _run():
        mine = (jnp.arange(rows) < cnt)[:, None]  # [R, 1]: rows past cnt are the next expert's
        gate = pl.ds(f * block_f, block_f)
        up = pl.ds(F + f * block_f, block_f)

        def body(i, acc):
            d = pl.ds(pl.multiple_of(i * block_d, block_d), block_d)
            xs = plt.load(x_ref.at[pl.ds(start, rows), d], mask=mine, other=0)  # [R, BD]
            wg = w_ref[e, d, gate].astype(xs.dtype)  # [BD, BF]
            wu = w_ref[e, d, up].astype(xs.dtype)
            acc_g, acc_u = acc
            acc_g += jnp.dot(xs, wg, preferred_element_type=jnp.float32)
            acc_u += jnp.dot(xs, wu, preferred_element_type=jnp.float32)
            return acc_g, acc_u

        zeros = jnp.zeros((rows, block_f), jnp.float32)
        n_chunks = x_ref.shape[1] // block_d
        acc_g, acc_u = jax.lax.fori_loop(0, n_chunks, body, (zeros, zeros))
        act = (jax.nn.silu(acc_g) * acc_u).astype(h_ref.dtype)  # [R, BF], rounded as the ref
        plt.store(h_ref.at[pl.ds(start, rows), gate], act, mask=mine)


def _down_kernel(
    expert_ref, count_ref, start_ref, h_ref, w_ref, y_ref, *, rows, block_dout, block_fin
):
    # expert_ref, count_ref, start_ref [U] int32 as above  h_ref [M + R, F] silu(gate) * up
    # w_ref [E, F, D]  ->  y_ref [M + R, D] fp32; rows of other slots untouched
    s, o = pl.program_id(0), pl.program_id(1)
    e, cnt, start = expert_ref[s], count_ref[s], start_ref[s]
    out = pl.ds(o * block_dout, block_dout)

    @pl.when(cnt > 0)
    def _run():
        mine = (jnp.arange(rows) < cnt)[:, None]  # [R, 1]

        def body(i, acc):
            f = pl.ds(pl.multiple_of(i * block_fin, block_fin), block_fin)
            # Masked: h rows past the last slot's run were never written (uninitialised).
            hs = plt.load(h_ref.at[pl.ds(start, rows), f], mask=mine, other=0)  # [R, BFin]
            wd = w_ref[e, f, out].astype(hs.dtype)  # [BFin, BO]
            return acc + jnp.dot(hs, wd, preferred_element_type=jnp.float32)

        n_chunks = h_ref.shape[1] // block_fin
        acc = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((rows, block_dout), jnp.float32))
        plt.store(y_ref.at[pl.ds(start, rows), out], acc, mask=mine)


def _block(name: str, want: int, dim: int, dim_name: str) -> int:
    """want capped at the largest power of 2 dividing dim; ValueError if not a legal block."""
    if want < 1 or want & (want - 1):
        raise ValueError(f"{name}={want} must be a power of 2")
    b = min(want, dim & -dim)
    if b < _MIN_ROWS:
        raise ValueError(
            f"{name}: {dim_name}={dim} must be a multiple of {_MIN_ROWS} (the smallest "
            f"tl.dot shape); a block of {b} would divide it"
        )
    return b


def _group_by_expert(x, experts, E: int, R: int):
    """The (token, slot) pairs grouped by expert, by compare-and-count over the M = N * k <= 640
    pairs (no sort: a few fused XLA ops; argsort + bincount + nonzero were 15 us slower at N=1).

    Returns pos [M] (a permutation: the grouped row of each pair, ids outside [0, E) last);
    slots = (expert, count, start) [U] int32, U = min(E, M): the touched experts in increasing
    order, then empty slots of count 0; x_grouped [M + R, D] (R zero rows at the end, so a run
    of R rows from any start stays inside the array)."""
    N, k = experts.shape
    M, U = N * k, min(E, N * k)
    flat = experts.reshape(-1).astype(jnp.int32)
    ids = jnp.where((flat >= 0) & (flat < E), flat, E)  # [M]; E: not here, grouped last
    counts = jnp.sum(ids == jnp.arange(E + 1)[:, None], axis=1, dtype=jnp.int32)  # [E + 1]
    starts = jnp.cumsum(counts) - counts  # [E + 1]
    same_before = jnp.tril(ids[:, None] == ids[None, :], -1)  # [M, M]: same id, earlier pair
    pos = starts[ids] + jnp.sum(same_before, axis=1, dtype=jnp.int32)  # stable within an id
    x_grouped = jnp.zeros((M + R, x.shape[1]), x.dtype).at[pos].set(x[jnp.arange(M) // k])
    # Slot u runs the (u+1)-th touched expert: the number of experts e with at most u touched
    # experts in 0..e (E when fewer than u + 1 are touched: an empty slot).
    n_touched = jnp.cumsum(counts[:E] > 0)  # [E]
    expert = jnp.sum(n_touched <= jnp.arange(U)[:, None], axis=1, dtype=jnp.int32)  # [U]
    count = jnp.where(expert < E, counts[expert], 0)
    expert = jnp.minimum(expert, E - 1)
    return pos, (expert, count, starts[expert]), x_grouped


@functools.partial(jax.jit, static_argnames=("interpret", "blocks"))
def moe_experts_decode(
    x,
    experts,
    w_gate_up,
    w_down,
    layer=None,
    *,
    interpret=False,
    blocks: MoEBlocks = MoEBlocks(),
):
    """Routed experts of a few tokens, reading each touched expert's weights once.

    Args:
      x: [N, D] bf16 or fp32, N <= MAX_TOKENS (64).
      experts: [N, k] int ids; an id outside [0, E) (an expert on another device) gives a zero
        row. The ids of one token must be distinct (top-k routing): an expert runs at most R
        rows, R = next power of two >= N.
      w_gate_up: [E, D, 2F] (gate | up); w_down: [E, F, D]; cast to x's dtype in the kernels.
        Or stacked over layers, [L, E, D, 2F] and [L, E, F, D], with `layer` (an int32
        scalar, may be traced) picking one: the kernels index the stack directly. Inside a
        scan over layers this matters: a per-layer slice as a kernel operand is a copy
        (XLA cannot hand a slice of a buffer to a custom call), i.e. every layer's local
        experts, all of them, copied every step.
    Returns:
      h [N, k, D] fp32: (silu(x @ Wg) * (x @ Wu)) @ Wd per (token, slot), as
      `moe_experts_decode_ref` (products in x's dtype, fp32 sums, silu * up rounded to x's
      dtype). The caller applies the routing weights and sums over k.
    """
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
    per_layer = [jax.ShapeDtypeStruct(w.shape[stacked:], w.dtype) for w in (w_gate_up, w_down)]
    E, D, F = validate_moe_inputs(x, experts, *per_layer)
    # one layer's experts are rows [layer * E, (layer + 1) * E) of the flattened stack (a
    # reshape of leading dims: no copy)
    w_gate_up = w_gate_up.reshape(L * E, D, 2 * F)
    w_down = w_down.reshape(L * E, F, D)
    N, k = experts.shape
    if not 1 <= N <= MAX_TOKENS or k < 1:
        raise ValueError(
            f"experts must be [N, k] with 1 <= N <= {MAX_TOKENS} tokens and k >= 1, got "
            f"{tuple(experts.shape)} (decode kernel: next_pow2(N) rows per expert program)"
        )
    BF = _block("block_f", blocks.block_f, F, "F")
    BD = _block("block_d", blocks.block_d, D, "D")
    BO = _block("block_dout", blocks.block_dout, D, "D")
    BFin = _block("block_fin", blocks.block_fin, F, "F")
    R = max(_MIN_ROWS, pl.next_power_of_2(N))
    M = N * k
    pos, slots, x_grouped = _group_by_expert(x, experts, E, R)
    if stacked:
        offset = jnp.clip(jnp.asarray(layer, jnp.int32), 0, L - 1) * E
        slots = (slots[0] + offset, *slots[1:])
    U = slots[0].shape[0]

    whole = pl.BlockSpec()  # the whole array: the kernels index their expert and rows by hand
    h_grouped = pl.pallas_call(
        functools.partial(_gate_up_kernel, rows=R, block_f=BF, block_d=BD),
        grid=(U, F // BF),
        in_specs=[whole] * 5,
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((M + R, F), x.dtype),
        compiler_params=_compiler_params(blocks),
        interpret=interpret,
        name="moe_gate_up",
    )(*slots, x_grouped, w_gate_up)
    y_grouped = pl.pallas_call(
        functools.partial(_down_kernel, rows=R, block_dout=BO, block_fin=BFin),
        grid=(U, D // BO),
        in_specs=[whole] * 5,
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((M + R, D), jnp.float32),
        compiler_params=_compiler_params(blocks),
        interpret=interpret,
        name="moe_down",
    )(*slots, h_grouped, w_down)

    y = y_grouped[pos].reshape(N, k, D)  # back to (token, slot) order
    here = (experts >= 0) & (experts < E)
    # Rows of ids not on this device were never written (uninitialised memory): zero them.
    return jnp.where(here[..., None], y, 0.0)
