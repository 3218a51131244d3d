"""Sparse MoE: fp32 softmax router over all experts -> top-k -> renormalise, stacked routed
experts [E, ...] (so grouped matmuls and expert sharding can use them), and a shared expert
scaled by a per-token sigmoid gate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax import ops, sharding
from qnext_jax.config import Qwen3NextConfig, RuntimeOptions
from qnext_jax.layers import Linear, SwiGLU, _init


class SparseMoE(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, opts: RuntimeOptions, *, dtype, rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        kw = dict(dtype=dtype, rngs=rngs, opts=opts)
        self.gate = Linear(D, E, axes=("embed", None), **kw)  # the router
        # [E, D, gate F | up F]: F is not split (an even split of 2F would separate gate and up)
        self.gate_up = nnx.Param(_init(rngs, (E, D, 2 * F), dtype), axes=("experts", "embed", None))
        self.down = nnx.Param(_init(rngs, (E, F, D), dtype), axes=("experts", None, "embed"))
        self.shared_expert = SwiGLU(D, cfg.shared_expert_intermediate_size, **kw)
        self.shared_expert_gate = Linear(D, 1, **kw)
        self.impl, self.mesh = opts.moe_impl, opts.mesh

    def __call__(
        self, x: jax.Array, layer: jax.Array | None = None, valid: jax.Array | None = None
    ) -> jax.Array:
        """x [..., D]. layer: set inside LayerStack's scan, where gate_up / down hold the whole
        stacks over layers ([L, E, ...]; the projections' weights may too) and it picks this
        layer's.
        valid [...] bool: tokens that are False (padding, idle decode slots) are routed to no
        expert, so their rows cost no expert reads; their output is the shared expert's only."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.gate(x, layer)
        weights, experts = ops.route(
            logits, self.top_k, self.normalize, impl=self.impl, mesh=self.mesh
        )
        if valid is not None:  # id -1: held nowhere, every expert path skips it
            experts = jnp.where(valid.reshape(-1, 1), experts, -1)
        scale = jax.nn.sigmoid(self.shared_expert_gate(x, layer))  # [N, 1]
        se = self.shared_expert
        # the shared expert inside the routed experts' call: on one device (more tiles of
        # the decode kernels) or riding their psum (one collective per layer, not two)
        single = self.mesh is None or self.mesh.size == 1
        fold = single or sharding.shared_expert_joins_psum(self.mesh, se.gate_proj.w.shape[-1])
        routed = ops.moe_experts(
            x,
            weights,
            experts,
            self.gate_up[...],
            self.down[...],
            impl=self.impl,
            mesh=self.mesh,
            layer=layer,
            shared=(se.gate_proj.w[...], se.up_proj.w[...], se.down_proj.w[...], scale)
            if fold
            else None,
            shared_impl=se.gate_proj.impl,
        )
        if fold:
            return routed.reshape(shape)
        shared = se(x, layer) * scale
        return (routed + shared).reshape(shape)
