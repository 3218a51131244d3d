"""The one seam for hot ops: each picks a Pallas kernel or the pure-jnp reference.

The model calls only these functions; `impl` strings come from RuntimeOptions. Every fast path
has a reference here with the same signature, so everything runs (and is checked) on CPU.
"""

from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp

from pallas_kernels.causal_conv1d import causal_conv1d_ref
from pallas_kernels.gated_delta_rule import (
    chunk_gated_delta_rule_ref,
    gdn_gates,
    recurrent_gated_delta_rule,
)
from pallas_kernels.moe import route_topk_ref
from pallas_kernels.rms_norm import gated_rms_norm_ref, rms_norm_ref
from qnext_jax import sharding


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


@functools.cache
def _kernel(module: str, name: str):
    """A Pallas kernel from pallas_kernels, or None where it is not built."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# ---- projections -----------------------------------------------------------------------------
LINEAR_IMPLS = ("auto", "pallas", "xla")


def linear_kernel_applies(impl: str, n_rows: int) -> bool:
    """Whether projections of n_rows rows may take the Pallas kernel (`linear` still checks each
    weight's shape): decode-sized batches (<= pallas_kernels.linear.MAX_ROWS rows), on the GPU
    ("auto") or on any backend when asked for ("pallas", interpret mode off the GPU)."""
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"linear_impl={impl!r}; allowed: " + ", ".join(map(repr, LINEAR_IMPLS)))
    if impl == "xla" or _kernel("pallas_kernels.linear", "linear") is None:
        return False
    return n_rows <= _kernel("pallas_kernels.linear", "MAX_ROWS") and (impl == "pallas" or on_gpu())


def linear(x, w, layer=None, *, axes=(None, None), impl: str = "auto", mesh=None):
    """x [..., K] @ w [K, M] -> [..., M] in x's dtype (fp32 sums).

    w may be a stack over layers [L, K, M] with `layer` (an int32 scalar, traced inside the
    layer scan) picking one: the Pallas kernel reads it in place; XLA's dot takes the layer's
    slice, which it copies first when the dot is a library call.
    axes: w's logical axes (input, output). With a mesh the kernel runs per device on its
    columns (output axis split) or on its rows of K (input axis split: the partial products
    are summed across devices in x's dtype, as the tensor-parallel all-reduce elsewhere)."""
    return linear_many(x, (w,), layer, axes=(axes,), impl=impl, mesh=mesh)[0]


def linear_many(x, ws, layer=None, *, axes, impl: str = "auto", mesh=None) -> tuple[jax.Array, ...]:
    """(x @ w for w in ws), each as `linear`: projections sharing their input in one kernel
    launch where the Pallas kernel takes them all (pallas_kernels.linear.linear_many); else one
    `linear` per weight. axes: each weight's logical axes; one launch needs a common input axis
    and all weights stacked or none."""
    *lead, K = x.shape
    n_rows = math.prod(lead)
    in_axis = axes[0][0]
    k_split = sharding.axis_size(mesh, in_axis) if in_axis else 1
    m_splits = [sharding.axis_size(mesh, a[1]) if a[1] else 1 for a in axes]
    applies = _kernel("pallas_kernels.linear", "kernel_applies")
    one_launch = (
        linear_kernel_applies(impl, n_rows)
        and len({a[0] for a in axes}) == 1
        and len({w.ndim for w in ws}) == 1
        and K % k_split == 0
        and all(
            w.shape[-1] % m == 0 and applies(n_rows, K // k_split, w.shape[-1] // m)
            for w, m in zip(ws, m_splits, strict=True)
        )
    )
    if not one_launch:
        if len(ws) > 1:  # each weight the kernel takes still takes it
            return tuple(
                linear(x, w, layer, axes=a, impl=impl, mesh=mesh)
                for w, a in zip(ws, axes, strict=True)
            )
        w = ws[0]
        if w.ndim == 3:
            w = jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)
        return (jnp.dot(x, w.astype(x.dtype)),)
    kernel = _kernel("pallas_kernels.linear", "linear_many")
    stacked = ws[0].ndim == 3

    def run(x2, ws, layer):
        ys = kernel(x2, ws, layer if stacked else None, interpret=not on_gpu())
        if in_axis and mesh is not None and k_split > 1:
            ys = tuple(jax.lax.psum(y, sharding.RULES[in_axis]) for y in ys)
        return ys

    w_axes = tuple((("layers",) if stacked else ()) + tuple(a) for a in axes)
    out_axes = tuple((None, a[1]) for a in axes)
    run = sharding.per_shard(run, mesh, ((None, in_axis), w_axes, ()), out_axes)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    ys = run(x.reshape(n_rows, K), tuple(ws), layer)
    return tuple(y.reshape(*lead, y.shape[-1]) for y in ys)


# ---- norms ---------------------------------------------------------------------------------
NORM_IMPLS = ("auto", "pallas", "xla")


def _norm_kernels_on(impl: str) -> bool:
    """Whether decode-sized norms may take the Pallas kernels: on the GPU ("auto") or on any
    backend when asked for ("pallas", interpret mode off the GPU)."""
    if impl not in NORM_IMPLS:
        raise ValueError(f"norm_impl={impl!r}; allowed: " + ", ".join(map(repr, NORM_IMPLS)))
    built = _kernel("pallas_kernels.rms_norm", "rms_norm") is not None
    return built and (impl == "pallas" or (impl == "auto" and on_gpu()))


def norm_kernel_applies(impl: str, n_rows: int, dim: int) -> bool:
    """Whether a norm of n_rows rows of `dim` takes the Pallas kernel: decode-sized batches
    (pallas_kernels.rms_norm.kernel_applies) where the kernels are on (`_norm_kernels_on`)."""
    applies = _kernel("pallas_kernels.rms_norm", "kernel_applies")
    return _norm_kernels_on(impl) and applies(n_rows, dim)


def rms_norm(x, w, layer=None, *, residual=None, eps: float, impl: str = "auto", mesh=None):
    """The zero-centred RMSNorm of x [..., D], or of x + residual, returned beside it (the
    residual stream's add folded into the norm: one kernel at decode). w [D], or a stack over
    layers [L, D] with `layer` picking one (read in place by the kernel). Replicated over a
    mesh: every device normalises every row."""
    *lead, D = x.shape
    n_rows = math.prod(lead)
    x2 = x.reshape(n_rows, D)
    r2 = None if residual is None else residual.reshape(n_rows, D)
    stacked = w.ndim == 2
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    if norm_kernel_applies(impl, n_rows, D):
        kernel = functools.partial(
            _kernel("pallas_kernels.rms_norm", "rms_norm"), eps=eps, interpret=not on_gpu()
        )
        rep, w_axes = (None, None), (None,) * w.ndim

        def normed(x, w, layer):
            return kernel(x, w, layer if stacked else None)

        def added_and_normed(x, r, w, layer):
            return kernel(x, w, layer if stacked else None, residual=r)

        if r2 is None:
            out = sharding.per_shard(normed, mesh, (rep, w_axes, ()), rep)(x2, w, layer)
        else:
            run = sharding.per_shard(added_and_normed, mesh, (rep, rep, w_axes, ()), (rep, rep))
            out = run(x2, r2, w, layer)
    else:
        out = rms_norm_ref(x2, w, layer if stacked else None, residual=r2, eps=eps)
    if r2 is None:
        return out.reshape(x.shape)
    return out[0].reshape(x.shape), out[1].reshape(x.shape)


def gated_rms_norm(o, z, w, layer=None, *, eps: float, z_offset: int = 0, impl="auto", mesh=None):
    """The Gated DeltaNet output norm, rmsnorm(o) * w * silu(z) per value head: o [N, H, R, V]
    (H key-head groups of R value heads), z [N, H, C, V] with head (h, r)'s gate at row
    z_offset + r (the in_proj output itself, read in place by the kernel); w [V], or a stack
    [L, V] with `layer` picking one. Over a mesh, per device on its key-head groups."""
    N, H, R, V = o.shape
    stacked = w.ndim == 2
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    applies = _kernel("pallas_kernels.rms_norm", "gated_kernel_applies")
    if _norm_kernels_on(impl) and applies(N, R, V):
        kernel = functools.partial(
            _kernel("pallas_kernels.rms_norm", "gated_rms_norm"),
            eps=eps,
            z_offset=z_offset,
            interpret=not on_gpu(),
        )

        def run(o, z, w, layer):
            return kernel(o, z, w, layer if stacked else None)

        heads = (None, "k_heads", None, None)
        w_axes = (None,) * w.ndim
        return sharding.per_shard(run, mesh, (heads, heads, w_axes, ()), heads)(o, z, w, layer)
    return gated_rms_norm_ref(o, z, w, layer if stacked else None, eps=eps, z_offset=z_offset)


# ---- gated delta rule ------------------------------------------------------------------------
# logical axes of the kernels' operands: split per head over a mesh (sharding.per_shard)
QK_AXES, V_AXES = ("batch", None, "k_heads", None), ("batch", None, "v_heads", None)
GATE_AXES, STATE_AXES = ("batch", None, "v_heads"), ("batch", "v_heads", None, None)
ALL_STATES_AXES = ("batch", None, "v_heads", None, None)
CONV_AXES = ("batch", None, "k_heads")  # x, y, state: channels grouped per key head


def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    initial_state=None,
    state_layer=None,
    impl: str = "auto",
    chunk_size: int = 64,
    return_all_states: bool = False,
    mesh=None,
):
    """q, k [B,T,H,K] (raw: l2-normalised and scaled here), v [B,T,HV,V], g/beta [B,T,HV],
    state [B,HV,K,V] fp32 -> (o [B,T,HV,V], final state[, states after each position]).
    With state_layer, initial_state is a stack of layers' states [L,B,HV,K,V]: the layer's
    state is read from it and the stack comes back with that layer updated (in place on the
    Pallas decode path, as a slice written back elsewhere).
    With a mesh the Pallas kernels run per device on its heads; the jnp references are
    partitioned by GSPMD."""
    T = q.shape[1]
    step = _kernel("pallas_kernels.gated_delta_rule", "fused_recurrent_gated_delta_rule")
    use_step = step is not None and _decode_kernel_applies(impl, T, return_all_states)
    run_step = functools.partial(
        _gdn_kernel, step, mesh, return_all_states=return_all_states, interpret=not on_gpu()
    )
    if state_layer is not None:
        stack = initial_state
        if use_step and stack.dtype == jnp.float32:
            return run_step(q, k, v, g, beta, stack, state_layer=state_layer)
        state = jax.lax.dynamic_index_in_dim(stack, state_layer, keepdims=False)
        out = gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=state,
            impl=impl,
            chunk_size=chunk_size,
            return_all_states=return_all_states,
            mesh=mesh,
        )
        new = jax.lax.dynamic_update_index_in_dim(stack, out[1].astype(stack.dtype), state_layer, 0)
        return (out[0], new, *out[2:])
    if use_step:
        return run_step(q, k, v, g, beta, initial_state)
    kw = dict(initial_state=initial_state, use_qk_l2norm=True)
    if return_all_states:
        return recurrent_gated_delta_rule(q, k, v, g, beta, return_all_states=True, **kw)
    if impl == "auto":
        impl = "pallas" if on_gpu() and T > 8 else ("recurrent" if T <= 8 else "chunked")
    if impl == "pallas" and T > 8:
        chunk = _kernel("pallas_kernels.gated_delta_rule", "chunk_gated_delta_rule")
        if chunk is not None:
            interpret = not on_gpu()
            return _gdn_kernel(chunk, mesh, q, k, v, g, beta, initial_state, interpret=interpret)
    if impl in ("pallas", "chunked"):  # no kernels here: the chunked reference
        return chunk_gated_delta_rule_ref(q, k, v, g, beta, chunk_size=chunk_size, **kw)
    if impl == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    raise ValueError(f"gdn_impl={impl!r}; allowed: 'auto', 'pallas', 'chunked', 'recurrent'")


