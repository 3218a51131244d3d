"""Sharding policy: the device mesh, ONE table from logical axes to mesh axes, and the
placements of parameters, cache and activations derived from it.

The mesh holds n = tensor_parallel_size devices as a 3-D grid ("rep", "ep", "tp") of shape
(R, EP / R, n / EP). Everything tensor-parallel splits over the whole grid (vocab, the shared
expert's ffw) except the attention and GDN heads, which split over ("ep", "tp") and are
replicated over "rep": R = 1 by default (heads split n ways); with R = n every device holds every
head and a layer's attention needs no all-reduce. Routed experts split over ("rep", "ep"): EP = n
by default (every device holds E / n experts); with EP < n an expert group is replicated over
"tp".

Parameters carry their logical axes as `axes` metadata (set where the model creates them;
LayerStack prepends "layers"). Activations are constrained with `constrain` at block boundaries;
everything else is GSPMD. `shard_map` only where collectives are manual or GSPMD cannot see
inside: the routed experts (`expert_parallel`) and the Pallas kernels (`per_shard`).
Model code names logical axes only; the physical names appear in this file alone.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qnext_jax.cache import GDN_CONV_AXES, GDN_STATE_AXES, KV_AXES, GDNCache, KVCache
from qnext_jax.config import Qwen3NextConfig

REP, EP, TP = "rep", "ep", "tp"
HEADS = (EP, TP)  # attention and GDN heads: replicated over REP
TENSOR = (REP, EP, TP)  # every device of the mesh

# The table. A logical axis whose size does not divide its mesh axes is replicated instead
# (KV heads: 2 in the 80B model, replicated beyond TP=2); the head counts that must divide are
# checked by make_mesh.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": None,
    "embed": None,
    "layers": None,  # stacked layer repeats
    "heads": HEADS,  # attention query heads: q_proj out (per head [q | gate]), o_proj in
    "kv_heads": HEADS,  # attention KV heads: k/v_proj out, KV cache
    "k_heads": HEADS,  # GDN key heads: in_proj_qkvz / in_proj_ba out, conv channels + conv cache
    "v_heads": HEADS,  # GDN value heads: A_log, dt_bias, out_proj in, recurrent state
    "ffw": TENSOR,  # shared expert and dense MLP intermediate
    "vocab": TENSOR,  # embedding rows, lm_head columns
    "experts": (REP, EP),  # routed experts (ops.moe_experts runs them in expert_parallel)
    # routed experts' F is never split: gate_up is [E, D, gate F | up F], an even split of 2F
    # would put gate and up on different devices
}


def _head_counts(cfg: Qwen3NextConfig) -> dict[str, int]:
    """How many units a logical axis splits into, where one unit spans several elements of a
    parameter's dimension (a head of Dh columns; a GDN key-head group of 2K + 2RV columns)."""
    return {
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "k_heads": cfg.linear_num_key_heads,
        "v_heads": cfg.linear_num_value_heads,
        "experts": cfg.num_experts,
    }


def valid_tensor_parallel_sizes(cfg: Qwen3NextConfig) -> list[int]:
    """Sizes that split the query heads and the GDN key (hence value) heads evenly."""
    g = math.gcd(cfg.num_attention_heads, cfg.linear_num_key_heads)
    return [d for d in range(1, g + 1) if g % d == 0]


