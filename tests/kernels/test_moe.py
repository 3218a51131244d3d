"""Pallas MoE (grouped gate_up + down; decode and prefill tilings) vs the pure-jnp reference.

Small experts (D=64..128, F=32..64, E=8..16) keep the interpret-mode runs quick; the cases cover
one token, odd token counts, N > 16 (grouped, tiles of 16 rows) with all tokens on one expert
(a run of 17 rows: two tiles), neighbouring runs kept apart, results stored by pair or gathered
back, x read by token or copied, ids of experts on another device (== E, or negative), bf16
and fp32, weights stored in another dtype than x, and the contract violations.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import INTERPRET, TOL, rel_err, run

from pallas_kernels.moe import (
    MoEBlocks,
    moe_experts_decode,
    moe_experts_decode_ref,
    moe_experts_prefill,
    shared_expert_ref,
    shared_tile_applies,
)

# Blocks below the 64-wide test dimensions, so every program loops over several chunks.
SMALL = MoEBlocks(block_f=16, block_d=32, block_dout=32, block_fin=16)


def moe_inputs(N, k, E, D, F, dtype, seed=0, off_device=0.0, w_dtype=None):
    """x [N, D], experts [N, k] (distinct per token; a fraction off_device set to E, i.e. held
    by another device), w_gate_up [E, D, 2F], w_down [E, F, D] scaled to unit-size outputs."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((N, D)), dtype)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(N)])
    ids[rng.random((N, k)) < off_device] = E
    w_gate_up = rng.standard_normal((E, D, 2 * F)) * D**-0.5
    w_down = rng.standard_normal((E, F, D)) * F**-0.5
    w_dtype = w_dtype or dtype
    return (
        x,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(w_gate_up, w_dtype),
        jnp.asarray(w_down, w_dtype),
    )


def shared_inputs(D, Fs, dtype, seed):
    """The shared expert's w_gate, w_up [D, Fs] and w_down [Fs, D], unit-size outputs."""
    rng = np.random.default_rng(seed)
    sg, su = (jnp.asarray(rng.standard_normal((D, Fs)) * D**-0.5, dtype) for _ in range(2))
    return sg, su, jnp.asarray(rng.standard_normal((Fs, D)) * Fs**-0.5, dtype)


def _kernel(x, experts, w_gate_up, w_down, blocks=SMALL):
    return run(
        moe_experts_decode, x, experts, w_gate_up, w_down, interpret=INTERPRET, blocks=blocks
    )


# fp32: the kernel and the reference compute the same fp32 products and differ only in the
# order of the sums (interpret mode) -> TOL 1e-5; TF32 products on the GPU -> 5e-3.
# bf16: products are exact in fp32 on both sides, but silu * up is rounded to bf16 after sums
# taken in a different order, so an element can land one bf16 ulp (2^-8) apart -> 2e-2.
@pytest.mark.parametrize(
    "N, k, E, D, F, dtype, off_device",
    [
        (1, 4, 8, 64, 32, jnp.float32, 0.0),
        (3, 2, 16, 128, 64, jnp.bfloat16, 0.0),
        (8, 4, 8, 64, 64, jnp.float32, 0.3),
        (17, 3, 8, 64, 32, jnp.bfloat16, 0.2),  # N > 16: grouped, tiles of 16 rows
    ],
)
def test_matches_reference(N, k, E, D, F, dtype, off_device):
    args = moe_inputs(N, k, E, D, F, dtype, seed=N + k, off_device=off_device)
    h = _kernel(*args)
    h_ref = run(moe_experts_decode_ref, *args)
    assert h.shape == (N, k, D) and h.dtype == jnp.float32
    assert rel_err(h, h_ref) < TOL[dtype]