def gated_delta_rule_from_projections(
    qkv,
    ba,
    A_log,
    dt_bias,
    n_valid,
    *,
    key_dim: int,
    initial_state=None,
    state_layer=None,
    impl: str = "auto",
    chunk_size: int = 64,
    return_all_states: bool = False,
    mesh=None,
):
    """The Gated DeltaNet recurrence from the layer's projections, grouped per key head h as
    the checkpoint stores them: qkv [B,T,H,2K+R*V] = q_h | k_h | v of value heads h*R..h*R+R-1
    (the conv output), ba [B,T,H,2R] = b | a of those heads; A_log, dt_bias [HV]; n_valid [B]
    real tokens per right-padded row (past them g = beta = 0: the state passes unchanged).
    With state_layer, A_log and dt_bias may be stacked like the state, [L,HV].

      beta = sigmoid(b) (in b's dtype, as HF), g = -exp(A_log) * softplus(a + dt_bias) (fp32)
      -> gated_delta_rule(l2norm(q), l2norm(k), v, g, beta)

    The decode step on a state stack (state_layer, T <= 8) is one kernel on the GPU: q, k, v
    read in place from qkv and the gates computed inside (`fused_gdn_decode`); otherwise the
    pieces are split here and handed to `gated_delta_rule`. Returns as `gated_delta_rule`."""
    B, T, H, _ = qkv.shape
    K = key_dim
    HV = A_log.shape[-1]
    R = HV // H
    V = (qkv.shape[3] - 2 * K) // R
    fused = _kernel("pallas_kernels.gated_delta_rule", "fused_gdn_decode")
    if (
        fused is not None
        and state_layer is not None
        and initial_state.dtype == jnp.float32
        and not return_all_states
        and _decode_kernel_applies(impl, T, False)
    ):
        group_axes = ("batch", None, "k_heads", None)
        head_axes = ("v_heads",) if A_log.ndim == 1 else ("layers", "v_heads")
        in_axes = (group_axes, group_axes, head_axes, head_axes, ("batch",))
        in_axes += (("layers", *STATE_AXES), ())
        out_axes = (V_AXES, ("layers", *STATE_AXES))

        def run(qkv, ba, A_log, dt_bias, n_valid, stack, layer):
            return tuple(
                fused(
                    qkv,
                    ba,
                    A_log,
                    dt_bias,
                    stack,
                    layer,
                    key_dim=K,
                    n_valid=n_valid,
                    interpret=not on_gpu(),
                )
            )

        layer = jnp.asarray(state_layer, jnp.int32)
        args = (qkv, ba, A_log, dt_bias, n_valid, initial_state, layer)
        return sharding.per_shard(run, mesh, in_axes, out_axes)(*args)
    if A_log.ndim == 2:  # stacked over the state's layers
        A_log, dt_bias = (
            jax.lax.dynamic_index_in_dim(a, state_layer, 0, False) for a in (A_log, dt_bias)
        )
    q, k = qkv[..., :K], qkv[..., K : 2 * K]
    v = qkv[..., 2 * K :].reshape(B, T, HV, V)
    q, k = (sharding.constrain(a, QK_AXES, mesh) for a in (q, k))
    v = sharding.constrain(v, V_AXES, mesh)
    b, a = ba[..., :R].reshape(B, T, HV), ba[..., R:].reshape(B, T, HV)
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    real = (jnp.arange(T)[None, :] < n_valid[:, None])[..., None]
    return gated_delta_rule(
        q,
        k,
        v,
        jnp.where(real, g, 0.0),
        jnp.where(real, beta.astype(jnp.float32), 0.0),
        initial_state=initial_state,
        state_layer=state_layer,
        impl=impl,
        chunk_size=chunk_size,
        return_all_states=return_all_states,
        mesh=mesh,
    )


