"""The name table: HF checkpoint tensors -> qnext_jax parameters, with the transform of each.

A parameter path (from `nnx.to_flat_state`) is matched by its layer-local suffix; stacked layer
parameters ([L, ...] over a segment's repeats) read one HF tensor per repeat. Every source
carries the HF shape it must have, so shapes are checked before anything is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .safetensors_io import SafetensorsCheckpoint

Index = tuple[slice, ...]

# layer-local parameter suffix -> (HF suffix, transform)
LAYER_TABLE: dict[str, tuple[str, str]] = {
    "input_layernorm.w": ("input_layernorm.weight", "identity"),
    "post_attention_layernorm.w": ("post_attention_layernorm.weight", "identity"),
    "linear_attn.in_proj_qkvz.w": ("linear_attn.in_proj_qkvz.weight", "transpose"),
    "linear_attn.in_proj_ba.w": ("linear_attn.in_proj_ba.weight", "transpose"),
    "linear_attn.conv_w": ("linear_attn.conv1d.weight", "conv"),
    "linear_attn.dt_bias": ("linear_attn.dt_bias", "identity"),
    "linear_attn.A_log": ("linear_attn.A_log", "identity"),
    "linear_attn.norm.w": ("linear_attn.norm.weight", "identity"),
    "linear_attn.out_proj.w": ("linear_attn.out_proj.weight", "transpose"),
    "self_attn.q_proj.w": ("self_attn.q_proj.weight", "transpose"),
    "self_attn.k_proj.w": ("self_attn.k_proj.weight", "transpose"),
    "self_attn.v_proj.w": ("self_attn.v_proj.weight", "transpose"),
    "self_attn.o_proj.w": ("self_attn.o_proj.weight", "transpose"),
    "self_attn.q_norm.w": ("self_attn.q_norm.weight", "identity"),
    "self_attn.k_norm.w": ("self_attn.k_norm.weight", "identity"),
    "mlp.gate.w": ("mlp.gate.weight", "transpose"),
    "mlp.gate_up": ("mlp.experts", "experts_gate_up"),
    "mlp.down": ("mlp.experts", "experts_down"),
    "mlp.shared_expert.gate_proj.w": ("mlp.shared_expert.gate_proj.weight", "transpose"),
    "mlp.shared_expert.up_proj.w": ("mlp.shared_expert.up_proj.weight", "transpose"),
    "mlp.shared_expert.down_proj.w": ("mlp.shared_expert.down_proj.weight", "transpose"),
    "mlp.shared_expert_gate.w": ("mlp.shared_expert_gate.weight", "transpose"),
    "mlp.gate_proj.w": ("mlp.gate_proj.weight", "transpose"),  # dense-MLP layers
    "mlp.up_proj.w": ("mlp.up_proj.weight", "transpose"),
    "mlp.down_proj.w": ("mlp.down_proj.weight", "transpose"),
}

GLOBAL_TABLE: dict[str, tuple[str, str]] = {
    "embed_tokens": ("model.embed_tokens.weight", "identity"),
    "norm.w": ("model.norm.weight", "identity"),
    "lm_head.w": ("lm_head.weight", "transpose"),
    "mtp.fc.w": ("mtp.fc.weight", "transpose"),
    "mtp.pre_fc_norm_embedding.w": ("mtp.pre_fc_norm_embedding.weight", "identity"),
    "mtp.pre_fc_norm_hidden.w": ("mtp.pre_fc_norm_hidden.weight", "identity"),
    "mtp.norm.w": ("mtp.norm.weight", "identity"),
}


def conv_channel_order(n_k_heads: int, k_dim: int, n_v_heads: int, v_dim: int) -> np.ndarray:
    """perm[c'] = HF conv channel feeding our channel c'.

    HF orders conv channels [q_all | k_all | v_all]; ours are grouped per key head h:
    [q_h | k_h | v of value heads h*R .. h*R+R-1]."""
    R = n_v_heads // n_k_heads
    key_dim = n_k_heads * k_dim
    perm = []
    for h in range(n_k_heads):
        perm += list(range(h * k_dim, (h + 1) * k_dim))  # q_h
        perm += list(range(key_dim + h * k_dim, key_dim + (h + 1) * k_dim))  # k_h
        v0 = 2 * key_dim + h * R * v_dim
        perm += list(range(v0, v0 + R * v_dim))  # v of the group
    return np.asarray(perm)


@dataclasses.dataclass
class LayerSource:
    """How one layer's parameter is read: sources (HF name -> expected shape) and a reader."""

    sources: dict[str, tuple[int, ...]]
    read: Callable[[SafetensorsCheckpoint, Index], np.ndarray]


def layer_source(prefix: str, suffix: str, shape: tuple[int, ...], ckpt, conv_perm) -> LayerSource:
    """The reader of one (unstacked) parameter of shape `shape` under HF `prefix`."""
    table = GLOBAL_TABLE if prefix == "" else LAYER_TABLE
    hf_suffix, kind = table[suffix]
    name = prefix + hf_suffix
    if kind == "identity":
        return LayerSource({name: shape}, lambda c, idx: c.tensor(name)[idx])
    if kind == "transpose":
        return LayerSource({name: shape[::-1]}, lambda c, idx: c.tensor(name)[idx[::-1]].T)
    if kind == "conv":
        W, C = shape
        return LayerSource(
            {name: (C, 1, W)},
            lambda c, idx: c.tensor(name)[conv_perm[idx[1]], 0, idx[0]].T,
        )
    E = shape[0]
    fused = f"{name}.gate_up_proj" if kind == "experts_gate_up" else f"{name}.down_proj"
    if kind == "experts_gate_up":
        _, D, F2 = shape
        if fused in ckpt:  # transformers v5 fused layout [E, 2F (gate | up), D]
            return LayerSource(
                {fused: (E, F2, D)},
                lambda c, idx: np.swapaxes(c.tensor(fused)[idx[0], idx[2], idx[1]], 1, 2),
            )
        srcs = {}
        for e in range(E):
            srcs[f"{name}.{e}.gate_proj.weight"] = (F2 // 2, D)
            srcs[f"{name}.{e}.up_proj.weight"] = (F2 // 2, D)

        def read_gate_up(c, idx):
            out = []
            for e in range(E)[idx[0]]:
                gu = np.concatenate(
                    [
                        c.tensor(f"{name}.{e}.gate_proj.weight")[:, idx[1]],
                        c.tensor(f"{name}.{e}.up_proj.weight")[:, idx[1]],
                    ]
                )  # [2F, D-slice]
                out.append(gu[idx[2]].T)
            return np.stack(out)

        return LayerSource(srcs, read_gate_up)
    _, F, D = shape  # experts_down, ours [E, F, D]
    if fused in ckpt:  # [E, D, F]
        return LayerSource(
            {fused: (E, D, F)},
            lambda c, idx: np.swapaxes(c.tensor(fused)[idx[0], idx[2], idx[1]], 1, 2),
        )
    srcs = {f"{name}.{e}.down_proj.weight": (D, F) for e in range(E)}
    return LayerSource(
        srcs,
        lambda c, idx: np.stack(
            [c.tensor(f"{name}.{e}.down_proj.weight")[idx[2], idx[1]].T for e in range(E)[idx[0]]]
        ),
    )