@pytest.mark.parametrize("y_by_pair, x_by_token", [((0, 0), True), ((1, 32), False)])
def test_results_by_pair_or_gathered_agree(y_by_pair, x_by_token):
    """Both decode result paths: stored at their grouped rows (then gathered) or at their
    pairs' rows; x read by token or from a grouped copy (17 tokens, foreign ids among them)."""
    args = moe_inputs(17, 3, 8, 64, 32, jnp.float32, seed=9, off_device=0.2)
    blocks = dataclasses.replace(SMALL, y_by_pair=y_by_pair, x_by_token=x_by_token)
    h = _kernel(*args, blocks=blocks)
    assert rel_err(h, run(moe_experts_decode_ref, *args)) < TOL[jnp.float32]


@pytest.mark.parametrize(
    "N, pair_tiles, broadcast", [(1, 0, True), (1, 1, True), (1, 1, False), (5, 8, True)]
)
def test_pair_tiles_or_grouped(N, pair_tiles, broadcast):
    """Each pair its own tile (one token, its row broadcast or loaded by the kernel; five
    tokens sharing experts), or the general grouping; foreign ids (== E, negative) among
    them give zero rows either way, with the weights stacked."""
    x, experts, w_gate_up, w_down = moe_inputs(N, 4, 8, 64, 32, jnp.float32, seed=4)
    experts = experts.at[0, 1].set(8).at[0, 3].set(-1)
    stack_gu, stack_d = jnp.stack([w_gate_up * 0.5, w_gate_up]), jnp.stack([w_down, w_down])
    blocks = dataclasses.replace(SMALL, pair_tiles=pair_tiles, broadcast_one_token=broadcast)
    h = run(
        moe_experts_decode, x, experts, stack_gu, stack_d, 1, interpret=INTERPRET, blocks=blocks
    )
    assert np.all(np.asarray(h)[0, [1, 3]] == 0.0)
    assert rel_err(h, run(moe_experts_decode_ref, x, experts, w_gate_up, w_down)) < TOL[jnp.float32]


@pytest.mark.parametrize("N", [1, 5])
def test_gate_up_reduction_split_across_programs(N):
    """split_d: gate_up's D reduction in parts summed by XLA (D=128, block_d=32: 4 chunks in 2
    parts; asked for 3, the most that divide: 2), one token's tiles and grouped tiles, foreign
    ids among them."""
    args = moe_inputs(N, 3, 8, 128, 32, jnp.float32, seed=11, off_device=0.3)
    want = run(moe_experts_decode_ref, *args)
    for split in (2, 3):  # 3 does not divide the 4 chunks: 2 parts
        h = _kernel(*args, blocks=dataclasses.replace(SMALL, split_d=split))
        assert rel_err(h, want) < TOL[jnp.float32]
    with pytest.raises(ValueError, match="split_d=0 must be an integer >= 1"):
        _kernel(*args, blocks=dataclasses.replace(SMALL, split_d=0))


@pytest.mark.parametrize(
    "N, pair_tiles, y_by_pair, split_d, stacked, dtype",
    [
        (1, 1, (2, 8), 1, True, jnp.float32),  # one tile per pair
        (6, 8, (2, 8), 1, True, jnp.float32),  # one tile per pair, six tokens
        (1, 0, (0, 0), 1, False, jnp.float32),  # grouped, gathered back
        (5, 0, (2, 8), 1, True, jnp.bfloat16),  # stored by pair
        (17, 0, (0, 0), 2, True, jnp.float32),  # two shared tiles, gate_up split in parts
        (3, 0, (2, 8), 1, "routed only", jnp.float32),  # a whole shared expert, layer 1
    ],
)
def test_shared_expert_as_an_extra_tile(N, pair_tiles, y_by_pair, split_d, stacked, dtype):
    """The shared expert (Fs = 32 < F = 64) as one more tile of both kernels: the routed
    result unchanged, the shared one equal to its reference, for each way of grouping the rows
    and storing the results; stacked weights read at the layer (the shared expert's may be
    one layer's while the routed ones are stacked)."""
    x, experts, w_gate_up, w_down = moe_inputs(N, 3, 8, 64, 64, dtype, seed=N, off_device=0.3)
    sg, su, sd = shared_inputs(64, 32, dtype, seed=N + 1)
    blocks = dataclasses.replace(SMALL, pair_tiles=pair_tiles, y_by_pair=y_by_pair, split_d=split_d)
    args, shared, layer = (x, experts, w_gate_up, w_down), (sg, su, sd), None
    if stacked:  # layer 1 of 2; the other layer's weights differ
        args = (x, experts, jnp.stack([w_gate_up * 0.5, w_gate_up]), jnp.stack([w_down] * 2))
        layer = 1
        if stacked is True:
            shared = tuple(jnp.stack([-w, w]) for w in shared)
    h, h_shared = run(
        moe_experts_decode, *args, layer, shared=shared, interpret=INTERPRET, blocks=blocks
    )
    assert h.shape == (N, 3, 64) and h_shared.shape == (N, 64) and h_shared.dtype == jnp.float32
    assert rel_err(h, run(moe_experts_decode_ref, x, experts, w_gate_up, w_down)) < TOL[dtype]
    assert rel_err(h_shared, run(shared_expert_ref, x, sg, su, sd)) < TOL[dtype]