def _decode_kernel_applies(impl: str, T: int, return_all_states: bool) -> bool:
    """Whether gated_delta_rule runs the fused decode (token-loop) kernel: for T <= 8, and for
    any pass that keeps every position's state; on the GPU ("auto") or on any backend
    (impl="pallas", interpret mode off the GPU)."""
    if impl not in ("auto", "pallas") or not (T <= 8 or return_all_states):
        return False
    return impl == "pallas" or on_gpu()


def _gdn_kernel(kernel, mesh, q, k, v, g, beta, initial_state, state_layer=None, **kw):
    """A GDN kernel per device on its heads; with state_layer, initial_state is the layer stack
    [L, B, HV, K, V] (the decode kernel updates it in place)."""
    if initial_state is None and mesh is not None:  # shard_map needs an array to split
        (B, _, _, K), (HV, V) = q.shape, v.shape[2:]
        initial_state = jnp.zeros((B, HV, K, V), jnp.float32)
    state_axes = STATE_AXES if state_layer is None else ("layers", *STATE_AXES)
    out_axes = (V_AXES, state_axes, ALL_STATES_AXES)[: 3 if kw.get("return_all_states") else 2]
    in_axes = (QK_AXES, QK_AXES, V_AXES, GATE_AXES, GATE_AXES, state_axes)
    args = (q, k, v, g, beta, initial_state)
    if state_layer is not None:  # a replicated int32 scalar
        in_axes, args = (*in_axes, ()), (*args, jnp.asarray(state_layer, jnp.int32))

    def run(q, k, v, g, beta, state, *layer):
        at = {"state_layer": layer[0]} if layer else {}
        return tuple(kernel(q, k, v, g, beta, initial_state=state, use_qk_l2norm=True, **at, **kw))

    return sharding.per_shard(run, mesh, in_axes, out_axes)(*args)