def make_mesh(
    cfg: Qwen3NextConfig,
    tensor_parallel_size: int,
    expert_parallel_size: int | None = None,
    devices=None,
    *,
    attention_replicas: int = 1,
) -> Mesh:
    """A (R, EP / R, n / EP) mesh with axes ("rep", "ep", "tp") over the first
    n = `tensor_parallel_size` devices.

    attention_replicas (R): copies of the attention and GDN weights; their heads split over
    n / R devices (R = n: every device holds every head, and a layer's attention needs no
    all-reduce). expert_parallel_size (EP): how many ways the routed experts split, a multiple
    of R; by default the largest size dividing both n and the expert count (n itself for the
    80B model). Raises ValueError naming the valid sizes when one does not divide."""
    n, r = tensor_parallel_size, attention_replicas
    valid = valid_tensor_parallel_sizes(cfg)
    if not isinstance(n, int) or n not in valid:
        raise ValueError(
            f"tensor_parallel_size={n} does not divide the attention heads "
            f"({cfg.num_attention_heads}) and the GDN key heads ({cfg.linear_num_key_heads}); "
            f"valid sizes: {valid}"
        )
    valid_r = [d for d in range(1, n + 1) if n % d == 0]
    if not isinstance(r, int) or r not in valid_r:
        raise ValueError(
            f"attention_replicas={r} must divide tensor_parallel_size={n}; valid: {valid_r}"
        )
    ep = expert_parallel_size
    if ep is None:
        ep = math.gcd(n, max(cfg.num_experts, 1))
    valid_ep = [
        d for d in range(1, n + 1) if n % d == 0 and cfg.num_experts % d == 0 and d % r == 0
    ]
    if ep not in valid_ep:
        raise ValueError(
            f"expert_parallel_size={ep} must divide tensor_parallel_size={n} and num_experts="
            f"{cfg.num_experts}, and be a multiple of attention_replicas={r}; valid sizes: "
            f"{valid_ep}"
        )
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(f"tensor_parallel_size={n} but only {len(devices)} devices are available")
    return Mesh(np.array(devices[:n]).reshape(r, ep // r, n // ep), (REP, EP, TP))


# ---- logical axes -> PartitionSpec --------------------------------------------------------------
def _mesh_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh: Mesh,
    counts: dict[str, int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims carry the logical `axes`.

    A dim is split when its unit count (counts[name], else the dim itself) divides the mesh
    axes' size; otherwise it is replicated."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        target = RULES[name] if name is not None else None
        if target is not None:
            units = (counts or {}).get(name, dim)
            size = _mesh_size(mesh, target)
            if units % size or dim % size:
                target = None
        spec.append(target)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: tuple[str | None, ...], mesh: Mesh | None) -> jax.Array:
    """with_sharding_constraint by logical axes (dims are the unit counts, e.g. heads);
    a no-op without a mesh."""
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_spec(axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---- parameters -----------------------------------------------------------------------------
def param_axes(var) -> tuple[str | None, ...]:
    """A parameter's logical axes (replicated when the model gave none, e.g. norm weights)."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return tuple(meta.get("axes") or (None,) * len(var.shape))


def param_shardings(abstract_params_state, *, mesh: Mesh, cfg: Qwen3NextConfig) -> nnx.State:
    """A State of NamedSharding, one per parameter leaf, from the logical table."""
    counts = _head_counts(cfg)
    flat = []
    for path, var in nnx.to_flat_state(abstract_params_state):
        spec = logical_spec(param_axes(var), tuple(var.shape), mesh, counts)
        flat.append((path, NamedSharding(mesh, spec)))
    return nnx.from_flat_state(flat)


def place(tree, shardings):
    """Put a pytree of arrays on `shardings` (same structure). Within one process a device_put;
    across processes each device's slice is cut from the (identical) host copy."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = treedef.flatten_up_to(shardings)
    if all(d.process_index == jax.process_index() for s in targets for d in s.device_set):
        return jax.device_put(tree, treedef.unflatten(targets))
    out = []
    for x, s in zip(leaves, targets, strict=True):
        host = np.asarray(jax.device_get(x))
        out.append(jax.make_array_from_callback(host.shape, s, lambda idx, h=host: h[idx]))
    return treedef.unflatten(out)


def shard_params(model, *, mesh: Mesh, cfg: Qwen3NextConfig):
    """Place a built model's parameters by the table (in place); returns the model."""
    params = nnx.state(model, nnx.Param)
    shardings = dict(nnx.to_flat_state(param_shardings(params, mesh=mesh, cfg=cfg)))
    flat = list(nnx.to_flat_state(params))
    placed = place([v[...] for _, v in flat], [shardings[p] for p, _ in flat])
    placed = [(p, v.replace(x)) for (p, v), x in zip(flat, placed, strict=True)]
    nnx.update(model, nnx.from_flat_state(placed))
    return model


# ---- cache ----------------------------------------------------------------------------------
def cache_shardings(cache, *, mesh: Mesh, cfg: Qwen3NextConfig | None = None):
    """NamedShardings for a hybrid cache (leaves stacked [L, B, ...]): split with the heads."""

    def one(c):
        if isinstance(c, KVCache):
            return KVCache(
                *(
                    NamedSharding(mesh, logical_spec(("layers", *KV_AXES), a.shape, mesh))
                    for a in (c.k, c.v)
                )
            )
        if isinstance(c, GDNCache):
            return GDNCache(
                NamedSharding(mesh, logical_spec(("layers", *GDN_CONV_AXES), c.conv.shape, mesh)),
                NamedSharding(mesh, logical_spec(("layers", *GDN_STATE_AXES), c.state.shape, mesh)),
            )
        return c

    return jax.tree.map(one, cache, is_leaf=lambda c: isinstance(c, (KVCache, GDNCache)))


def shard_cache(cache, *, mesh: Mesh, cfg: Qwen3NextConfig | None = None):
    """Place an existing KV / GDN cache split with its heads (`init_cache` builds one split)."""
    return place(cache, cache_shardings(cache, mesh=mesh, cfg=cfg))


def init_cache(
    model, batch: int, max_len: int, *, mesh: Mesh, cfg: Qwen3NextConfig | None = None, **kw
):
    """model.init_cache(batch, max_len, **kw) created directly split over the mesh (no device
    ever holds the whole cache; works across processes)."""
    make = functools.partial(model.init_cache, batch, max_len, **kw)
    shardings = cache_shardings(jax.eval_shape(make), mesh=mesh, cfg=cfg)
    return jax.jit(make, out_shardings=shardings)()


# ---- shard_map helpers ----------------------------------------------------------------------
def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def per_shard(fn, mesh: Mesh | None, in_axes, out_axes):
    """fn run on each device's slice (shard_map), with inputs and outputs given by logical axes.

    For kernels: GSPMD cannot split a Pallas call, it would gather every head onto every device.
    The axes must divide (heads do: make_mesh checks). Without a mesh, fn itself."""
    if mesh is None or mesh.size == 1:
        return fn

    def specs(tree):
        return jax.tree.map(
            lambda axes: PartitionSpec(*(RULES[a] if a else None for a in axes)),
            tree,
            is_leaf=_is_axes,
        )

    return jax.shard_map(
        fn, mesh=mesh, in_specs=specs(in_axes), out_specs=specs(out_axes), check_vma=False
    )


def embedding_lookup(table: jax.Array, ids: jax.Array, mesh: Mesh | None) -> jax.Array:
    """table [V, D] (rows split on "vocab"), ids [...] -> [..., D], replicated.

    GSPMD partitions a gather from a row-split table by all-gathering the table first: for the
    80B model on 2 devices, 311 MB over the link and ~1.2 ms in every decode step. Here each
    device looks the ids up in its own rows, zeros the rows another device holds, and one psum
    of [..., D] joins them (exact: every output row has one nonzero term). Negative ids count
    from the end, as in jnp.take. Without a mesh, or with the table replicated (V not
    divisible), jnp.take itself."""
    spec = (
        None
        if mesh is None or mesh.size == 1
        else logical_spec(("vocab", "embed"), table.shape, mesh)
    )
    if spec is None or spec[0] is None:
        return jnp.take(table, ids, axis=0)
    axis = spec[0]

    def body(rows, ids):
        n = rows.shape[0]
        local = ids - jax.lax.axis_index(axis) * n
        here = (local >= 0) & (local < n)
        out = jnp.take(rows, jnp.where(here, local, 0), axis=0)
        return jax.lax.psum(jnp.where(here[..., None], out, jnp.zeros((), out.dtype)), axis)

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(PartitionSpec(axis, None), PartitionSpec()),
        out_specs=PartitionSpec(),
        check_vma=False,
    )
    return fn(table, jnp.where(ids < 0, ids + table.shape[0], ids))


def axis_size(mesh: Mesh | None, name: str) -> int:
    """How many devices the logical axis `name` would split over (1 without a mesh)."""
    if mesh is None or RULES[name] is None:
        return 1
    return _mesh_size(mesh, RULES[name])


def expert_parallel_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else _mesh_size(mesh, RULES["experts"])


def shared_expert_joins_psum(mesh: Mesh | None, ffw: int) -> bool:
    """Whether the shared expert's partial sums can ride the routed experts' psum (one
    collective per MoE layer instead of two): every device of the mesh is on the expert axis
    (no tensor-axis replicas of an expert group, which would count it twice) and the shared
    expert's ffw dim splits evenly over them (else it is replicated, not split)."""
    if mesh is None or mesh.size == 1:
        return False
    return expert_parallel_size(mesh) == mesh.size and ffw % mesh.size == 0


def expert_parallel(
    local_fn,
    mesh: Mesh,
    x,
    weights,
    experts,
    w_gate_up,
    w_down,
    *,
    layer=None,
    shared=None,
):
    """Routed experts split over the expert axis, tokens replicated.

    local_fn(x, weights, ids, w_gate_up_local, w_down_local, layer, shared_local) -> fp32
    [N, D] must ignore ids outside [0, E_local) (experts another device holds). With `layer`
    the weights are stacked over layers ([L, E, ...], split on E) and layer picks one. Each
    device runs its E / EP experts on the tokens routed to them and the partial outputs are
    summed with one psum, in x's dtype.
    shared = (w_gate [D, Fs], w_up [D, Fs], w_down [Fs, D], scale [N, 1]): the shared expert,
    split on Fs and handed to local_fn as the device's slices, which adds scale * its partial
    SwiGLU to its routed partial sum before the one psum (only where
    `shared_expert_joins_psum`). Its weights may be stacked over layers ([L, D, Fs], ...).

    Why replicated tokens + psum, not all-to-all: under tensor parallelism the residual stream
    is already replicated on every device, so there is nothing to dispatch. Decode (1-64 tokens)
    moves N x D activations (4 KiB - 256 KiB in bf16): latency-bound, and one all-reduce beats
    the two all-to-alls (dispatch + combine) plus routing-metadata exchange all-to-all needs.
    Prefill (8K tokens): the all-reduce moves N x D once (32 MiB per layer, ~0.1 ms on NVLink
    against ~0.5 ms of expert matmuls on 2 GPUs), while top-10 routing over 2-8 devices sends
    almost every token to every device, so an all-to-all dispatch would move up to
    min(k, EP) x N x D. All-to-all pays off only with sequence-sharded activations and many
    more devices than k, which this inference setting does not have.
    """
    axis = RULES["experts"]
    stacked = layer is not None
    w_spec = PartitionSpec(*((None,) * stacked), axis, None, None)

    def body(x, weights, experts, gu, down, layer, *shared):
        n_local = gu.shape[-3]
        ids = experts - jax.lax.axis_index(axis) * n_local
        ids = jnp.where((ids >= 0) & (ids < n_local), ids, n_local)  # n_local: not here
        out = local_fn(x, weights, ids, gu, down, layer if stacked else None, shared or None)
        # The partial sums travel in the activation dtype (bf16: half the bytes of fp32, as
        # tensor-parallel all-reduces do elsewhere): each partial is rounded, and so is every
        # step of the reduction (one step at EP=2, more on larger meshes).
        return jax.lax.psum(out.astype(x.dtype), axis)

    rep = PartitionSpec()
    layer = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
    specs = (rep, rep, rep, w_spec, w_spec, rep)
    if shared is not None:
        ffw = RULES["ffw"]
        lead = (None,) * (shared[0].ndim - 2)  # a stacked layer axis
        specs += (
            PartitionSpec(*lead, None, ffw),
            PartitionSpec(*lead, None, ffw),
            PartitionSpec(*lead, ffw, None),
            rep,
        )
    # check_vma off: local loops (the grouped path's fori_loop) start from unvarying zeros
    fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=rep, check_vma=False)
    return fn(x, weights, experts, w_gate_up, w_down, layer, *(shared or ()))
