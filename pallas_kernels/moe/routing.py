"""The MoE router's top-k as one Pallas (Triton backend) kernel: softmax over the experts, the
k largest, their weights (renormalised over the k, or the plain softmax probabilities).

XLA runs `softmax -> lax.top_k -> renormalise` as a sort of every row plus four or five small
fusions (~12 us per MoE layer at decode sizes on the H200, the sort alone 5.5 us). Here one
program owns one token: it loads the row of E logits, takes the maximum k times (the lowest
index among equal values first, as lax.top_k), masking each pick out, and writes the k ids and
weights. Top-k of the logits is top-k of the softmax (a monotonic map), so the softmax is only
evaluated at the k picks: weights = exp(l - max) / sum over the k of exp(l - max) when
renormalising (the sum over all E otherwise).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._triton import compiler_params


def validate_route_inputs(logits, k: int) -> tuple[int, int]:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, E], got shape {tuple(logits.shape)}")
    N, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"k={k} must be in [1, E={E}]")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be a floating dtype, got {logits.dtype}")
    return N, E


def route_topk_ref(logits, k: int, normalize: bool):
    """logits [N, E] -> (weights [N, k] fp32, ids [N, k] int32): fp32 softmax over E, the k
    largest, renormalised over the k when `normalize` (HF's Qwen3-Next router)."""
    validate_route_inputs(logits, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def _kernel(logits_ref, w_ref, id_ref, *, k: int, normalize: bool):
    # logits_ref [E] one token's router logits; w_ref [KP] fp32, id_ref [KP] int32 (KP >= k,
    # slots past k written as 0)
    x = logits_ref[...].astype(jnp.float32)
    E, KP = x.shape[0], w_ref.shape[0]
    iota = jnp.arange(E, dtype=jnp.int32)
    slot = jnp.arange(KP, dtype=jnp.int32)
    top = jnp.max(x)
    vals = jnp.zeros((KP,), jnp.float32)
    ids = jnp.zeros((KP,), jnp.int32)
    rest = x
    for j in range(k):  # k is small (10): unrolled
        m = jnp.max(rest)
        i = jnp.min(jnp.where(rest == m, iota, E))  # the lowest index of the maximum
        vals = jnp.where(slot == j, m, vals)
        ids = jnp.where(slot == j, i, ids)
        rest = jnp.where(iota == i, -jnp.inf, rest)
    e = jnp.where(slot < k, jnp.exp(vals - top), 0.0)
    total = jnp.sum(e) if normalize else jnp.sum(jnp.exp(x - top))
    w_ref[...] = e / total
    id_ref[...] = ids


def route_kernel_applies(E: int) -> bool:
    """The kernel holds a row of E logits as one block: E a power of 2."""
    return E >= 1 and E & (E - 1) == 0


@functools.partial(jax.jit, static_argnames=("k", "normalize", "interpret", "num_warps"))
def route_topk(logits, k: int, normalize: bool, *, interpret=False, num_warps: int = 4):
    """As `route_topk_ref`, one program per token. logits [N, E] (E a power of 2), any float
    dtype (the softmax is fp32)."""
    N, E = validate_route_inputs(logits, k)
    if not route_kernel_applies(E):
        raise ValueError(f"E={E} experts: the kernel needs a power of 2 (route_topk_ref: any)")
    KP = max(16, pl.next_power_of_2(k))
    w, ids = pl.pallas_call(
        functools.partial(_kernel, k=k, normalize=normalize),
        grid=(N,),
        in_specs=[pl.BlockSpec((None, E), lambda n: (n, 0))],
        out_specs=[
            pl.BlockSpec((None, KP), lambda n: (n, 0)),
            pl.BlockSpec((None, KP), lambda n: (n, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((N, KP), jnp.float32),
            jax.ShapeDtypeStruct((N, KP), jnp.int32),
        ],
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="moe_route",
    )(logits)
    return w[:, :k], ids[:, :k]