@pytest.mark.parametrize("N, split_d, dtype", [(1, 1, jnp.bfloat16), (17, 2, jnp.float32)])
def test_gate_and_up_apart_equal_the_fused_kernel(N, split_d, dtype):
    """gate_up_apart: gate's and up's columns in programs of their own, SwiGLU applied by down
    as it loads their fp32 sums (split_d 1) or by XLA after adding the parts (2). With the
    shared expert's tiles (Fs = 32 < F = 64) and foreign ids: equal to the fused kernel's
    results (the same sums in the same order) and to the references."""
    x, experts, w_gate_up, w_down = moe_inputs(N, 3, 8, 64, 64, dtype, seed=N, off_device=0.3)
    sg, su, sd = shared_inputs(64, 32, dtype, seed=N + 2)
    outs = []
    for apart in (False, True):
        blocks = dataclasses.replace(SMALL, split_d=split_d, gate_up_apart=apart, down_stages=2)
        outs.append(
            run(
                moe_experts_decode,
                x,
                experts,
                w_gate_up,
                w_down,
                shared=(sg, su, sd),
                interpret=INTERPRET,
                blocks=blocks,
            )
        )
    (h_fused, s_fused), (h, h_shared) = outs
    if INTERPRET:  # on the GPU the two programs' dot tilings may round differently
        assert np.array_equal(np.asarray(h), np.asarray(h_fused))
        assert np.array_equal(np.asarray(h_shared), np.asarray(s_fused))
    assert rel_err(h, run(moe_experts_decode_ref, x, experts, w_gate_up, w_down)) < TOL[dtype]
    assert rel_err(h_shared, run(shared_expert_ref, x, sg, su, sd)) < TOL[dtype]


def test_shared_expert_contract():
    x, experts, w_gate_up, w_down = moe_inputs(2, 2, 8, 64, 32, jnp.float32)
    w = jnp.zeros((64, 48), x.dtype)  # Fs = 48 > F = 32
    with pytest.raises(ValueError, match="Fs <= F=32"):
        moe_experts_decode(
            x, experts, w_gate_up, w_down, shared=(w, w, w.T), interpret=INTERPRET, blocks=SMALL
        )
    assert shared_tile_applies(64, 32, SMALL) and not shared_tile_applies(32, 48, SMALL)
    assert not shared_tile_applies(64, 24, SMALL)  # not a multiple of block_f = 16