# ---- causal depthwise conv1d ---------------------------------------------------------------
def causal_conv1d(x, weight, initial_state=None, *, impl: str = "auto", mesh=None):
    """x [B,T,C], weight [W,C], state [B,W-1,C] -> (silu(conv(x)) [B,T,C], state)."""
    if impl in ("auto", "pallas") and on_gpu():
        kernel = _kernel("pallas_kernels.causal_conv1d", "causal_conv1d")
        if kernel is not None:
            return conv_per_shard(kernel, mesh, x, weight, initial_state)
    return causal_conv1d_ref(x, weight, initial_state, activation="silu")


def conv_per_shard(kernel, mesh, x, weight, initial_state, **kw):
    """The conv kernel on each device's channels (they are grouped per key head)."""
    if initial_state is None and mesh is not None:
        initial_state = jnp.zeros((x.shape[0], weight.shape[0] - 1, x.shape[2]), x.dtype)

    def run(x, weight, state):
        return tuple(kernel(x, weight, state, activation="silu", **kw))

    in_axes = (CONV_AXES, (None, "k_heads"), CONV_AXES)
    return sharding.per_shard(run, mesh, in_axes, (CONV_AXES, CONV_AXES))(x, weight, initial_state)


def causal_conv1d_update(
    x, weight, state, *, state_layer=None, n_valid=None, impl: str = "auto", mesh=None
):
    """Decode update of T <= 8 tokens: x [B,T,C], weight [W,C], state [B,W-1,C] (or with
    state_layer the stack [L,B,W-1,C], updated at the layer) -> (silu(conv(x)) [B,T,C], new
    state or stack). n_valid [B]: real tokens per (right-padded) row; the state advances by
    those only. With state_layer the weight may be stacked over the same layers, [L,W,C].
    On the GPU ("auto") or when asked ("pallas") one kernel that also writes the state (in
    place in the stack); else the reference and a slice update of the stack."""
    update = _kernel("pallas_kernels.causal_conv1d", "causal_conv1d_update")
    if update is not None and (impl == "pallas" or (impl == "auto" and on_gpu())):
        stack_axes = CONV_AXES if state_layer is None else ("layers", *CONV_AXES)
        w_axes = (None, "k_heads") if weight.ndim == 2 else ("layers", None, "k_heads")
        in_axes = [CONV_AXES, w_axes, stack_axes, ("batch",)]
        if n_valid is None:
            n_valid = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
        args = [x, weight, state, n_valid]
        if state_layer is not None:  # a replicated int32 scalar
            in_axes.append(())
            args.append(jnp.asarray(state_layer, jnp.int32))

        def run(x, weight, state, n_valid, *layer):
            return tuple(
                update(
                    x,
                    weight,
                    state,
                    state_layer=layer[0] if layer else None,
                    n_valid=n_valid,
                    interpret=not on_gpu(),
                )
            )

        out_axes = (CONV_AXES, stack_axes)
        return sharding.per_shard(run, mesh, tuple(in_axes), out_axes)(*args)
    if state_layer is None:
        return causal_conv1d_ref(x, weight, state, activation="silu", n_valid=n_valid)
    own = jax.lax.dynamic_index_in_dim(state, state_layer, keepdims=False)
    if weight.ndim == 3:
        weight = jax.lax.dynamic_index_in_dim(weight, state_layer, keepdims=False)
    y, new = causal_conv1d_ref(x, weight, own, activation="silu", n_valid=n_valid)
    return y, jax.lax.dynamic_update_index_in_dim(state, new.astype(state.dtype), state_layer, 0)


# ---- attention -----------------------------------------------------------------------------
ATTENTION_IMPLS = ("dense", "blockwise", "cudnn", "pallas")
# Score bytes (fp32, all heads and rows) one dense call or one key block may hold: above it,
# "auto" walks the keys in blocks (a 256K cache under an 8K-token prefill chunk would otherwise
# need a 64 GiB score matrix per GPU).
SCORE_BYTES = 1 << 28
MIN_KEY_BLOCK = 256
# cuDNN's fused flash attention ("cudnn"). Given the chunk's own keys (a prefill chunk at
# contiguous positions over a cache), it runs as two bias-free calls: the chunk causally against
# itself and the queries against the cache prefix [0, p0), merged by their log-sum-exps. Other
# calls pass the position mask as a bf16 bias [B, 1, T, S], which cuDNN reads for every
# (query, key) block; "auto" takes that form only while the bias stays under BIAS_BYTES (an
# 8K chunk over an 8K cache: 128 MiB), and only for T >= MIN_CUDNN_QUERIES (prefill chunks;
# decode and speculative verify passes stay dense).
BIAS_BYTES = 1 << 30
MIN_CUDNN_QUERIES = 64


