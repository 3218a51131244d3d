"""save_hf is the exact inverse of the converter: export -> load gives back every parameter, and
transformers reads the export with logits equal to ours."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from qnext_convert import SafetensorsCheckpoint
from qnext_convert.export import save_hf

import qnext_jax
from qnext_jax import Qwen3NextForCausalLM, RuntimeOptions, tiny_config


def _model(**overrides):
    cfg = tiny_config(vocab_size=128, **overrides)
    return Qwen3NextForCausalLM(cfg, RuntimeOptions(dtype="float32"), rngs=nnx.Rngs(3))


def _perturb(model, seed=0):
    """Random non-trivial norms (init leaves zero-centred norms at 0) so every weight matters."""
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(tree, leaves))


@pytest.mark.parametrize("tie", [False, True])
def test_export_roundtrip(tmp_path, tie):
    model = _model(tie_word_embeddings=tie)
    _perturb(model)
    save_hf(model, tmp_path, dtype="float32")
    names = SafetensorsCheckpoint(tmp_path).names()
    assert ("lm_head.weight" in names) != tie
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in names
    assert any(n.startswith("mtp.layers.0.mlp.experts.") for n in names)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["model_type"] == "qwen3_next" and hf_cfg["num_nextn_predict_layers"] == 1

    loaded = qnext_jax.from_pretrained(tmp_path, "float32", progress=False)
    assert loaded.config == model.config.replace(torch_dtype="float32")
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    back = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert ours.keys() == back.keys()
    for path in ours:
        np.testing.assert_array_equal(
            np.asarray(ours[path][...]), np.asarray(back[path][...]), err_msg=str(path)
        )


def test_export_bf16_size(tmp_path):
    model = _model()
    save_hf(model, tmp_path)  # bfloat16 by default
    ckpt = SafetensorsCheckpoint(tmp_path)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert sum(ckpt.tensor(n).nbytes for n in ckpt.names()) == 2 * n_params
    assert ckpt.tensor("model.norm.weight").dtype.name == "bfloat16"


def test_export_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = _model()
    _perturb(model, seed=1)
    save_hf(model, tmp_path, dtype="float32")
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 128, (2, 19))
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
