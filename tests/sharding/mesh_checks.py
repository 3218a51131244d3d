"""Checks on 8 fake CPU devices. Not collected by the normal suite (the name is not test_*):
test_sharding.py runs this file in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, so the rest of the suite keeps 1 device."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qnext_jax import sharding
from qnext_jax.config import RuntimeOptions, tiny_config
from qnext_jax.model import Qwen3NextForCausalLM

if jax.device_count() < 8:
    pytest.skip("needs 8 devices (run through test_sharding.py)", allow_module_level=True)

# 8 query / 2 KV heads (KV split at TP=2, replicated at TP=4 and 8), 8 / 16 GDN heads, 16 experts
CFG = tiny_config(
    num_attention_heads=8,
    num_key_value_heads=2,
    linear_num_key_heads=8,
    linear_num_value_heads=16,
    num_experts=16,
)
OPTS = RuntimeOptions(dtype="float32")
T = sharding.TENSOR  # the whole mesh: vocab, the shared expert's ffw
H = sharding.HEADS  # attention and GDN heads (replicated over the "rep" axis)
E = sharding.RULES["experts"]


def build(mesh=None, seed=0):
    model = Qwen3NextForCausalLM(CFG, dataclasses.replace(OPTS, mesh=mesh), rngs=nnx.Rngs(seed))
    return model if mesh is None else sharding.shard_params(model, mesh=mesh, cfg=CFG)


def logits(model, ids):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(state, ids))


@functools.cache
def reference():
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, CFG.vocab_size)
    return ids, logits(build(), ids)


@pytest.mark.parametrize(
    "tp, ep, r", [(2, None, 1), (4, None, 1), (8, None, 1), (8, 2, 1), (2, None, 2), (8, 4, 2)]
)
def test_sharded_forward_equals_unsharded(tp, ep, r):
    """r: attention replicas (heads split over tp / r devices, experts over ep)."""
    ids, want = reference()
    mesh = sharding.make_mesh(CFG, tp, ep, attention_replicas=r)
    got = logits(build(mesh), ids)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-5


def test_attention_replicas_drop_the_attention_all_reduce():
    """With every device holding every head (attention_replicas = n) the attention and GDN
    weights are whole on each device, the experts and vocab still split, and the compiled
    forward has fewer all-reduces: the MoE's psum per layer remains, the attention's goes."""
    ids, _ = reference()

    def all_reduces(mesh):
        graphdef, state = nnx.split(build(mesh))
        fn = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))
        hlo = fn.lower(state, ids).compile().as_text()
        return hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")

    mesh = sharding.make_mesh(CFG, 2, attention_replicas=2)
    assert dict(mesh.shape) == {"rep": 2, "ep": 1, "tp": 1}
    specs = dict(
        nnx.to_flat_state(
            sharding.param_shardings(
                nnx.state(nnx.eval_shape(lambda: build()), nnx.Param), mesh=mesh, cfg=CFG
            )
        )
    )
    layer = ("segments", 0, "group", "layers")
    assert specs[(*layer, 0, "linear_attn", "in_proj_qkvz", "w")].is_fully_replicated
    assert specs[(*layer, 0, "mlp", "gate_up")].spec == P(None, E, None, None)
    assert specs[("lm_head", "w")].spec == P(None, T)
    split, replicated = all_reduces(sharding.make_mesh(CFG, 2)), all_reduces(mesh)
    assert replicated < split, (replicated, split)


@pytest.mark.parametrize(
    "impl, N",
    [("gather", 40), ("ragged", 40), ("dense", 40), ("grouped", 40), ("pallas", 40)]
    + [("pallas", 80)],  # above 64 tokens: the prefill grouped GEMM
)
def test_expert_parallel_moe_equals_unsharded(impl, N):
    """Every expert path inside the expert-parallel shard_map (the forward tests hit only the
    decode-size gather path), on 8 devices with 2 experts each and a (4, 2) mesh."""
    from qnext_jax import ops
    from qnext_jax.ops import route

    ks = jax.random.split(jax.random.key(4), 4)
    x = jax.random.normal(ks[0], (N, 16))
    weights, experts = route(jax.random.normal(ks[1], (N, 16)), 3, True)
    # F = 16: the Pallas path's smallest block
    gu, down = jax.random.normal(ks[2], (16, 16, 32)), jax.random.normal(ks[3], (16, 16, 16))
    want = ops.moe_experts(x, weights, experts, gu, down, impl=impl)
    for ep in (8, 4):
        mesh = sharding.make_mesh(CFG, 8, ep)
        fn = jax.jit(functools.partial(ops.moe_experts, impl=impl, mesh=mesh))
        got = fn(x, weights, experts, gu, down)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))


def test_kernels_run_per_device_on_their_heads():
    """The Pallas GDN, MoE, projection and norm kernels (interpret mode on CPU) inside shard_map,
    split by heads, experts and columns / rows, give the reference logits; the conv kernel per
    shard equals the unsharded reference."""
    from pallas_kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref
    from qnext_jax import ops

    ids, want = reference()
    mesh = sharding.make_mesh(CFG, 8)
    model = Qwen3NextForCausalLM(
        CFG,
        dataclasses.replace(
            OPTS,
            mesh=mesh,
            gdn_impl="pallas",
            moe_impl="pallas",
            linear_impl="pallas",
            norm_impl="pallas",
        ),
        rngs=nnx.Rngs(0),
    )
    got = logits(sharding.shard_params(model, mesh=mesh, cfg=CFG), ids)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-5

    x = jax.random.normal(jax.random.key(2), (2, 12, CFG.conv_dim))
    w = jax.random.normal(jax.random.key(3), (4, CFG.conv_dim))
    conv = functools.partial(causal_conv1d, interpret=True)
    y, state = jax.jit(lambda x, w: ops.conv_per_shard(conv, mesh, x, w, None))(x, w)
    y_ref, state_ref = causal_conv1d_ref(x, w, None, activation="silu")
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state, state_ref, rtol=1e-6)


def test_parameter_shardings_follow_the_table():
    mesh = sharding.make_mesh(CFG, 8, 2)  # ("rep", "ep", "tp") = (1, 2, 4)
    specs = {
        p: s.spec
        for p, s in nnx.to_flat_state(
            sharding.param_shardings(
                nnx.state(nnx.eval_shape(lambda: build()), nnx.Param), mesh=mesh, cfg=CFG
            )
        )
    }
    layer = ("segments", 0, "group", "layers")  # [GDN] x 3, stacked
    attn = ("segments", 1, "group", "layers")  # [attention] x 1
    want = {
        ("embed_tokens",): P(T, None),
        ("lm_head", "w"): P(None, T),
        (*attn, 0, "self_attn", "q_proj", "w"): P(None, None, H),
        (*attn, 0, "self_attn", "o_proj", "w"): P(None, H, None),
        (*attn, 0, "self_attn", "k_proj", "w"): P(None, None, None),  # 2 KV heads, 8 devices
        (*attn, 0, "self_attn", "q_norm", "w"): P(None, None),
        (*layer, 0, "linear_attn", "in_proj_qkvz", "w"): P(None, None, H),
        (*layer, 0, "linear_attn", "in_proj_ba", "w"): P(None, None, H),
        (*layer, 0, "linear_attn", "conv_w"): P(None, None, H),
        (*layer, 0, "linear_attn", "A_log"): P(None, H),
        (*layer, 0, "linear_attn", "dt_bias"): P(None, H),
        (*layer, 0, "linear_attn", "out_proj", "w"): P(None, H, None),
        (*layer, 0, "mlp", "gate", "w"): P(None, None, None),
        (*layer, 0, "mlp", "gate_up"): P(None, E, None, None),
        (*layer, 0, "mlp", "down"): P(None, E, None, None),
        (*layer, 0, "mlp", "shared_expert", "gate_proj", "w"): P(None, None, T),
        (*layer, 0, "mlp", "shared_expert", "down_proj", "w"): P(None, T, None),
        ("mtp", "layers", 0, "self_attn", "q_proj", "w"): P(None, H),  # MTP: like a decoder layer
        ("mtp", "layers", 0, "mlp", "gate_up"): P(E, None, None),
    }
    for path, spec in want.items():
        assert specs[path] == spec, path
    # KV heads split while they divide
    tp2 = sharding.param_shardings(
        nnx.state(nnx.eval_shape(lambda: build()), nnx.Param),
        mesh=sharding.make_mesh(CFG, 2),
        cfg=CFG,
    )
    k_proj = (*attn, 0, "self_attn", "k_proj", "w")
    assert dict(nnx.to_flat_state(tp2))[k_proj].spec == P(None, None, H)


def test_embedding_lookup_reads_only_local_rows():
    """The token lookup from the vocab-split table equals jnp.take (negative ids from the end)
    on a (2, 4) mesh, and compiles to one all-reduce of the looked-up rows: no all-gather of
    the table (what GSPMD's own partitioning of the gather does)."""
    mesh = sharding.make_mesh(CFG, 8, 2)
    table = jax.random.normal(jax.random.key(9), (CFG.vocab_size, CFG.hidden_size))
    placed = jax.device_put(table, NamedSharding(mesh, P(T, None)))
    ids = jnp.array([[0, 5, CFG.vocab_size - 1, -1], [17, 200, 3, CFG.vocab_size // 2]])
    fn = jax.jit(lambda t, i: sharding.embedding_lookup(t, i, mesh))
    np.testing.assert_array_equal(fn(placed, ids), jnp.take(table, ids, axis=0))
    hlo = fn.lower(placed, ids).compile().as_text()
    assert "all-gather" not in hlo
    assert hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(") == 1


def test_cache_split_with_heads():
    model = nnx.eval_shape(lambda: build())
    for tp, kv in ((2, H), (8, None)):
        mesh = sharding.make_mesh(CFG, tp)
        cache = sharding.shard_cache(model.init_cache(2, 16), mesh=mesh, cfg=CFG)
        gdn, attn = cache["layers"][0][0], cache["layers"][1][0]
        assert attn.k.sharding.spec == P(None, None, None, kv, None)
        assert gdn.conv.sharding.spec == P(None, None, None, H)
        assert gdn.state.sharding.spec == P(None, None, H, None, None)
        assert cache["mtp"].v.sharding.spec == P(None, None, None, kv, None)
        direct = sharding.init_cache(model, 2, 16, mesh=mesh, cfg=CFG)  # made split, not moved
        assert jax.tree.map(
            lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim), direct, cache
        ) == jax.tree.map(lambda a: True, cache)


def test_make_mesh_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match=r"valid sizes: \[1, 2, 4, 8\]"):
        sharding.make_mesh(CFG, 3)
    with pytest.raises(ValueError, match="expert_parallel_size=3"):
        sharding.make_mesh(CFG, 8, 3)
    with pytest.raises(
        ValueError, match=r"attention_replicas=3 must divide .*valid: \[1, 2, 4, 8\]"
    ):
        sharding.make_mesh(CFG, 8, attention_replicas=3)
    with pytest.raises(ValueError, match="a multiple of attention_replicas=4"):
        sharding.make_mesh(CFG, 8, 2, attention_replicas=4)


@pytest.mark.parametrize(
    "impl, tp, r", [("auto", 4, 1), ("pallas", 2, 1), ("pallas", 4, 1), ("pallas", 2, 2)]
)
def test_greedy_generation_identical(impl, tp, r):
    """The engine on a TP mesh generates the unsharded tokens. With the "pallas" impls the
    GDN and attention kernels run per device on their heads (interpret mode): the decode
    kernels read the split cache stacks in place and the GDN one writes its state there. At
    TP=4 the 2 KV heads are replicated, so attention (and the K/V projections) take XLA's
    path instead. The projection kernel runs per device on its columns, or on its rows of K
    with the partial products summed across devices. r: attention replicas (r = tp: every
    device runs every head, the experts still split)."""
    from qnext_jax.engine import Engine, EngineConfig
    from qnext_jax.sampling import SamplingParams

    prompts = [[5, 9, 2, 7, 1], [3, 3, 8, 100, 42, 17, 6, 250, 11]]
    params = SamplingParams(max_tokens=12, temperature=0.0)

    def generate(model, mesh=None):
        engine = Engine(
            model,
            EngineConfig(max_num_seqs=2, max_model_len=32, prefill_chunk=16, decode_block=8),
            eos_ids=[],
            mesh=mesh,
        )
        reqs = [engine.add_request(p, params) for p in prompts]
        while engine.has_work():
            engine.step()
        return [r.output_ids for r in reqs], engine

    want, _ = generate(build())
    mesh = sharding.make_mesh(CFG, tp, attention_replicas=r)
    opts = dataclasses.replace(
        OPTS, mesh=mesh, gdn_impl=impl, attention_impl=impl, linear_impl=impl, norm_impl=impl
    )
    model = Qwen3NextForCausalLM(CFG, opts, rngs=nnx.Rngs(0))
    got, engine = generate(sharding.shard_params(model, mesh=mesh, cfg=CFG), mesh)
    assert got == want
    assert all(len(o) == 12 for o in got)
    # the state's placements are pinned: the second decode block reuses the first's program
    assert engine.compiles["decode", 8, 1] == 1
    # the cache stays split after prefill and decode (donated and returned with its sharding)
    state = engine.cache["layers"][0][0].state
    heads = H if r == 1 else None  # attention replicas: every device holds every head
    assert state.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, heads, None, None)), 5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random model saved as HF safetensors and as a converted orbax directory."""
    from qnext_convert import save_converted
    from qnext_convert.export import save_hf

    root = tmp_path_factory.mktemp("ckpt")
    model = build(seed=3)
    save_hf(model, root / "hf", dtype="float32")
    save_converted(model, root / "hf", root / "orbax")
    return root, {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("fmt", ["hf", "orbax"])
def test_sharded_loading(saved, fmt):
    import qnext_jax

    root, want = saved
    mesh = sharding.make_mesh(CFG, 8, 4)
    shardings_fn = functools.partial(sharding.param_shardings, mesh=mesh, cfg=CFG)
    options = dataclasses.replace(OPTS, mesh=mesh)
    model = qnext_jax.from_pretrained(
        root / fmt, "float32", options=options, shardings_fn=shardings_fn, progress=False
    )
    table = dict(nnx.to_flat_state(shardings_fn(nnx.state(model, nnx.Param))))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = var[...]
        assert x.sharding.is_equivalent_to(table[path], x.ndim), path
        for shard in x.addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data), want[path][shard.index])


def moe_layer(cfg, mesh, x, seed, **opts):
    """A SparseMoE layer (split over `mesh`, if any) applied to x: its output and the number of
    all-reduces in its compiled program."""
    from qnext_jax.moe import SparseMoE

    moe = SparseMoE(
        cfg, dataclasses.replace(OPTS, mesh=mesh, **opts), dtype=jnp.float32, rngs=nnx.Rngs(seed)
    )
    if mesh is not None:
        sharding.shard_params(moe, mesh=mesh, cfg=cfg)
    graphdef, state = nnx.split(moe)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    hlo = fn.lower(state, x).compile().as_text()
    return np.asarray(fn(state, x)), hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")


def test_shared_expert_rides_the_expert_psum():
    """With every device on the expert axis, a MoE layer needs one all-reduce (routed and
    shared partial sums together), not two; with tensor-axis replicas (EP < devices) the shared
    expert keeps its own. Both equal the unsharded layer."""
    x = jax.random.normal(jax.random.key(7), (3, 5, CFG.hidden_size))
    want, _ = moe_layer(CFG, None, x, 5)
    for ep, reduces in ((8, 1), (2, 2)):
        got, n = moe_layer(CFG, sharding.make_mesh(CFG, 8, ep), x, 5)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert sharding.shared_expert_joins_psum(sharding.make_mesh(CFG, 8, ep), 48) == (ep == 8)
        assert n == reduces, (ep, n)


def test_shared_expert_tile_per_device():
    """With the Pallas decode kernels on 2 devices (EP = 2, the shared expert's 64 columns
    split 32 / 32, no wider than the routed F = 32), each device runs its half of the shared
    expert as one more tile of its routed kernels: equal to the unsharded dense layer, one
    all-reduce."""
    from pallas_kernels.moe import shared_tile_applies

    cfg = dataclasses.replace(CFG, shared_expert_intermediate_size=64)
    assert shared_tile_applies(cfg.moe_intermediate_size, 32)
    x = jax.random.normal(jax.random.key(8), (2, 3, cfg.hidden_size))
    want, _ = moe_layer(cfg, None, x, 6, moe_impl="dense")
    mesh = sharding.make_mesh(cfg, 2)
    got, n = moe_layer(cfg, mesh, x, 6, moe_impl="pallas", linear_impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert n == 1