def attention(q, k, v, q_pos, k_pos, *, scale: float, impl: str = "auto", chunk=None):
    """Causal GQA attention by position: key s is visible to query t iff 0 <= k_pos[s] <= q_pos[t].

    q [B,T,H,D], k/v [B,S,KVH,D], q_pos [B,T], k_pos [B,S] (-1 marks an empty slot).
    Softmax in fp32; KV heads are never repeated (query heads grouped per KV head); a query
    that sees no key gets zeros. impl: "dense" (one score matrix), "blockwise" (flash-style
    online softmax over key blocks, blocks no query can see skipped), "cudnn" (cuDNN's fused
    flash attention; GPU, bf16 / fp16 only), "auto" (cudnn for prefill chunks on the GPU,
    see BIAS_BYTES; else dense while the scores fit in SCORE_BYTES, else blockwise);
    "pallas" is the decode kernel (`cache_attention`) and here means "auto".
    chunk: (k_new, v_new) [B,T,KVH,D], the queries' own keys and values, where k / v are a
    cache that already holds them at index = position (k_pos[b, s] = s). Where each row's
    queries sit at contiguous positions p0 + t (then right padding, < 0), "cudnn" needs no
    bias; other rows make the call fall back to the masked form (checked on the device)."""
    if impl not in ("auto", *ATTENTION_IMPLS):
        raise ValueError(f"attention impl={impl!r}; allowed: 'auto', {ATTENTION_IMPLS}")
    impl = "auto" if impl == "pallas" else impl
    B, T, H, _ = q.shape
    S = k.shape[1]
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    bias_fits = B * T * S * 2 <= BIAS_BYTES
    if impl == "auto" and on_gpu() and half and T >= MIN_CUDNN_QUERIES:
        if chunk is not None or bias_fits:
            impl = "cudnn"
    if impl == "cudnn":
        if not on_gpu() or not half:
            raise ValueError(
                f"attention impl='cudnn' needs a GPU and bf16 / fp16 inputs; got backend "
                f"{jax.default_backend()!r}, q dtype {q.dtype}"
            )
        if chunk is None:
            return _attention_cudnn(q, k, v, q_pos, k_pos, scale)
        fallback = "cudnn" if bias_fits else "blockwise"
        return _attention_split(q, *chunk, k, v, q_pos, k_pos, scale, "cudnn", fallback)
    if impl == "dense" or (impl == "auto" and B * H * T * S * 4 <= SCORE_BYTES):
        return _attention_dense(q, k, v, q_pos, k_pos, scale)
    block = SCORE_BYTES // (B * H * T * 4)
    block = min(max(MIN_KEY_BLOCK, 1 << max(block.bit_length() - 1, 0)), S)
    return _attention_blockwise(q, k, v, q_pos, k_pos, scale, block)


# Decode and verify passes (up to MAX_DECODE_QUERIES queries per sequence) read the cache
# through the Pallas decode kernel: the layer straight from the cache stack (XLA's attention
# reads a copy of the layer's slice), split along the sequence so long contexts use every SM.
MAX_DECODE_QUERIES = 8
Q_AXES, KV_STACK_AXES = ("batch", None, "heads", None), ("layers", "batch", None, "kv_heads", None)


def cache_attention_applies(
    impl: str, T: int, S: int, kv_heads: int, head_dim: int, mesh=None
) -> bool:
    """Whether `cache_attention` serves these queries: T <= MAX_DECODE_QUERIES, a cache length
    that is a multiple of 16 and a head dim that is a power of 2 >= 16 (the kernel's blocks),
    KV heads that split evenly over the mesh's tensor axis (each device then holds the KV
    heads of its query heads); on the GPU ("auto") or asked for ("pallas")."""
    if impl not in ("auto", "pallas") or T > MAX_DECODE_QUERIES or S % 16:
        return False
    if head_dim < 16 or head_dim & (head_dim - 1):
        return False
    if mesh is not None and kv_heads % sharding.axis_size(mesh, "kv_heads"):
        return False
    if _kernel("pallas_kernels.attention", "decode_attention") is None:
        return False
    return impl == "pallas" or on_gpu()


def cache_attention(q, k_stack, v_stack, layer, q_pos, *, scale: float, mesh=None):
    """q [B,T,H,D] against layer `layer` of the cache stacks [L,B,S,KVH,D] (position s at index
    s): query t sees keys s <= q_pos[b, t] (< 0: none, zeros). Per device on its heads."""
    kernel = _kernel("pallas_kernels.attention", "decode_attention")

    def run(q, k, v, pos, layer):
        return kernel(q, k, v, pos, layer=layer, scale=scale, interpret=not on_gpu())

    in_axes = (Q_AXES, KV_STACK_AXES, KV_STACK_AXES, ("batch", None), ())
    layer = jnp.asarray(layer, jnp.int32)
    return sharding.per_shard(run, mesh, in_axes, Q_AXES)(q, k_stack, v_stack, q_pos, layer)


