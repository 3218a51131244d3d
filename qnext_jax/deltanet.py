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

from pallas_kernels.causal_conv1d import conv_state_after
from qnext_jax import ops
from qnext_jax.cache import GDN_CONV_AXES, GDN_STATE_AXES, CacheSlots, LayerCache
from qnext_jax.config import Qwen3NextConfig, RuntimeOptions
from qnext_jax.layers import GatedRMSNorm, Linear, _init, project
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
        self.norm = GatedRMSNorm(V, cfg.rms_norm_eps, dtype=dtype, opts=opts)
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
        qkvz, ba = project(x, (self.in_proj_qkvz, self.in_proj_ba), layer)
        qkvz = qkvz.reshape(B, T, H, 2 * K + 2 * R * V)
        mixed = qkvz[..., : 2 * K + R * V].reshape(B, T, -1)  # conv input, grouped per key head
        z = qkvz[..., 2 * K + R * V :].reshape(B, T, HV, V)
        ba = ba.reshape(B, T, H, 2 * R)  # per key head: b | a

        conv_in = state_in = state_layer = conv_stack = None
        # decode on the whole stacks: the conv updates its state in the stack itself
        conv_in_place = cache is not None and slots is None and T <= 8 and not return_all_states
        if cache is not None:
            own = cache.read()
            if slots is None:  # the whole stack and the layer
                conv_in, state_in, state_layer = own.conv, cache.stack.state, cache.layer
            else:
                conv_in, state_in = slots.gather(own.conv), slots.gather(own.state)
        # LayerStack keeps conv_w, A_log and dt_bias whole ([L, ...]) for decode sizes: the
        # kernels that update the layer's cache in place read them in place too (a slice would
        # be a copy); other paths take this layer's slice
        conv_w, A_log, dt_bias = self.conv_w[...], self.A_log[...], self.dt_bias[...]
        whole = conv_w.ndim == 3
        at_layer = lambda p: jax.lax.dynamic_index_in_dim(p, layer, keepdims=False)  # noqa: E731
        if whole and state_layer is None:
            A_log, dt_bias = at_layer(A_log), at_layer(dt_bias)
        mixed = jnp.where(valid[..., None], mixed, 0)
        n_valid = jnp.sum(valid, axis=1, dtype=jnp.int32)  # real tokens are left-aligned
        if conv_in_place:
            conv_out, conv_stack = ops.causal_conv1d_update(
                mixed,
                conv_w,
                cache.stack.conv,
                state_layer=cache.layer,
                n_valid=n_valid,
                impl=self.gdn_impl,
                mesh=self.mesh,
            )
        else:
            conv_w = at_layer(conv_w) if whole else conv_w
            conv_out, _ = ops.causal_conv1d(
                mixed, conv_w, conv_in, impl=self.gdn_impl, mesh=self.mesh
            )
        result = ops.gated_delta_rule_from_projections(
            conv_out.reshape(B, T, H, 2 * K + R * V),
            ba,
            A_log,
            dt_bias,
            n_valid,
            key_dim=K,
            initial_state=state_in,
            state_layer=state_layer,
            impl=self.gdn_impl,
            chunk_size=self.chunk_size,
            return_all_states=return_all_states,
            mesh=self.mesh,
        )
        o, state = result[0], result[1]
        # the gate straight from in_proj's output, viewed as rows of V (the norm kernel reads
        # it in place): z of group h is rows (2K + RV) / V ... of the group's 2K + 2RV
        if (2 * K) % V == 0:
            z_rows, z_at = qkvz.reshape(B * T, H, -1, V), (2 * K + R * V) // V
        else:
            z_rows, z_at = z.reshape(B * T, H, R, V), 0
        y = self.norm(o.reshape(B * T, H, R, V), z_rows, layer, z_offset=z_at)
        y = y.reshape(B, T, HV * V)
        out = self.out_proj(y, layer)

        new_cache = None
        if cache is not None:
            if conv_in_place:
                conv_stack = constrain(conv_stack, ("layers", *GDN_CONV_AXES), self.mesh)
                new_cache = cache.with_stack(conv=conv_stack)
            else:
                conv_state = conv_state_after(conv_in, mixed, n_valid)
                conv_state = constrain(conv_state, GDN_CONV_AXES, self.mesh)
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


def _all_conv_states(conv_state, mixed):
    """Conv state after each of the T positions: [B, T, W-1, C]."""
    Wm1, T = conv_state.shape[1], mixed.shape[1]
    ext = jnp.concatenate([conv_state.astype(mixed.dtype), mixed], axis=1)
    idx = jnp.arange(T)[:, None] + 1 + jnp.arange(Wm1)[None, :]  # [T, W-1]
    return ext[:, idx]
