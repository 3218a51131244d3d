"""The converter: errors name what is wrong, nothing is silently dropped, orbax round trip and
sharded checkpoints load to exactly the same parameters."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import qnext_convert
from flax import nnx
from model_utils import jax_logits
from qnext_convert import CheckpointError
from safetensors.numpy import load_file, save_file

import qnext_jax
from qnext_jax.config import Qwen3NextConfig


def edited_checkpoint(src, dst, edit):
    """Copy checkpoint `src` to `dst`, applying edit(tensors dict) to model.safetensors."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def load(directory):
    return qnext_jax.from_pretrained(directory, dtype="float32", progress=False)


def assert_same_params(a, b):
    fa, fb = nnx.to_flat_state(nnx.state(a, nnx.Param)), nnx.to_flat_state(nnx.state(b, nnx.Param))
    pa, pb = dict(fa), dict(fb)
    assert pa.keys() == pb.keys()
    for path in pa:
        np.testing.assert_array_equal(
            np.asarray(pa[path][...]), np.asarray(pb[path][...]), err_msg=str(path)
        )


# ---- checkpoint errors -------------------------------------------------------------------
def test_missing_tensors_are_listed(base_checkpoint, tmp_path):
    gone = [
        "model.layers.1.linear_attn.A_log",
        "model.layers.3.self_attn.k_norm.weight",
        "model.layers.2.mlp.experts.5.down_proj.weight",
    ]

    def drop(t):
        for name in gone:
            del t[name]

    directory = edited_checkpoint(base_checkpoint[0], tmp_path / "ckpt", drop)
    with pytest.raises(CheckpointError) as info:
        load(directory)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "3 tensor(s) missing" in msg
    for name in gone:
        assert name in msg


def test_wrong_shape_names_tensor_and_shapes(base_checkpoint, tmp_path):
    name = "model.layers.0.linear_attn.out_proj.weight"

    def shrink(t):
        t[name] = t[name][:, :32].copy()

    directory = edited_checkpoint(base_checkpoint[0], tmp_path / "ckpt", shrink)
    with pytest.raises(CheckpointError) as info:
        load(directory)
    msg = str(info.value)
    assert f"{name}: expected (64, 64), found (64, 32)" in msg, msg


def test_extra_tensors_warn(base_checkpoint, tmp_path, caplog):
    extra = ["model.layers.0.linear_attn.unused.weight", "something.else"]

    def add(t):
        for name in extra:
            t[name] = np.ones((3,), np.float32)

    directory = edited_checkpoint(base_checkpoint[0], tmp_path / "ckpt", add)
    with caplog.at_level(logging.WARNING, logger="qnext_convert"):
        model = load(directory)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        all(name in w for name in extra) and "2 checkpoint tensor(s)" in w for w in warnings
    ), warnings
    assert model is not None


# ---- config errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"linear_num_value_heads": 3}, "linear_num_value_heads"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"full_attention_interval": 0, "layer_types": None}, "full_attention_interval"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_config_errors_name_the_field(base_checkpoint, change, field):
    hf = json.loads((base_checkpoint[0] / "config.json").read_text())
    hf.update(change)
    with pytest.raises(ValueError, match=field):
        Qwen3NextConfig.from_hf(hf)


def test_config_error_through_from_pretrained(base_checkpoint, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(base_checkpoint[0], directory)
    hf = json.loads((directory / "config.json").read_text())
    hf["model_type"] = "qwen2_moe"
    (directory / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="model_type='qwen2_moe'"):
        load(directory)


def test_config_from_hf_fields(base_checkpoint):
    cfg = qnext_convert.model_config(base_checkpoint[0])
    assert cfg.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert cfg.num_mtp_layers == 0  # no mtp.* tensors in the checkpoint
    assert cfg.rope_theta == 10000.0 and cfg.rotary_dim == 8
    assert (cfg.num_key_value_heads, cfg.linear_num_value_heads) == (2, 4)


# ---- orbax round trip and sharded checkpoints ------------------------------------------
def test_orbax_round_trip_cli(base_checkpoint, base_model, tmp_path):
    out = tmp_path / "converted"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qnext_convert",
            "--model",
            str(base_checkpoint[0]),
            "--out",
            str(out),
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert qnext_convert.is_converted(out)
    assert not list(out.glob("*.safetensors"))  # the second load cannot re-convert
    restored = load(out)
    assert restored.config == base_model.config
    assert_same_params(restored, base_model)
    ids = np.random.default_rng(8).integers(0, 128, (2, 70))
    np.testing.assert_array_equal(jax_logits(restored, ids), jax_logits(base_model, ids))


def test_orbax_round_trip_bf16(checkpoints, tmp_path):
    """save_converted / load in bf16 keeps every bit (no trip through float32 numpy)."""
    directory, _ = checkpoints.get("bf16", dtype="bfloat16", seed=2)
    model = qnext_jax.from_pretrained(directory, dtype="bfloat16", progress=False)
    out = qnext_convert.save_converted(model, directory, tmp_path / "converted")
    restored = qnext_jax.from_pretrained(out, dtype="bfloat16", progress=False)
    leaf = jax.tree.leaves(nnx.state(restored, nnx.Param))[0]
    assert leaf.dtype == np.dtype("bfloat16")
    assert_same_params(restored, model)


def test_sharded_checkpoint(base_checkpoint, base_model, tmp_path):
    directory = tmp_path / "sharded"
    base_checkpoint[1].save_pretrained(directory, max_shard_size="100KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (directory / "model.safetensors").exists()
    assert_same_params(load(directory), base_model)
