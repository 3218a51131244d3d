"""Gated DeltaNet, the linear-attention mixer of three layers in four.

Projections keep the checkpoint's per-key-head grouping (one fused matmul, and heads shard
cleanly): for key head h, in_proj_qkvz gives [q_h (K) | k_h (K) | v (R*V) | z (R*V)] and in_proj_ba
gives [b (R) | a (R)], where the R = HV/H value heads of group h are h*R .. h*R+R-1. The conv runs
over [q_h | k_h | v] per group, so its channels (and state) are grouped per key head too.

  beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)   (fp32)
  o    = gated_delta_rule(l2norm(q), l2norm(k), v, g, beta)     (value head j reads key head j//R)
  out  = out_proj(rmsnorm(o) * w * silu(z))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax import ops
from qnext_jax.cache import GDN_CONV_AXES, GDN_STATE_AXES, CacheSlots, LayerCache
from qnext_jax.config import Qwen3NextConfig, RuntimeOptions
from qnext_jax.layers import GatedRMSNorm, Linear, _init
from qnext_jax.sharding import constrain


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, opts: RuntimeOptions, *, dtype, rngs):
        D = cfg.hidden_size
        H, HV = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        K, V, W = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
        R = HV // H
        self.dims = (H, HV, K, V, R)
        k_heads = ("embed", "k_heads")  # out axes grouped per key head: splits by key heads
        kw = dict(dtype=dtype, rngs=rngs, opts=opts)
        self.in_proj_qkvz = Linear(D, H * (2 * K + 2 * R * V), axes=k_heads, **kw)
        self.in_proj_ba = Linear(D, H * 2 * R, axes=k_heads, **kw)
        self.conv_w = nnx.Param(  # [W, C]
            _init(rngs, (W, H * (2 * K + R * V)), dtype, std=0.3), axes=(None, "k_heads")
        )
        self.dt_bias = nnx.Param(jnp.ones((HV,), dtype), axes=("v_heads",))
        self.A_log = nnx.Param(
            jnp.log(jnp.linspace(1.0, 16.0, HV)).astype(dtype) if rngs else jnp.zeros((HV,), dtype),
            axes=("v_heads",),
        )
        self.norm = GatedRMSNorm(V, cfg.rms_norm_eps, dtype=dtype)
        self.out_proj = Linear(HV * V, D, axes=("v_heads", "embed"), **kw)
        self.gdn_impl, self.chunk_size, self.mesh = opts.gdn_impl, opts.chunk_size, opts.mesh

    def __call__(
        self,
        x,
        positions,
        cache: LayerCache | None,
        slots: CacheSlots | None = None,
        *,
        return_all_states=False,
        layer=None,
    ):
        """x [B,T,D]; positions [B,T] with -1 marking right padding (an exact no-op on the state).

        Returns (out [B,T,D], new cache or None); with return_all_states also the recurrent
        and conv states after every position (for speculative-decoding rollback). Without
        slots the recurrent state is handed to the kernel as the whole stack and updated there
        (in place on the GPU's decode path). layer: this layer's index in LayerStack's scan
        (the projections' weights may be the whole stacks)."""
        B, T, _ = x.shape
        H, HV, K, V, R = self.dims
        valid = positions >= 0
        qkvz = self.in_proj_qkvz(x, layer).reshape(B, T, H, 2 * K + 2 * R * V)
        mixed = qkvz[..., : 2 * K + R * V].reshape(B, T, -1)  # conv input, grouped per key head
        z = qkvz[..., 2 * K + R * V :].reshape(B, T, HV, V)
        ba = self.in_proj_ba(x, layer).reshape(B, T, H, 2 * R)
        b, a = ba[..., :R].reshape(B, T, HV), ba[..., R:].reshape(B, T, HV)

        conv_in = state_in = state_layer = None
        if cache is not None:
            own = cache.read()
            if slots is None:  # the whole stack and the layer
                conv_in, state_in, state_layer = own.conv, cache.stack.state, cache.layer
            else:
                conv_in, state_in = slots.gather(own.conv), slots.gather(own.state)
        mixed = jnp.where(valid[..., None], mixed, 0)
        conv_out, _ = ops.causal_conv1d(
            mixed, self.conv_w[...], conv_in, impl=self.gdn_impl, mesh=self.mesh
        )
        conv_out = conv_out.reshape(B, T, H, 2 * K + R * V)
        q, k = conv_out[..., :K], conv_out[..., K : 2 * K]
        v = conv_out[..., 2 * K :].reshape(B, T, HV, V)
        q, k = (constrain(a, ("batch", None, "k_heads", None), self.mesh) for a in (q, k))
        v = constrain(v, ("batch", None, "v_heads", None), self.mesh)

        beta = jax.nn.sigmoid(b).astype(jnp.float32)  # sigmoid in the activation dtype, as HF
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        )
        # padding: no decay, no write -> the state passes through unchanged
        beta = jnp.where(valid[..., None], beta, 0.0)
        g = jnp.where(valid[..., None], g, 0.0)

        result = ops.gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=state_in,
            state_layer=state_layer,
            impl=self.gdn_impl,
            chunk_size=self.chunk_size,
            return_all_states=return_all_states,
            mesh=self.mesh,
        )
        o, state = result[0], result[1]
        y = self.norm(o, z).reshape(B, T, HV * V)
        out = self.out_proj(y, layer)

        new_cache = None
        if cache is not None:
            conv_state = constrain(_last_inputs(conv_in, mixed, valid), GDN_CONV_AXES, self.mesh)
            new_cache = cache.write("conv", conv_state, slots)
            if slots is None:  # the whole stack, updated at the layer
                state = constrain(state, ("layers", *GDN_STATE_AXES), self.mesh)
                new_cache = new_cache.with_stack(state=state)
            else:
                state = constrain(state, GDN_STATE_AXES, self.mesh)
                new_cache = new_cache.write("state", state, slots)
        if return_all_states:
            return out, new_cache, (result[2], _all_conv_states(conv_in, mixed))
        return out, new_cache


def _last_inputs(conv_state, mixed, valid):
    """The last W-1 conv inputs of each row, counting only its valid (left-aligned) tokens."""
    Wm1 = conv_state.shape[1]
    ext = jnp.concatenate([conv_state.astype(mixed.dtype), mixed], axis=1)  # [B, W-1+T, C]
    n = jnp.sum(valid, axis=1)  # [B]
    idx = n[:, None] + jnp.arange(Wm1)[None, :]  # window ending at the last valid token
    return jnp.take_along_axis(ext, idx[..., None], axis=1)


def _all_conv_states(conv_state, mixed):
    """Conv state after each of the T positions: [B, T, W-1, C]."""
    Wm1, T = conv_state.shape[1], mixed.shape[1]
    ext = jnp.concatenate([conv_state.astype(mixed.dtype), mixed], axis=1)
    idx = jnp.arange(T)[:, None] + 1 + jnp.arange(Wm1)[None, :]  # [T, W-1]
    return ext[:, idx]
