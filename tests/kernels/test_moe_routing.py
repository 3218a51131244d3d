"""The router's top-k kernel vs the jnp reference (softmax -> lax.top_k -> renormalise).

Cases: the 80B model's 512 experts and top-10, a small E, renormalised and plain softmax
weights, bf16 logits (ties between equal values: the lowest index first, as lax.top_k), and
the contract's errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_utils import INTERPRET, run

from pallas_kernels.moe import route_topk, route_topk_ref


@pytest.mark.parametrize(
    "N, E, k, normalize, dtype",
    [
        (3, 512, 10, True, jnp.float32),
        (6, 8, 2, False, jnp.float32),
        (5, 16, 4, True, jnp.bfloat16),  # bf16: exact ties among the 16 logits
    ],
)
def test_route_topk_matches_reference(N, E, k, normalize, dtype):
    rng = np.random.default_rng(N + E)
    logits = rng.standard_normal((N, E))
    if dtype == jnp.bfloat16:
        logits = np.round(logits * 4) / 4  # few distinct values: ties inside the top k
    logits = jnp.asarray(logits, dtype)
    w, ids = run(route_topk, logits, k=k, normalize=normalize, interpret=INTERPRET)
    w_ref, ids_ref = route_topk_ref(logits, k, normalize)
    assert ids.dtype == jnp.int32 and w.dtype == jnp.float32 and w.shape == (N, k)
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-7)
    if normalize:
        np.testing.assert_allclose(np.sum(np.asarray(w), axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, k, match",
    [((4,), 2, r"\[N, E\]"), ((2, 8), 9, r"k=9 must be in \[1, E=8\]"), ((2, 12), 2, "power of 2")],
)
def test_route_topk_rejects_bad_inputs(shape, k, match):
    with pytest.raises(ValueError, match=match):
        route_topk(jnp.zeros(shape, jnp.float32), k, True, interpret=True)
