"""Compile time that scales: at the 80B geometry (abstract parameters, no memory) the 48-layer
forward lowers to about the program of 8 layers (layers scanned, not unrolled), and compiles
on CPU in seconds. `benchmarks/compile_80b.py` prints the full table."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import QWEN3_NEXT_80B_A3B, RuntimeOptions
from qnext_jax.model import Qwen3NextForCausalLM

B, T = 1, 16


def lowered(num_layers: int):
    cfg = QWEN3_NEXT_80B_A3B.replace(num_hidden_layers=num_layers, layer_types=())
    model = nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, RuntimeOptions(dtype="bfloat16")))
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return fn.lower(state, jax.ShapeDtypeStruct((B, T), jnp.int32))


def test_80b_forward_is_scanned_and_compiles():
    sizes = {n: len(lowered(n).as_text()) for n in (8, 48)}
    print(f"\n[compile] StableHLO chars: 8 layers {sizes[8]}, 48 layers {sizes[48]}")
    assert sizes[48] < 1.2 * sizes[8], sizes  # 12 repeats cost what 2 do

    low = lowered(48)
    t0 = time.perf_counter()
    compiled = low.compile()
    seconds = time.perf_counter() - t0
    print(f"[compile] 80B geometry, 48 layers, B={B} T={T}, bf16, CPU: {seconds:.1f} s")
    out = compiled.out_info
    assert out.shape == (B, T, QWEN3_NEXT_80B_A3B.vocab_size) and out.dtype == jnp.bfloat16
    # an unrolled 48-layer program takes minutes; the scanned one ~15 s on 2 CPU cores
    assert seconds < 180