def _sdpa_lse(q, k, v, q_len, kv_len, *, causal: bool, scale: float, implementation: str):
    """(out [B,T,H,D], log-sum-exp of the scaled scores [B,T,H] fp32) of softmax attention over
    the first kv_len[b] keys (top-left causal if `causal`); rows t >= q_len[b] are garbage."""
    if implementation == "cudnn":
        # jax.nn.dot_product_attention rounds cuDNN's fp32 log-sum-exp to the output dtype
        # (bf16: ~0.06 at 16, a 6% error in a merge weight); the function it wraps keeps it.
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        mask = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
        out, lse = cudnn.dot_product_attention(
            q, k, v, None, None, q_len, kv_len, scale=scale, mask_type=mask, return_residual=True
        )
        return out, jnp.swapaxes(lse, 1, 2).astype(jnp.float32)  # [B,H,T] -> [B,T,H]
    out, lse = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=causal,
        query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len,
        implementation=implementation,
        return_residual=True,
    )
    return out, lse.astype(jnp.float32)


def _attention_split(q, k_new, v_new, k, v, q_pos, k_pos, scale, implementation, fallback):
    """A chunk at contiguous positions p0 + t (t < n; padding after) over a cache holding it at
    index = position: the chunk against itself (causal) and against the prefix [0, p0), merged
    as one softmax by their log-sum-exps. Rows that break the layout take `fallback`."""
    B, T = q_pos.shape
    t = jnp.arange(T, dtype=jnp.int32)
    n = jnp.sum(q_pos >= 0, axis=1, dtype=jnp.int32)  # valid queries per row
    p0 = jnp.maximum(q_pos[:, 0], 0).astype(jnp.int32)
    valid = t[None] < n[:, None]  # [B, T]
    contiguous = jnp.all(jnp.where(valid, q_pos == p0[:, None] + t[None], q_pos < 0))
    sdpa = functools.partial(_sdpa_lse, scale=scale, implementation=implementation)

    def split(_):
        o_self, lse_self = sdpa(q, k_new, v_new, n, n, causal=True)
        o_pre, lse_pre = sdpa(q, k, v, n, p0, causal=False)
        has_prefix = (p0 > 0)[:, None, None]  # [B, 1, 1]; without one the call saw no key
        lse_pre = jnp.where(has_prefix, lse_pre, -jnp.inf)
        m = jnp.maximum(lse_self, lse_pre)
        w_self, w_pre = jnp.exp(lse_self - m)[..., None], jnp.exp(lse_pre - m)[..., None]
        o_pre = jnp.where(has_prefix[..., None], o_pre.astype(jnp.float32), 0.0)
        out = (o_self.astype(jnp.float32) * w_self + o_pre * w_pre) / (w_self + w_pre)
        return jnp.where(valid[:, :, None, None], out, 0.0).astype(q.dtype)

    def masked(_):
        return attention(q, k, v, q_pos, k_pos, scale=scale, impl=fallback)

    return jax.lax.cond(contiguous, split, masked, None)


def _attention_dense(q, k, v, q_pos, k_pos, scale):
    B, T, H, D = q.shape
    KVH = k.shape[2]
    qg = q.reshape(B, T, KVH, H // KVH, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)  # [B,T,S]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible[:, None, None], probs, 0.0).astype(v.dtype)  # rows with no key
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, D).astype(q.dtype)


def _attention_cudnn(q, k, v, q_pos, k_pos, scale):
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)  # [B,T,S]
    out = jax.nn.dot_product_attention(
        q, k, v, mask=visible[:, None], scale=scale, implementation="cudnn"
    )
    # a query with no visible key (padding) gets zeros, as the other paths give
    return jnp.where(jnp.any(visible, axis=-1)[:, :, None, None], out, 0).astype(q.dtype)