def test_off_device_ids_give_zero_rows():
    """Ids == E (another device's expert) and any id outside [0, E) give exact zero rows."""
    x, experts, w_gate_up, w_down = moe_inputs(5, 3, 8, 64, 32, jnp.float32, seed=1)
    E = w_gate_up.shape[0]
    experts = experts.at[0, :].set(E).at[2, 1].set(-1).at[4, 2].set(E + 7)
    h = _kernel(x, experts, w_gate_up, w_down)
    off = np.asarray((experts < 0) | (experts >= E))
    assert np.all(np.asarray(h)[off] == 0.0)
    assert np.all(np.abs(np.asarray(h)[~off]).max(axis=-1) > 0)
    assert rel_err(h, run(moe_experts_decode_ref, x, experts, w_gate_up, w_down)) < TOL[jnp.float32]
    all_off = _kernel(x, jnp.full_like(experts, E), w_gate_up, w_down)
    assert np.all(np.asarray(all_off) == 0.0)


def test_all_tokens_on_one_expert():
    """17 tokens share expert 3 in slot 0: one run of 17 rows, cut into tiles of 16 and 1."""
    x, experts, w_gate_up, w_down = moe_inputs(17, 2, 8, 64, 32, jnp.float32, seed=2)
    experts = experts.at[:, 0].set(3)
    experts = experts.at[:, 1].set(jnp.where(experts[:, 1] == 3, 5, experts[:, 1]))
    h = _kernel(x, experts, w_gate_up, w_down)
    assert rel_err(h, run(moe_experts_decode_ref, x, experts, w_gate_up, w_down)) < TOL[jnp.float32]
    # The shared expert's rows equal each token run alone (no row leaks into its neighbour).
    h1 = _kernel(x[5:6], experts[5:6], w_gate_up, w_down)
    assert rel_err(h[5], h1[0]) < TOL[jnp.float32]


@pytest.mark.parametrize("y_by_pair", [(0, 0), (1, 64)])
def test_tiles_capped_below_the_batch(y_by_pair):
    """decode_tile_rows=16 under 40 tokens (R would be 64): expert 3 in every token's slot 0
    takes three tiles (16 + 16 + 8 rows), the shared expert's 40 rows three more; results
    gathered back or stored by pair, foreign ids among them, weights stacked."""
    x, experts, w_gate_up, w_down = moe_inputs(40, 3, 8, 64, 64, jnp.float32, seed=7)
    experts = experts.at[:, 0].set(3)
    experts = experts.at[:, 1:].set(jnp.where(experts[:, 1:] == 3, 8, experts[:, 1:]))
    rng = np.random.default_rng(8)
    sg, su = (jnp.asarray(rng.standard_normal((2, 64, 32)) * 0.125, x.dtype) for _ in range(2))
    sd = jnp.asarray(rng.standard_normal((2, 32, 64)) * 32**-0.5, x.dtype)
    blocks = dataclasses.replace(SMALL, decode_tile_rows=16, y_by_pair=y_by_pair)
    stack_gu, stack_d = jnp.stack([w_gate_up * 0.5, w_gate_up]), jnp.stack([w_down] * 2)
    h, h_shared = run(
        moe_experts_decode,
        x,
        experts,
        stack_gu,
        stack_d,
        1,
        shared=(sg, su, sd),
        interpret=INTERPRET,
        blocks=blocks,
    )
    assert np.all(np.asarray(h)[np.asarray(experts) == 8] == 0.0)
    assert rel_err(h, run(moe_experts_decode_ref, x, experts, w_gate_up, w_down)) < TOL[jnp.float32]
    assert rel_err(h_shared, run(shared_expert_ref, x, sg[1], su[1], sd[1])) < TOL[jnp.float32]
    with pytest.raises(ValueError, match="decode_tile_rows=24 must be a power of 2 >= 16"):
        moe_experts_decode(
            x,
            experts,
            w_gate_up,
            w_down,
            interpret=INTERPRET,
            blocks=dataclasses.replace(SMALL, decode_tile_rows=24),
        )


def test_bf16_weights_fp32_activations_and_default_blocks():
    """Weights stored in bf16 are cast to x's dtype; default blocks capped to small D and F."""
    args = moe_inputs(3, 2, 8, 64, 32, jnp.float32, seed=4, w_dtype=jnp.bfloat16)
    h = _kernel(*args, blocks=MoEBlocks())
    assert rel_err(h, run(moe_experts_decode_ref, *args)) < TOL[jnp.float32]


