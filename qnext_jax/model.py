"""Qwen3-Next for causal LM: decoder layers assembled by the layer pattern.

Axis legend: B batch, T time, S cache length, D model dim, H heads, K/V head dims,
E experts, F expert ffw, L layer repeats, N tokens (B*T).

Layers are grouped into segments of a repeating pattern (for the 80B model: one segment of
[GDN, GDN, GDN, attention] x 12). A segment's parameters and caches are stacked along a leading
L axis and iterated with `lax.scan`, so the 48-layer model compiles in about the time of one group.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax import ops
from qnext_jax.attention import GatedAttention
from qnext_jax.cache import LayerCache, layer_cache, stacked
from qnext_jax.config import FULL, LINEAR, Qwen3NextConfig, RuntimeOptions
from qnext_jax.deltanet import GatedDeltaNet
from qnext_jax.layers import Linear, RMSNorm, SwiGLU, rope_cos_sin, rope_frequencies
from qnext_jax.moe import SparseMoE
from qnext_jax.sharding import constrain, embedding_lookup

RESIDUAL = ("batch", None, "embed")  # the residual stream [B, T, D]: replicated over the mesh

Kind = tuple[str, bool]  # (layer type, is MoE)


class DecoderLayer(nnx.Module):
    """x + mixer(norm(x)), then + mlp(norm(x)); mixer is GDN or gated attention by the pattern.

    The layers pass the residual stream on as a pair (x, h): x, and the last block's output h
    not yet added to it. Each norm adds it first (x + h, then the norm of that: one kernel at
    decode, ops.rms_norm), as vLLM's fused add + RMSNorm; the sums are the same bf16 adds."""

    def __init__(self, cfg: Qwen3NextConfig, opts: RuntimeOptions, kind: Kind, *, dtype, rngs):
        layer_type, is_moe = kind
        self.layer_type, self.mesh = layer_type, opts.mesh
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps, dtype=dtype, opts=opts)
        if layer_type == LINEAR:
            self.linear_attn = GatedDeltaNet(cfg, opts, dtype=dtype, rngs=rngs)
        else:
            self.self_attn = GatedAttention(cfg, opts, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(D, eps, dtype=dtype, opts=opts)
        if is_moe:
            self.mlp = SparseMoE(cfg, opts, dtype=dtype, rngs=rngs)
        else:
            self.mlp = SwiGLU(D, cfg.intermediate_size, dtype=dtype, rngs=rngs, opts=opts)

    def __call__(
        self, stream, rope, positions, cache, slots=None, collect_states=False, layer=None
    ):
        """stream: (x, h) [B, T, D] each, the residual stream and the pending block output
        (zeros before the first layer). Returns ((x, mlp output), cache, GDN states)."""
        x, h = stream
        # named scopes label the compiled ops by block (benchmarks/profile_step.py reads them)
        h, x = self.input_layernorm(h, layer, residual=x)  # x += h; h = norm(x)
        states = None
        if self.layer_type == LINEAR:
            with jax.named_scope("gdn"):
                out = self.linear_attn(
                    h, positions, cache, slots, return_all_states=collect_states, layer=layer
                )
            h, cache = out[0], out[1]
            states = out[2] if collect_states else None
        else:
            with jax.named_scope("attention"):
                h, cache = self.self_attn(h, *rope, positions, cache, slots, layer)
        h, x = self.post_attention_layernorm(h, layer, residual=constrain(x, RESIDUAL, self.mesh))
        if isinstance(self.mlp, SparseMoE):
            with jax.named_scope("moe"):
                h = self.mlp(h, layer=layer, valid=positions >= 0)
        else:
            with jax.named_scope("mlp"):
                h = self.mlp(h, layer)
        stream = tuple(constrain(a, RESIDUAL, self.mesh) for a in (x, h))
        return stream, cache, states


class LayerGroup(nnx.Module):
    """One period of the layer pattern, e.g. [GDN, GDN, GDN, attention]."""

    def __init__(self, cfg, opts, pattern: tuple[Kind, ...], *, dtype, rngs):
        self.layers = nnx.List(
            [DecoderLayer(cfg, opts, k, dtype=dtype, rngs=rngs) for k in pattern]
        )

    def __call__(
        self, stream, rope, positions, caches, slots=None, collect_states=False, layer=None
    ):
        new_caches, states = [], []
        for block, cache in zip(self.layers, caches, strict=True):
            stream, cache, st = block(stream, rope, positions, cache, slots, collect_states, layer)
            new_caches.append(cache)
            states.append(st)
        return stream, tuple(new_caches), tuple(states)


def segment_layers(kinds: tuple[Kind, ...]) -> list[tuple[int, int, int]]:
    """Split the layer sequence into (start, period, repeats) runs of a repeating pattern,
    greedily taking the period that covers the most layers from each start."""
    segments, i, n = [], 0, len(kinds)
    while i < n:
        best_p, best_r = 1, 1
        for p in range(1, n - i + 1):
            r = 1
            while kinds[i + r * p : i + (r + 1) * p] == kinds[i : i + p]:
                r += 1
            if r >= 2 and p * r > best_p * best_r:
                best_p, best_r = p, r
        segments.append((i, best_p, best_r))
        i += best_p * best_r
    return segments


class LayerStack(nnx.Module):
    """`repeats` copies of a LayerGroup with parameters stacked on a leading L axis."""

    def __init__(self, cfg, opts, pattern, repeats: int, *, dtype, rngs):
        groups = [LayerGroup(cfg, opts, pattern, dtype=dtype, rngs=rngs) for _ in range(repeats)]
        graphdef, _ = nnx.split(groups[0])
        states = [nnx.state(g) for g in groups]
        stacked_state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        for _, var in nnx.to_flat_state(stacked_state):  # logical axes gain the stacked L axis
            if var.has_metadata("axes"):
                var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
        self.group = nnx.merge(graphdef, stacked_state)
        self.pattern, self.repeats, self.scan = pattern, repeats, opts.scan_layers
        self.linear_impl = opts.linear_impl

    def __call__(self, stream, rope, positions, caches, slots=None, collect_states=False):
        """stream: (x, h), the residual stream and the pending block output (DecoderLayer)."""
        graphdef, params = nnx.split(self.group)
        # The routed experts' stacks stay whole: each layer's kernel call gets the stack and
        # the layer index. Sliced per layer, they would be copied every step (a slice cannot
        # be a custom call's operand: on the 80B model that copied each layer's 1 GiB of local
        # experts per decode step, ~55 ms of a 70 ms step on 2 H200s).
        # Decode-sized batches keep the projections' stacks whole too: the Pallas projection
        # kernel reads its layer in place (sliced, each layer's weights were copied before
        # their dots, ~0.6 ms per step on the 80B model); larger batches slice them for XLA.
        # So do the GDN decode kernels' small weights (conv_w, A_log, dt_bias) and the norms':
        # their slices' copies ran as memcpys between XLA's command buffers, splitting them.
        keep_whole = _expert_stack
        if ops.linear_kernel_applies(self.linear_impl, math.prod(stream[0].shape[:-1])):
            keep_whole = _kernel_weight_stack
        whole = nnx.filter_state(params, keep_whole)
        sliced = nnx.filter_state(params, lambda path, v: not keep_whole(path, v))

        def body(stream, caches, p, i):
            group = nnx.merge(graphdef, p, whole)
            views = tuple(None if c is None else LayerCache(c, i) for c in caches)
            stream, views, st = group(stream, rope, positions, views, slots, collect_states, i)
            return stream, tuple(None if v is None else v.stack for v in views), st

        if self.scan and self.repeats > 1:
            # The cache stacks ride in the carry and each layer writes into them at its index
            # (LayerCache), so the writes update the carried buffers in place. As scanned inputs
            # and outputs they were written to a second buffer and the whole stack copied back
            # every step (~3 ms of a 31 ms step at batch 64); sliced per layer in the carry,
            # each layer's slice was still copied out and back (~3.4 ms of 28 ms).
            def carried(carry, xs):
                stream, cs, st = body(*carry, *xs)
                return (stream, cs), st

            layers = jnp.arange(self.repeats, dtype=jnp.int32)
            (stream, caches), states = jax.lax.scan(carried, (stream, caches), (sliced, layers))
            return stream, caches, states
        states = []
        for i in range(self.repeats):
            p = jax.tree.map(lambda a, i=i: a[i], sliced)
            stream, caches, st = body(stream, caches, p, i)
            states.append(st)
        return stream, caches, jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _expert_stack(path, _value) -> bool:
    """The routed experts' weights (SparseMoE.gate_up / down) of a LayerStack."""
    return path[-1] in ("gate_up", "down") and "mlp" in path


def _kernel_weight_stack(path, value) -> bool:
    """The routed experts', the projections' (Linear.w, [L, in, out]), the GDN kernels'
    (conv_w, A_log, dt_bias) and the norms' ([L, D]; "norm" in a stack is GDN's output norm)
    weights of a LayerStack: kernels read their layer in place."""
    gdn = path[-1] in ("conv_w", "A_log", "dt_bias")
    norm = len(path) > 1 and path[-2] in ("input_layernorm", "post_attention_layernorm", "norm")
    return _expert_stack(path, value) or gdn or norm or (path[-1] == "w" and value.ndim == 3)


@dataclasses.dataclass
class ForwardOutput:
    hidden: jax.Array  # [B, T, D] after the final norm (what the MTP head consumes)
    cache: Any  # new cache, or None
    states: Any = None  # per-position GDN states when collect_states


class Qwen3NextForCausalLM(nnx.Module):
    """Qwen3NextForCausalLM. `model(input_ids)` -> logits [B, T, vocab]."""

    def __init__(
        self,
        cfg: Qwen3NextConfig,
        opts: RuntimeOptions | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ):
        from qnext_jax.mtp import MultiTokenPredictor  # mtp builds on DecoderLayer

        opts = opts or RuntimeOptions()
        dtype = jnp.dtype(opts.dtype)
        self.config, self.opts, self.dtype = cfg, opts, dtype
        self.embed_tokens = nnx.Param(
            jnp.zeros((cfg.vocab_size, cfg.hidden_size), dtype)
            if rngs is None
            else (
                0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))
            ).astype(dtype),
            axes=("vocab", "embed"),
        )
        kinds = cfg.layer_kinds()
        self.segments = nnx.List(
            [
                LayerStack(cfg, opts, kinds[s : s + p], r, dtype=dtype, rngs=rngs)
                for s, p, r in segment_layers(kinds)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, opts=opts)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                dtype=dtype,
                rngs=rngs,
                axes=("embed", "vocab"),
                opts=opts,
            )
        )
        self.mtp = (
            MultiTokenPredictor(cfg, opts, dtype=dtype, rngs=rngs) if cfg.num_mtp_layers else None
        )

    # ---- building blocks -----------------------------------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        table = self.embed_tokens[...]
        return embedding_lookup(table, input_ids, self.opts.mesh).astype(self.dtype)

    def rope(self, positions: jax.Array):
        cfg = self.config
        inv_freq, scale = rope_frequencies(
            cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        return rope_cos_sin(jnp.maximum(positions, 0), inv_freq, scale, self.dtype)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] (post-norm) -> logits [..., vocab] in the activation dtype."""
        with jax.named_scope("lm_head"):
            if self.lm_head is not None:
                return self.lm_head(hidden)
            return jnp.dot(hidden, self.embed_tokens[...].T.astype(hidden.dtype))

    def init_cache(self, batch: int, max_len: int, *, kv_dtype=None, state_dtype=jnp.float32):
        """The hybrid cache: per segment, per pattern position, stacked over repeats."""
        kv_dtype = kv_dtype or self.dtype
        caches = tuple(
            tuple(
                stacked(
                    [
                        layer_cache(self.config, kind[0], batch, max_len, kv_dtype, state_dtype)
                        for _ in range(seg.repeats)
                    ]
                )
                for kind in seg.pattern
            )
            for seg in self.segments
        )
        mtp = None
        if self.mtp is not None:
            mtp = stacked(
                [
                    layer_cache(self.config, FULL, batch, max_len, kv_dtype, state_dtype)
                    for _ in range(self.config.num_mtp_layers)
                ]
            )
        return {"layers": caches, "mtp": mtp}

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self, input_ids, positions=None, cache=None, *, slots=None, collect_states=False
    ) -> ForwardOutput:
        """input_ids [B, T]; positions [B, T] (default 0..T-1; -1 marks right padding);
        cache from init_cache or None; slots (CacheSlots) maps the B sequences to cache rows
        when the cache holds more rows than B. Returns post-norm hidden states and the new
        cache; with collect_states also each GDN layer's states after every position."""
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x = self.embed(input_ids)
        rope = self.rope(positions)
        stream = (x, jnp.zeros_like(x))  # (residual stream, pending block output)
        new_caches, states = [], []
        for i, seg in enumerate(self.segments):
            seg_cache = cache["layers"][i] if cache is not None else (None,) * len(seg.pattern)
            stream, c, st = seg(stream, rope, positions, seg_cache, slots, collect_states)
            new_caches.append(c)
            states.append(st)
        hidden, _ = self.norm(stream[1], residual=stream[0])
        new_cache = None
        if cache is not None:
            new_cache = {"layers": tuple(new_caches), "mtp": cache["mtp"]}
        return ForwardOutput(hidden, new_cache, tuple(states) if collect_states else None)

    def mtp_forward(self, next_ids, hidden, positions, cache=None, slots=None):
        """The MTP head: next_ids [B,T] (token t+1), hidden [B,T,D] (main post-norm state at t),
        positions [B,T] (those of t). Returns (MTP post-norm hidden [B,T,D], new cache)."""
        if self.mtp is None:
            raise ValueError("this checkpoint has no MTP layers (config.num_mtp_layers == 0)")
        mtp_cache = None if cache is None else cache["mtp"]
        with jax.named_scope("mtp"):
            h, mtp_cache = self.mtp(
                self.embed(next_ids), hidden, self.rope(positions), positions, mtp_cache, slots
            )
        if cache is not None:
            cache = {"layers": cache["layers"], "mtp": mtp_cache}
        return h, cache

    def __call__(self, input_ids, *, positions=None, return_hidden: bool = False):
        out = self.forward(input_ids, positions)
        logits = self.compute_logits(out.hidden)
        return (logits, out.hidden) if return_hidden else logits