def _attention_blockwise(q, k, v, q_pos, k_pos, scale, block: int):
    """Online softmax over key blocks of `block` (a lax.scan; the running max, sum and output
    in fp32). A block whose keys are all later than every query, or empty, is skipped by a
    lax.cond, so a chunk of a long prompt pays for the keys it sees, not for the cache."""
    B, T, H, D = q.shape
    S, KVH = k.shape[1], k.shape[2]
    n = -(-S // block)
    pad = n * block - S
    if pad:
        k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=-1)
    kb, vb = (a.reshape(B, n, block, KVH, D).swapaxes(0, 1) for a in (k, v))
    pb = k_pos.reshape(B, n, block).swapaxes(0, 1)
    qg = q.reshape(B, T, KVH, H // KVH, D)
    q_last = jnp.max(q_pos)
    carry = (
        jnp.full((B, KVH, H // KVH, T), -jnp.inf, jnp.float32),  # running max
        jnp.zeros((B, KVH, H // KVH, T), jnp.float32),  # running sum
        jnp.zeros((B, T, KVH, H // KVH, D), jnp.float32),  # running output
    )

    def update(carry, kv):
        m, l, acc = carry
        kk, vv, kp = kv
        s = jnp.einsum("btkgd,bskd->bkgts", qg, kk, preferred_element_type=jnp.float32) * scale
        visible = (kp[:, None, :] <= q_pos[:, :, None]) & (kp[:, None, :] >= 0)
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # no key seen yet: nothing to scale
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
            "bkgts,bskd->btkgd", p.astype(v.dtype), vv, preferred_element_type=jnp.float32
        )
        acc = acc * jnp.moveaxis(alpha, -1, 1)[..., None] + pv
        return m_new, l, acc

    def body(carry, kv):
        kp = kv[2]
        seen = jnp.any((kp >= 0) & (kp <= q_last))
        return jax.lax.cond(seen, update, lambda c, _: c, carry, kv), None

    (_, l, acc), _ = jax.lax.scan(body, carry, (kb, vb, pb))
    l = jnp.moveaxis(l, -1, 1)[..., None]
    out = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)
    return out.reshape(B, T, H, D).astype(q.dtype)


# ---- routed experts ------------------------------------------------------------------------
MOE_IMPLS = ("gather", "ragged", "dense", "grouped", "pallas")


def route(logits, k: int, normalize: bool, *, impl: str = "auto", mesh=None):
    """The router: logits [N, E] -> (weights [N, k] fp32, expert ids [N, k] int32), fp32
    softmax over E, the k largest, renormalised over the k when `normalize`. On the GPU ("auto")
    or when asked for ("pallas") one Pallas program per token (pallas_kernels.moe.route_topk;
    E a power of 2); else its jnp reference (softmax + lax.top_k). Both pick the lowest index
    among equal values."""
    kernel = _kernel("pallas_kernels.moe", "route_topk")
    applies = _kernel("pallas_kernels.moe", "route_kernel_applies")
    if (
        kernel is not None
        and (impl == "pallas" or (impl == "auto" and on_gpu()))
        and applies(logits.shape[-1])
    ):
        run = functools.partial(kernel, k=k, normalize=normalize, interpret=not on_gpu())
        rep = (None, None)  # the logits are replicated: each device routes every token
        return sharding.per_shard(run, mesh, (rep,), (rep, rep))(logits)
    return route_topk_ref(logits, k, normalize)


def moe_experts(
    x,
    weights,
    experts,
    w_gate_up,
    w_down,
    *,
    impl: str = "auto",
    mesh=None,
    layer=None,
    shared=None,
    shared_impl: str = "xla",
):
    """sum_j weights[n, j] * Expert_{experts[n, j]}(x[n]).

    x [N,D]; weights [N,k] fp32; experts [N,k] int32; w_gate_up [E,D,2F] (gate | up);
    w_down [E,F,D]. Returns [N,D] in x.dtype (products in x.dtype, sum over k in fp32; over an
    expert-parallel mesh the devices' partial sums are added in x.dtype).
    With `layer` (an int32 scalar, traced inside a scan over layers) the weights are the whole
    stacks [L,E,D,2F] / [L,E,F,D] and layer picks one: the Pallas kernel reads the stack in
    place, the XLA paths index it.
    shared: (w_gate, w_up, w_down, scale) of the shared expert, added as scale * its output
    (on one device, or folded into the expert-parallel psum where
    sharding.shared_expert_joins_psum). Its weights may be whole stacks [L, ...] too (with
    `layer`). On the Pallas decode path it rides as more tiles of the routed kernels; elsewhere
    its projections run as `linear` with impl=shared_impl, per device.
    With a mesh whose expert axis is > 1, each device runs its own experts on the (replicated)
    tokens routed to them and the partial sums are combined by one psum (sharding.expert_parallel
    says why psum rather than all-to-all)."""
    N, k = experts.shape
    have_kernels = _kernel("pallas_kernels.moe", "moe_experts_decode") is not None
    if impl == "auto":
        # GPU: the grouped Pallas kernels (a GEMV per touched expert for decode batches, a
        # grouped GEMM over row tiles for prefill); lax.ragged_dot falls back to a dense matmul
        # over all groups there, and the XLA capacity-padded path ("grouped") spends most of
        # its time scattering rows into [E, C, D].
        if on_gpu():
            impl = "pallas" if have_kernels else "grouped"
        else:
            impl = "gather" if N * k <= 64 else "ragged"
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl={impl!r}; allowed: 'auto', " + ", ".join(map(repr, MOE_IMPLS)))
    if impl == "pallas" and not have_kernels:
        raise ValueError("moe_impl='pallas' needs the pallas_kernels package, not importable here")
    routed = functools.partial(_routed_experts, impl=impl, shared_impl=shared_impl)
    single = mesh is None or mesh.size == 1
    if shared is not None and not (
        single or sharding.shared_expert_joins_psum(mesh, shared[0].shape[-1])
    ):
        raise ValueError(
            "shared= needs one device or a mesh where sharding.shared_expert_joins_psum"
        )
    if sharding.expert_parallel_size(mesh) > 1:
        out = sharding.expert_parallel(
            routed, mesh, x, weights, experts, w_gate_up, w_down, layer=layer, shared=shared
        )
    else:
        out = routed(x, weights, experts, w_gate_up, w_down, layer, shared)
    return out.astype(x.dtype)


def _routed_experts(
    x, weights, experts, w_gate_up, w_down, layer=None, shared=None, *, impl, shared_impl
):
    """fp32 [N,D]; ids outside [0, E) (experts held by another device) contribute nothing.
    shared = (w_gate, w_up, w_down, scale [N, 1]): the shared expert (this device's slice of
    its ffw), added as scale * its output. On the decode kernel it rides as more tiles of the
    routed kernels (no launches of its own); elsewhere three `linear`s with impl=shared_impl."""
    E = w_gate_up.shape[-3]
    here = (experts >= 0) & (experts < E)  # [N,k]
    h_shared = None
    if impl == "pallas":  # reads a stacked [L, E, ...] in place; foreign ids give zero rows
        # each (token, slot) result rounded to x's dtype, as the XLA paths here and the
        # transformers model do: half the bytes of fp32 for down to write and the combine
        # below to read back (at an 8K prefill chunk, 81,920 rows of D per layer)
        moe = "pallas_kernels.moe"
        kw = dict(interpret=not on_gpu(), out_dtype=x.dtype)
        decode = x.shape[0] <= _kernel(moe, "MAX_TOKENS")
        kernel = _kernel(moe, "moe_experts_decode" if decode else "moe_experts_prefill")
        if decode:  # read at each trace, uncached: benchmarks set it between cases
            kw["blocks"] = importlib.import_module(moe).DECODE_BLOCKS
        fits = _kernel(moe, "shared_tile_applies")
        if decode and shared is not None and fits(w_gate_up.shape[-1] // 2, shared[0].shape[-1]):
            kw["shared"] = shared[:3]  # more tiles of the decode kernels
        h = kernel(x, experts, w_gate_up, w_down, layer, **kw)
        if "shared" in kw:
            h, h_shared = h
    else:
        if layer is not None:
            w_gate_up = jax.lax.dynamic_index_in_dim(w_gate_up, layer, 0, keepdims=False)
            w_down = jax.lax.dynamic_index_in_dim(w_down, layer, 0, keepdims=False)
        if impl in ("ragged", "grouped"):
            grouped = _expert_ragged if impl == "ragged" else _expert_grouped
            h = grouped(x, jnp.where(here, experts, E), w_gate_up, w_down)  # E: sorted last
        else:
            clipped = jnp.clip(experts, 0, E - 1)
            expert = _expert_gather if impl == "gather" else _expert_dense
            h = expert(x, clipped, w_gate_up, w_down)
    h = jnp.where(here[..., None], h.astype(jnp.float32), 0.0)  # [N,k,D]
    # a multiply and a sum rather than a dot, so XLA may fuse them with the kernels' row
    # gather (no change measured in the 80B's 8K prefill; decode not measured separately)
    out = jnp.sum(jnp.where(here, weights, 0.0)[..., None] * h, axis=1)
    if shared is None:
        return out
    w_gate, w_up, w_down, scale = shared
    if h_shared is None:

        def project(x, w):
            return linear(x, w, layer if w.ndim == 3 else None, impl=shared_impl)

        act = jax.nn.silu(project(x, w_gate)) * project(x, w_up)
        h_shared = project(act, w_down)  # in x's dtype, as the SwiGLU module
    return out + h_shared.astype(jnp.float32) * scale.astype(jnp.float32)


def _swiglu(gate_up):
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _expert_gather(x, experts, w_gate_up, w_down):
    """Decode path: gather the k experts of each token (reads only touched experts)."""
    gu = jnp.einsum("nd,nkdf->nkf", x, w_gate_up[experts].astype(x.dtype))
    return jnp.einsum("nkf,nkfd->nkd", _swiglu(gu), w_down[experts].astype(x.dtype))


def _expert_dense(x, experts, w_gate_up, w_down):
    """Every expert on every token, then pick: the simplest reference (small E only)."""
    gu = jnp.einsum("nd,edf->nef", x, w_gate_up.astype(x.dtype))
    h = jnp.einsum("nef,efd->ned", _swiglu(gu), w_down.astype(x.dtype))
    return jnp.take_along_axis(h, experts[..., None], axis=1)


def _expert_ragged(x, experts, w_gate_up, w_down):
    """Prefill path: sort (token, slot) pairs by expert, grouped matmul, unsort.
    Ids == E (not on this device) sort last, outside every group: ragged_dot gives them 0."""
    N, k = experts.shape
    E = w_gate_up.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]  # [N*k, D]
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    gu = jax.lax.ragged_dot(rows, w_gate_up.astype(x.dtype), sizes)
    h = jax.lax.ragged_dot(_swiglu(gu), w_down.astype(x.dtype), sizes)
    out = jnp.zeros_like(h).at[order].set(h)
    return out.reshape(N, k, -1)


def _expert_grouped(x, experts, w_gate_up, w_down, capacity: int | None = None):
    """Dropless grouped matmul in plain XLA: the (token, slot) rows sorted by expert are laid
    out [E, C, D] with a static capacity C (about twice the mean load), one batched matmul per
    projection; an expert with more than C rows takes further passes (a while loop). Ids == E
    (experts on another device) are skipped. Returns [N, k, D]."""
    N, k = experts.shape
    E, D = w_gate_up.shape[0], x.shape[1]
    M = N * k
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    counts = jnp.bincount(flat, length=E + 1)[:E]
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(M) - starts[jnp.clip(sorted_e, 0, E - 1)]  # position within its expert
    C = capacity or min(M, max(8, -(-2 * M // E + 7) // 8 * 8))
    rows = x[order // k]  # [M, D]
    n_pass = (jnp.max(counts) + C - 1) // C

    def one_pass(p, out):
        sel = (rank >= p * C) & (rank < (p + 1) * C) & (sorted_e < E)
        slot = jnp.where(sel, sorted_e * C + rank - p * C, E * C)  # out of range: dropped
        buf = jnp.zeros((E * C, D), x.dtype).at[slot].set(rows, mode="drop").reshape(E, C, D)
        gu = jnp.einsum("ecd,edf->ecf", buf, w_gate_up.astype(x.dtype))
        h = jnp.einsum("ecf,efd->ecd", _swiglu(gu), w_down.astype(x.dtype)).reshape(E * C, D)
        got = jnp.take(h, slot, axis=0, mode="fill", fill_value=0)
        return out + jnp.where(sel[:, None], got, 0).astype(out.dtype)

    out = jax.lax.fori_loop(0, n_pass, one_pass, jnp.zeros((M, D), x.dtype))
    return jnp.zeros_like(out).at[order].set(out).reshape(N, k, D)