def test_matches_model_gather_formula():
    """Within bf16 rounding of the XLA gather path of the model (qnext_jax.ops._expert_gather:
    gate_up rounded to bf16 before SwiGLU), which this kernel replaces."""
    x, experts, w_gate_up, w_down = moe_inputs(4, 3, 8, 64, 32, jnp.bfloat16, seed=5)
    gu = jnp.einsum("nd,nkdf->nkf", x, w_gate_up[experts])
    gate, up = jnp.split(gu, 2, axis=-1)
    want = jnp.einsum("nkf,nkfd->nkd", jax.nn.silu(gate) * up, w_down[experts])
    assert rel_err(_kernel(x, experts, w_gate_up, w_down), want) < TOL[jnp.bfloat16]


def test_contract_violations_raise():
    x, experts, w_gate_up, w_down = moe_inputs(2, 2, 8, 64, 32, jnp.float32)
    kw = dict(interpret=INTERPRET)
    with pytest.raises(ValueError, match="x must have rank 2"):
        moe_experts_decode(x[0], experts, w_gate_up, w_down, **kw)
    with pytest.raises(ValueError, match="experts must be"):  # N mismatch
        moe_experts_decode(x, experts[:1], w_gate_up, w_down, **kw)
    with pytest.raises(ValueError, match="w_gate_up must be"):  # D mismatch
        moe_experts_decode(x[:, :32], experts, w_gate_up, w_down, **kw)
    with pytest.raises(ValueError, match="w_down must be"):
        moe_experts_decode(x, experts, w_gate_up, w_down[:, :16], **kw)
    with pytest.raises(ValueError, match="integer"):
        moe_experts_decode(x, experts.astype(jnp.float32), w_gate_up, w_down, **kw)
    with pytest.raises(ValueError, match="N <= 64"):
        big = jnp.zeros((65, 64), x.dtype)
        moe_experts_decode(big, jnp.zeros((65, 2), jnp.int32), w_gate_up, w_down, **kw)
    with pytest.raises(ValueError, match="power of 2"):
        moe_experts_decode(x, experts, w_gate_up, w_down, blocks=MoEBlocks(block_f=24), **kw)
    with pytest.raises(ValueError, match="multiple of 16"):  # F = 40: largest block is 8
        w_gu, w_d = jnp.zeros((8, 64, 80), x.dtype), jnp.zeros((8, 40, 64), x.dtype)
        moe_experts_decode(x, experts, w_gu, w_d, **kw)
    with pytest.raises(ValueError, match="out_dtype=.*floating"):
        moe_experts_decode(x, experts, w_gate_up, w_down, out_dtype=jnp.int32, **kw)


@pytest.mark.parametrize(
    "path, N, blocks",
    [
        ("decode", 3, SMALL),  # a tile per pair
        ("decode", 20, SMALL),  # grouped, stored by pair
        ("decode", 20, dataclasses.replace(SMALL, y_by_pair=(2, 16))),  # grouped, gathered
        ("prefill", 40, dataclasses.replace(SMALL, block_m=16)),  # gathered back
    ],
)
def test_results_in_x_dtype(path, N, blocks):
    """out_dtype=bf16: each (token, slot) result is the fp32 one rounded on store; pairs of
    another device's experts (read back from one spare row) still give exact zeros."""
    args = moe_inputs(N, 3, 8, 64, 32, jnp.bfloat16, seed=N, off_device=0.3)
    fn = moe_experts_decode if path == "decode" else moe_experts_prefill
    kw = dict(interpret=INTERPRET, blocks=blocks)
    h32 = run(fn, *args, **kw)
    h16 = run(fn, *args, out_dtype=jnp.bfloat16, **kw)
    assert h16.dtype == jnp.bfloat16 and h16.shape == h32.shape == (N, 3, 64)
    off = np.asarray(args[1] >= 8)
    assert off.any() and np.all(np.asarray(h16, np.float32)[off] == 0.0)
    if INTERPRET:  # the same sums, only the store rounds
        assert np.array_equal(np.asarray(h16), np.asarray(h32.astype(jnp.bfloat16)))
    assert rel_err(h16, h32) < TOL[jnp.bfloat16]


