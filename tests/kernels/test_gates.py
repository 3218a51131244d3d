"""Gate helper vs torch's formulas (spec 3.3)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pallas_kernels.gated_delta_rule import gdn_gates


def test_gates_match_torch():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 5, 4)).astype(np.float32) * 15  # reaches softplus' threshold
    b = rng.standard_normal((2, 5, 4)).astype(np.float32)
    A_log = rng.standard_normal(4).astype(np.float32)
    dt_bias = rng.standard_normal(4).astype(np.float32)
    g, beta = gdn_gates(jnp.asarray(a), jnp.asarray(b, jnp.bfloat16), A_log, dt_bias)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b).bfloat16()
    g_ref = -torch.from_numpy(A_log).exp() * torch.nn.functional.softplus(
        ta + torch.from_numpy(dt_bias)
    )
    np.testing.assert_allclose(np.asarray(g), g_ref.numpy(), rtol=1e-6, atol=1e-6)
    assert g.dtype == jnp.float32 and beta.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(beta, np.float32), torch.sigmoid(tb).float().numpy(), rtol=8e-3
    )
    with pytest.raises(ValueError, match="A_log"):
        gdn_gates(jnp.asarray(a), jnp.asarray(b), A_log[:3], dt_bias)
