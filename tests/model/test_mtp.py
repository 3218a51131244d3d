"""The MTP head loads from `mtp.*` tensors and matches an independent numpy reference of spec §6.

x = fc([norm_e(embed(x_{t+1})) | norm_h(h_t)]), then one full-attention MoE decoder layer,
then logits = lm_head(norm(x)); every norm is (1 + w); embedding and lm_head are shared."""

from __future__ import annotations

import functools
import shutil

import hf_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import read_config, rel_err
from safetensors.numpy import load_file

import qnext_jax

TOL = 1e-5  # fp32 vs a float64 reference, relative to the largest |value|


@pytest.fixture(scope="module")
def mtp_checkpoint(base_checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("mtp") / "ckpt"
    shutil.copytree(base_checkpoint[0], directory)
    hf_utils.add_mtp_tensors(directory, n_layers=1, seed=3)
    tensors = {
        k: v.astype(np.float64) for k, v in load_file(directory / "model.safetensors").items()
    }
    model = qnext_jax.from_pretrained(directory, dtype="float32", progress=False)
    return directory, tensors, model


def test_mtp_parameters_load(mtp_checkpoint, base_model):
    _, t, model = mtp_checkpoint
    assert base_model.mtp is None and base_model.config.num_mtp_layers == 0
    assert model.mtp is not None and model.config.num_mtp_layers == 1
    mtp, p = model.mtp, "mtp.layers.0."
    np.testing.assert_array_equal(mtp.fc.w[...], t["mtp.fc.weight"].T.astype(np.float32))
    np.testing.assert_array_equal(mtp.pre_fc_norm_hidden.w[...], t["mtp.pre_fc_norm_hidden.weight"])
    layer = mtp.layers[0]
    np.testing.assert_array_equal(layer.self_attn.q_proj.w[...], t[p + "self_attn.q_proj.weight"].T)
    E = read_config(mtp_checkpoint[0])["num_experts"]
    gate_up = np.stack(
        [
            np.concatenate(
                [
                    t[p + f"mlp.experts.{e}.gate_proj.weight"],
                    t[p + f"mlp.experts.{e}.up_proj.weight"],
                ]
            ).T
            for e in range(E)
        ]
    )
    np.testing.assert_array_equal(layer.mlp.gate_up[...], gate_up.astype(np.float32))


# ---- the independent reference (float64 numpy, HF tensor names) ---------------------------
def rms1p(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def attention_ref(x, t, p, cfg, positions):
    B, T, _ = x.shape
    H, KVH, Dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    qg = (x @ t[p + "q_proj.weight"].T).reshape(B, T, H, 2 * Dh)
    q, gate = qg[..., :Dh], qg[..., Dh:].reshape(B, T, H * Dh)  # per-head [q | gate]
    q = rms1p(q, t[p + "q_norm.weight"])
    k = rms1p((x @ t[p + "k_proj.weight"].T).reshape(B, T, KVH, Dh), t[p + "k_norm.weight"])
    v = (x @ t[p + "v_proj.weight"].T).reshape(B, T, KVH, Dh)
    rot = int(Dh * cfg["partial_rotary_factor"])
    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, rot, 2) / rot)
    freqs = positions[..., None] * inv_freq
    cos, sin = np.cos(np.concatenate([freqs] * 2, -1)), np.sin(np.concatenate([freqs] * 2, -1))

    def rope(y):
        r = y[..., :rot]
        half = np.concatenate([-r[..., rot // 2 :], r[..., : rot // 2]], -1)
        return np.concatenate([r * cos[:, :, None] + half * sin[:, :, None], y[..., rot:]], -1)

    q, k = rope(q), rope(k)
    kv_of = np.arange(H) // (H // KVH)
    s = np.einsum("bthd,bshd->bhts", q, k[:, :, kv_of]) / np.sqrt(Dh)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", a, v[:, :, kv_of]).reshape(B, T, H * Dh)
    return (o * sigmoid(gate)) @ t[p + "o_proj.weight"].T


def moe_ref(x, t, p, cfg):
    def swiglu(y, q):
        return (silu(y @ t[q + "gate_proj.weight"].T) * (y @ t[q + "up_proj.weight"].T)) @ t[
            q + "down_proj.weight"
        ].T

    logits = x @ t[p + "gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[..., : cfg["num_experts_per_tok"]]
    w = np.take_along_axis(probs, top, -1)
    w /= w.sum(-1, keepdims=True)  # norm_topk_prob
    out = np.zeros_like(x)
    for e in range(cfg["num_experts"]):
        weight = np.sum(np.where(top == e, w, 0.0), -1, keepdims=True)
        out += weight * swiglu(x, p + f"experts.{e}.")
    shared = swiglu(x, p + "shared_expert.") * sigmoid(x @ t[p + "shared_expert_gate.weight"].T)
    return out + shared


def mtp_ref(next_ids, hidden, positions, t, cfg):
    e = rms1p(t["model.embed_tokens.weight"][next_ids], t["mtp.pre_fc_norm_embedding.weight"])
    h = rms1p(hidden, t["mtp.pre_fc_norm_hidden.weight"])
    x = np.concatenate([e, h], -1) @ t["mtp.fc.weight"].T  # [embedding | hidden]
    p = "mtp.layers.0."
    x = x + attention_ref(
        rms1p(x, t[p + "input_layernorm.weight"]), t, p + "self_attn.", cfg, positions
    )
    x = x + moe_ref(rms1p(x, t[p + "post_attention_layernorm.weight"]), t, p + "mlp.", cfg)
    out = rms1p(x, t["mtp.norm.weight"])
    return out, out @ t["lm_head.weight"].T


@functools.partial(jax.jit, static_argnums=0)
def _mtp(graphdef, state, next_ids, hidden, positions):
    model = nnx.merge(graphdef, state)
    h, _ = model.mtp_forward(next_ids, hidden, positions)
    return h, model.compute_logits(h)


def test_mtp_forward_matches_reference(mtp_checkpoint):
    directory, t, model = mtp_checkpoint
    cfg = read_config(directory)
    cfg.setdefault("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta"))
    cfg.setdefault(
        "partial_rotary_factor", cfg.get("rope_parameters", {}).get("partial_rotary_factor")
    )
    B, T = 2, 12
    rng = np.random.default_rng(4)
    next_ids = rng.integers(0, cfg["vocab_size"], (B, T))
    hidden = rng.standard_normal((B, T, cfg["hidden_size"])).astype(np.float32)
    positions = np.broadcast_to(np.arange(T), (B, T))
    graphdef, state = nnx.split(model)
    h, logits = _mtp(
        graphdef,
        state,
        jnp.asarray(next_ids, jnp.int32),
        jnp.asarray(hidden),
        jnp.asarray(positions, jnp.int32),
    )
    h_ref, logits_ref = mtp_ref(next_ids, hidden.astype(np.float64), positions, t, cfg)
    e_h, e_l = rel_err(np.asarray(h), h_ref), rel_err(np.asarray(logits), logits_ref)
    print(f"\n[mtp] hidden err {e_h:.2e}, logits err {e_l:.2e}")
    assert e_h <= TOL and e_l <= TOL
