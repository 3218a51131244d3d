"""Test helpers: tiny random Qwen3-Next checkpoints written by HF transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def hf_config(**overrides):
    from transformers import Qwen3NextConfig as HFConfig

    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    return HFConfig(**kw)


def perturb_(model, seed: int = 0) -> None:
    """Make the zero-initialised norm weights and small A_log matter (HF's init leaves the
    (1+w) norms at exactly 1 and the decay tiny)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 8 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "conv1d" in name:
                p.mul_(2.0)


def save_hf_model(directory: Path, dtype="float32", seed: int = 0, **overrides):
    """A random HF Qwen3NextForCausalLM saved with save_pretrained; returns the torch model."""
    import torch
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(**overrides)
    model = Qwen3NextForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    perturb_(model, seed)
    model.save_pretrained(directory)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(ids, dtype=torch.long)).logits
    return out.float().numpy()


def add_mtp_tensors(directory: Path, n_layers: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Write random `mtp.*` tensors (transformers never writes them) into the checkpoint."""
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((directory / "config.json").read_text())
    rng = np.random.default_rng(seed)
    D, E, F = cfg["hidden_size"], cfg["num_experts"], cfg["moe_intermediate_size"]
    H, KVH, Dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    Fs = cfg["shared_expert_intermediate_size"]
    w = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)
    n = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
    t = {
        "mtp.fc.weight": w(D, 2 * D),
        "mtp.pre_fc_norm_embedding.weight": n(D),
        "mtp.pre_fc_norm_hidden.weight": n(D),
        "mtp.norm.weight": n(D),
    }
    for i in range(n_layers):
        p = f"mtp.layers.{i}."
        t |= {
            p + "input_layernorm.weight": n(D),
            p + "post_attention_layernorm.weight": n(D),
            p + "self_attn.q_proj.weight": w(H * Dh * 2, D),
            p + "self_attn.k_proj.weight": w(KVH * Dh, D),
            p + "self_attn.v_proj.weight": w(KVH * Dh, D),
            p + "self_attn.o_proj.weight": w(D, H * Dh),
            p + "self_attn.q_norm.weight": n(Dh),
            p + "self_attn.k_norm.weight": n(Dh),
            p + "mlp.gate.weight": w(E, D),
            p + "mlp.shared_expert_gate.weight": w(1, D),
            p + "mlp.shared_expert.gate_proj.weight": w(Fs, D),
            p + "mlp.shared_expert.up_proj.weight": w(Fs, D),
            p + "mlp.shared_expert.down_proj.weight": w(D, Fs),
        }
        for e in range(E):
            t |= {
                p + f"mlp.experts.{e}.gate_proj.weight": w(F, D),
                p + f"mlp.experts.{e}.up_proj.weight": w(F, D),
                p + f"mlp.experts.{e}.down_proj.weight": w(D, F),
            }
    main = load_file(directory / "model.safetensors")
    save_file(main | t, directory / "model.safetensors", metadata={"format": "pt"})
    return t