# ---- prefill: the pairs sorted by expert, tiles of block_m rows ----------------------------
SMALL_TILES = dataclasses.replace(SMALL, block_m=16)


def _prefill(x, experts, w_gate_up, w_down, layer=None, blocks=SMALL_TILES):
    return run(
        moe_experts_prefill,
        x,
        experts,
        w_gate_up,
        w_down,
        layer,
        interpret=INTERPRET,
        blocks=blocks,
    )


@pytest.mark.parametrize(
    "N, k, E, D, F, dtype, off_device",
    [
        (1, 2, 8, 64, 32, jnp.float32, 0.0),  # one pair per tile
        (40, 3, 8, 64, 32, jnp.float32, 0.2),  # ~15 rows per expert: partial tiles
        (70, 2, 4, 64, 64, jnp.bfloat16, 0.0),  # ~35 rows per expert: 3 tiles each
        (33, 4, 16, 128, 32, jnp.bfloat16, 0.5),  # half the ids on another device
    ],
)
def test_prefill_matches_reference(N, k, E, D, F, dtype, off_device):
    args = moe_inputs(N, k, E, D, F, dtype, seed=N * k, off_device=off_device)
    h = _prefill(*args)
    assert h.shape == (N, k, D) and h.dtype == jnp.float32
    assert rel_err(h, run(moe_experts_decode_ref, *args)) < TOL[dtype]


@pytest.mark.parametrize("x_by_token, prefill_y_by_pair", [(True, False), (False, True)])
def test_rows_read_by_token_or_stored_by_pair(x_by_token, prefill_y_by_pair):
    """gate_up reading x's rows by token (no grouped copy), and prefill's down storing each
    result at its pair's row: prefill tiles with foreign ids, decode grouped tiles with the
    shared expert's tile among them."""
    blocks = dataclasses.replace(
        SMALL_TILES, x_by_token=x_by_token, prefill_y_by_pair=prefill_y_by_pair
    )
    args = moe_inputs(40, 3, 8, 64, 32, jnp.float32, seed=12, off_device=0.2)
    want = run(moe_experts_decode_ref, *args)
    assert rel_err(_prefill(*args, blocks=blocks), want) < TOL[jnp.float32]
    rng = np.random.default_rng(3)
    sg, su = (jnp.asarray(rng.standard_normal((64, 32)) * 0.125, jnp.float32) for _ in range(2))
    sd = jnp.asarray(rng.standard_normal((32, 64)) * 0.18, jnp.float32)
    h, h_shared = run(
        moe_experts_decode, *args, shared=(sg, su, sd), interpret=INTERPRET, blocks=blocks
    )
    assert rel_err(h, want) < TOL[jnp.float32]
    assert rel_err(h_shared, run(shared_expert_ref, args[0], sg, su, sd)) < TOL[jnp.float32]


