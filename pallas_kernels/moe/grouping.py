"""Grouping the (token, slot) pairs of a MoE layer by expert for the grouped kernels
(`pallas_kernels.moe.grouped`): a few XLA ops that give each pair its grouped row and cut each
expert's run of rows into tiles of one expert.

Each grouping returns pos [M] (the grouped row of each pair; ids outside [0, E) last; None
where the grouped rows are the pairs in order), order [P] (the pair of each grouped row; the
spare rows M .. P their own index; None likewise) and the tile table [U, 3] int32 of
(expert + offset, count, start), U = the tiles any routing can need plus `extra` empty slots
(the shared expert's). offset: the layer's first expert in a stack flattened over layers.
"""

from __future__ import annotations

import jax.numpy as jnp


def _pair_ids(experts, E: int):
    """The flat expert id of each (token, slot) pair [M] int32, E for an id outside [0, E)
    (another device's expert, or none): grouped after the local ones."""
    flat = experts.reshape(-1).astype(jnp.int32)
    return jnp.where((flat >= 0) & (flat < E), flat, E)


def group_by_expert(experts, E: int, rows: int, P: int, extra: int, offset):
    """Decode grouping by compare-and-count over the M = N * k <= 640 pairs (no sort); each
    touched expert's run cut into tiles of at most `rows` rows (`_tiles`). A handful of fused
    XLA ops: the counts per expert, each pair's rank among its expert's, their cumsums, and
    two scatters (argsort + bincount + nonzero were 15 us slower at one token; a
    searchsorted over tiles x experts cost two more kernels)."""
    N, k = experts.shape
    M = N * k
    ids = _pair_ids(experts, E)
    counts = jnp.sum(ids == jnp.arange(E + 1)[:, None], axis=1, dtype=jnp.int32)  # [E + 1]
    starts = jnp.cumsum(counts) - counts  # [E + 1]
    same_before = jnp.tril(ids[:, None] == ids[None, :], -1)  # [M, M]: same id, earlier pair
    rank = jnp.sum(same_before, axis=1, dtype=jnp.int32)  # stable within an id
    pos = starts[ids] + rank
    order = jnp.arange(P, dtype=jnp.int32).at[pos].set(jnp.arange(M, dtype=jnp.int32))
    return pos, order, _tiles(ids, rank, pos, counts[:E], N, rows, extra, offset)


def group_by_sort(experts, E: int, rows: int, P: int, extra: int, offset):
    """Prefill grouping: the pairs sorted by expert (stable), each expert's run cut into tiles
    of `rows` (block_m) rows, as `group_by_expert`."""
    N, k = experts.shape
    M = N * k
    ids = _pair_ids(experts, E)
    sorted_pairs = jnp.argsort(ids, stable=True).astype(jnp.int32)  # grouped row -> pair
    pos = jnp.zeros((M,), jnp.int32).at[sorted_pairs].set(jnp.arange(M, dtype=jnp.int32))
    counts = jnp.bincount(ids, length=E + 1)[:E].astype(jnp.int32)  # id E: not here
    rank = pos - (jnp.cumsum(counts) - counts)[jnp.minimum(ids, E - 1)]  # among its expert's
    order = jnp.concatenate([sorted_pairs, jnp.arange(M, P, dtype=jnp.int32)])
    return pos, order, _tiles(ids, rank, pos, counts, N, rows, extra, offset)


def _tiles(ids, rank, pos, counts, N: int, rows: int, extra: int, offset):
    """The tile table of grouped pairs: ids [M] (E: not here), each pair's rank among its
    expert's pairs and its grouped row pos, counts [E]; `rows` a power of 2. The pair of rank
    j * rows opens its expert's j-th tile, which lands after the tiles of the experts before
    it: one scatter. An expert with c <= N pairs (a token's k ids are distinct) takes
    1 + (c - 1) // rows tiles, so min(E, M), plus M // rows where N > rows, bounds them."""
    E, M = counts.shape[0], ids.shape[0]
    shift = rows.bit_length() - 1
    n_tiles = (counts + rows - 1) >> shift  # [E]
    first_tile = jnp.cumsum(n_tiles) - n_tiles
    T = min(E, M) + (M // rows if N > rows else 0)
    e = jnp.minimum(ids, E - 1)
    opens = (ids < E) & ((rank & (rows - 1)) == 0)
    slot = jnp.where(opens, first_tile[e] + (rank >> shift), T + extra)  # past the end: dropped
    tile = jnp.stack([e + offset, jnp.minimum(rows, counts[e] - rank), pos], axis=1)  # [M, 3]
    return jnp.zeros((T + extra, 3), jnp.int32).at[slot].set(tile, mode="drop")


def one_tile_per_pair(experts, E: int, rows: int, P: int, extra: int, offset):
    """No grouping: pair j (token j // k) is tile j on grouped row j (pos and order returned
    as None); ids outside [0, E) give an empty tile. No grouping ops: at N = 1 they were most
    of the layer's small kernels."""
    ids = _pair_ids(experts, E)
    here = ids < E
    M = ids.shape[0]
    tile = jnp.stack(
        [jnp.where(here, ids, 0) + offset, here.astype(jnp.int32), jnp.arange(M, dtype=jnp.int32)],
        axis=1,
    )
    return None, None, jnp.pad(tile, ((0, extra), (0, 0)))
