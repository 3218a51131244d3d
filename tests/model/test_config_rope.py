"""Config from config.json (legacy and transformers-v5 rope forms) and YaRN frequencies vs HF."""

from __future__ import annotations

import numpy as np
import pytest

from qnext_jax.config import FULL, QWEN3_NEXT_80B_A3B, Qwen3NextConfig
from qnext_jax.layers import rope_frequencies

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
LEGACY = dict(
    model_type="qwen3_next", rope_theta=1e7, rope_scaling=YARN, max_position_embeddings=1048576
)


def test_80b_preset_derived_sizes():
    c = QWEN3_NEXT_80B_A3B
    assert c.rotary_dim == 64 and c.conv_dim == 8192 and c.linear_value_dim == 4096
    assert [i for i, t in enumerate(c.layer_types) if t == FULL] == list(range(3, 48, 4))
    assert all(c.is_moe_layer(i) for i in range(48))


def test_legacy_and_v5_rope_forms_agree():
    from transformers import Qwen3NextConfig as HFConfig

    hf = HFConfig(**{k: v for k, v in LEGACY.items() if k != "model_type"})
    assert hf.rope_parameters["rope_type"] == "yarn"  # v5 folds everything in rope_parameters
    ours_legacy = Qwen3NextConfig.from_hf(LEGACY)
    ours_v5 = Qwen3NextConfig.from_hf(hf.to_dict())
    for field in ("rope_theta", "partial_rotary_factor", "rope_scaling", "max_position_embeddings"):
        assert getattr(ours_legacy, field) == getattr(ours_v5, field), field
    assert ours_legacy.rope_scaling.factor == 4.0 and ours_legacy.rope_theta == 1e7
    assert Qwen3NextConfig.from_hf(ours_legacy.to_hf()) == ours_legacy
    assert ours_legacy.num_mtp_layers == 1  # absent from the release config -> 1, as vLLM


@pytest.mark.parametrize(
    "scaling", [None, YARN, dict(YARN, factor=2.0, original_max_position_embeddings=4096)]
)
def test_rope_frequencies_match_hf(scaling):
    from transformers import Qwen3NextConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFConfig(rope_theta=1e7, rope_scaling=scaling, max_position_embeddings=1048576)
    ours = Qwen3NextConfig.from_hf(dict(hf.to_dict(), model_type="qwen3_next"))
    init = _hf_default if scaling is None else ROPE_INIT_FUNCTIONS["yarn"]
    inv_hf, att_hf = init(hf, "cpu")
    inv, att = rope_frequencies(
        ours.rotary_dim, ours.rope_theta, ours.rope_scaling, ours.max_position_embeddings
    )
    np.testing.assert_allclose(np.asarray(inv), inv_hf.numpy(), rtol=1e-6)
    assert att == pytest.approx(att_hf)


def _hf_default(hf, device):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

    return Qwen3NextRotaryEmbedding.compute_default_rope_parameters(hf, device)
