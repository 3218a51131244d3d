"""Shared helpers for the kernel tests.

The kernels run with interpret=True on the CPU (CI). On a GPU machine set
QNEXT_KERNELS_NATIVE=1 to run the same tests through the compiled Triton kernels.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

NATIVE = os.environ.get("QNEXT_KERNELS_NATIVE") == "1"
INTERPRET = not NATIVE

# Relative-error tolerances (||a - b|| / ||b||) against the fp32 reference, fed the same values.
#  fp32 inputs, interpret mode: exact fp32 arithmetic, only the summation order and the chunked
#    algebra differ from the token loop -> 1e-5.
#  fp32 inputs, GPU: fp32 products run as TF32 (10-bit mantissa, ~5e-4 per rounding) -> 5e-3.
#  bf16 inputs: operands of the chunk products (w, u, S, v_new) are rounded to bf16 as fla does
#    (8-bit mantissa, ~4e-3 per rounding, a few roundings deep) and o is returned in bf16 -> 2e-2.
TOL = {
    jnp.float32: 5e-3 if NATIVE else 1e-5,
    jnp.bfloat16: 2e-2,
}


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def gdn_inputs(B, T, H, R, K, V, dtype, seed=0, with_state=True):
    """Random gated-delta-rule inputs: q, k, v, beta in dtype; g (log decay) fp32; state fp32."""
    # numpy RNG: jax.random compiles a threefry program per shape (seconds each on the CPU).
    rng = np.random.default_rng(seed)
    HV = H * R
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    q = jnp.asarray(normal(B, T, H, K), dtype)
    k = jnp.asarray(normal(B, T, H, K), dtype)
    v = jnp.asarray(normal(B, T, HV, V), dtype)
    g = jnp.asarray(-np.log1p(np.exp(-normal(B, T, HV) - 2.0)))  # log_sigmoid: decay in (0, 1)
    beta = jnp.asarray(1.0 / (1.0 + np.exp(-normal(B, T, HV))), dtype)
    s0 = jnp.asarray(0.5 * normal(B, HV, K, V)) if with_state else None
    return q, k, v, g, beta, s0


# Interpret mode lowers each kernel to a large XLA program; the CPU backend's optimisation
# passes dominate its compile time (7 s -> 1.5 s without them) and buy nothing at these sizes.
_CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run(fn, *args, **kwargs):
    """fn(*args, **kwargs) jitted; array kwargs are traced, the rest static. On the CPU it is
    compiled without XLA's backend optimisations (quick to compile, slow to run: fine here)."""
    dyn = {k: x for k, x in kwargs.items() if isinstance(x, jax.Array)}
    static = {k: x for k, x in kwargs.items() if k not in dyn}
    f = jax.jit(lambda a, d: fn(*a, **d, **static))
    if NATIVE:
        return f(args, dyn)
    return f.lower(args, dyn).compile(compiler_options=_CPU_FAST_COMPILE)(args, dyn)