@pytest.mark.parametrize("grouping", ["decode", "prefill"])
@pytest.mark.parametrize("N, E, skew", [(17, 8, True), (40, 512, False), (64, 16, True)])
def test_grouping_tiles_cover_every_pair_once(grouping, N, E, skew):
    """The groupings alone (no kernel): order inverts pos and keeps the spare rows' own
    indices; the tile table covers every local pair's grouped row exactly once, each tile at
    most `rows` rows of one expert (offset by the layer's first expert), the used tiles
    first and the shared slots empty."""
    from pallas_kernels.moe.grouping import group_by_expert, group_by_sort

    rng = np.random.default_rng(N + E)
    k, rows, extra, offset = 4, 16, 2, 3 * E
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(N)])
    if skew:  # one expert in every token's slot 0: several tiles of it
        ids[:, 0] = 1
        ids[:, 1:] = np.where(ids[:, 1:] == 1, E, ids[:, 1:])
    ids[rng.random((N, k)) < 0.2] = -1  # foreign
    M = N * k
    P = M + rows * extra
    group = group_by_expert if grouping == "decode" else group_by_sort
    pos, order, tiles = (np.asarray(a) for a in group(jnp.asarray(ids), E, rows, P, extra, offset))
    flat = ids.reshape(-1)
    local = (flat >= 0) & (flat < E)
    assert np.array_equal(order[pos], np.arange(M)) and np.array_equal(order[M:], np.arange(M, P))
    assert np.all(pos[local] < local.sum())  # local pairs first, foreign ones after
    covered = np.zeros(M, int)
    used = tiles[:, 1] > 0
    assert not used[-extra:].any() and np.all(used[: used.sum()])  # used tiles first
    for expert, count, start in tiles[used]:
        assert 1 <= count <= rows
        pairs = order[start : start + count]
        assert np.all(flat[pairs] == expert - offset)
        covered[start : start + count] += 1
    assert np.array_equal(covered[: local.sum()], np.ones(local.sum(), int))


def test_prefill_one_expert_takes_many_tiles_and_others_none():
    """50 tokens on expert 2 in slot 0 (4 tiles of 16, the last with 2 rows); the other slot
    spread; experts 6 and 7 untouched; id -1 and E give zero rows."""
    x, experts, w_gate_up, w_down = moe_inputs(50, 2, 8, 64, 32, jnp.float32, seed=7)
    experts = experts.at[:, 0].set(2)
    experts = experts.at[:, 1].set(jnp.where(experts[:, 1] >= 2, experts[:, 1] % 2, experts[:, 1]))
    experts = experts.at[3, 1].set(-1).at[9, 1].set(8)
    h = _prefill(x, experts, w_gate_up, w_down)
    assert rel_err(h, run(moe_experts_decode_ref, x, experts, w_gate_up, w_down)) < TOL[jnp.float32]
    assert np.all(np.asarray(h)[[3, 9], 1] == 0.0)
    # a row's result does not depend on its neighbours in the tile
    h1 = _prefill(x[20:21], experts[20:21], w_gate_up, w_down)
    assert rel_err(h[20], h1[0]) < TOL[jnp.float32]


def test_prefill_reads_a_layer_of_a_stack_and_equals_decode():
    """Stacked [L, E, ...] weights with a layer index equal the layer's own weights; the
    prefill tiling equals the decode kernel on the same few tokens."""
    x, experts, w_gate_up, w_down = moe_inputs(24, 3, 8, 64, 32, jnp.float32, seed=8)
    stack_gu = jnp.stack([w_gate_up * 0.5, w_gate_up, -w_gate_up])
    stack_d = jnp.stack([w_down, w_down * 2, w_down])
    h = _prefill(x, experts, stack_gu, stack_d, jnp.int32(1))
    want = run(moe_experts_decode_ref, x, experts, w_gate_up, w_down * 2)
    assert rel_err(h, want) < TOL[jnp.float32]
    assert rel_err(h, _kernel(x, experts, w_gate_up, w_down * 2)) < TOL[jnp.float32]


def test_prefill_contract_violations_raise():
    x, experts, w_gate_up, w_down = moe_inputs(2, 2, 8, 64, 32, jnp.float32)
    kw = dict(interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_m=24 must be a power of 2"):
        blocks = dataclasses.replace(SMALL, block_m=24)
        moe_experts_prefill(x, experts, w_gate_up, w_down, blocks=blocks, **kw)
    with pytest.raises(ValueError, match="experts must be"):
        moe_experts_prefill(x, experts[:1], w_gate_up, w_down, **kw)
    with pytest.raises(ValueError, match="need `layer`"):
        moe_experts_prefill(x, experts, w_gate_up[None], w_down[None], **kw)
