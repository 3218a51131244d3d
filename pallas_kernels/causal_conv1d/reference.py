"""Pure-jnp reference for the causal depthwise conv1d of Gated DeltaNet (kernel width W, no bias).

x      [B, T, C]        (channels last; Qwen3-Next: C = conv_dim = 2*key_dim + value_dim)
weight [W, C]           (HF stores [C, 1, W]; tap j multiplies x[t - W + 1 + j])
state  [B, W - 1, C]    the last W - 1 inputs before x (zeros for a fresh sequence)

y[t, c] = act(sum_j weight[j, c] * x_ext[t + j, c]),  x_ext = concat(state, x) along time.

With right-padded rows (a decode batch whose rows carry n_valid[b] <= T real tokens, left
aligned), the state after x is the W - 1 rows of x_ext ending at the row's last real token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def validate_conv_inputs(x, weight, initial_state=None) -> None:
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[2]:
        raise ValueError(f"weight must be [W, C={x.shape[2]}], got shape {tuple(weight.shape)}")
    W = weight.shape[0]
    want = (x.shape[0], W - 1, x.shape[2])
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"initial_state must be [B, W-1, C] = {want}, got {initial_state.shape}")


def validate_n_valid(n_valid, B: int) -> None:
    if n_valid is not None and (
        n_valid.shape != (B,) or not jnp.issubdtype(n_valid.dtype, jnp.integer)
    ):
        raise ValueError(
            f"n_valid must be [B={B}] integers, got shape {tuple(n_valid.shape)} "
            f"dtype {n_valid.dtype}"
        )


def conv_state_after(state, x, n_valid=None):
    """The conv state after the first n_valid[b] tokens of each row of x (all T when None):
    the W - 1 rows of concat(state, x) ending at the row's last real token. [B, W-1, C] in
    x's dtype."""
    Wm1, T = state.shape[1], x.shape[1]
    ext = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
    if n_valid is None:
        return ext[:, T:]
    idx = n_valid[:, None] + jnp.arange(Wm1)[None, :]  # [B, W-1]
    return jnp.take_along_axis(ext, idx[..., None], axis=1)


def causal_conv1d_ref(
    x, weight, initial_state=None, *, activation: str | None = "silu", n_valid=None
):
    """Returns (y [B, T, C] in x.dtype, final_state [B, W-1, C]: the last W-1 inputs of x_ext,
    or with n_valid [B] those ending at each row's last real token, `conv_state_after`).

    Computed in fp32 (as the causal_conv1d CUDA kernel does internally)."""
    validate_conv_inputs(x, weight, initial_state)
    validate_n_valid(n_valid, x.shape[0])
    B, T, C = x.shape
    W = weight.shape[0]
    if initial_state is None:
        initial_state = jnp.zeros((B, W - 1, C), x.dtype)
    x_ext = jnp.concatenate([initial_state.astype(x.dtype), x], axis=1)  # [B, T+W-1, C]
    xf = x_ext.astype(jnp.float32)
    wf = weight.astype(jnp.float32)
    y = sum(wf[j] * xf[:, j : j + T] for j in range(W))
    if activation == "silu":
        y = jax.nn.silu(y)
    elif activation is not None:
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    return y.astype(x.dtype), conv_state_after(initial_state, x, n_valid)
