"""Fixtures and hooks for this folder; the helpers live in model_utils.py (a uniquely named module:
test files import helpers from it, never from `conftest`, which is ambiguous across folders)."""

import jax
from model_utils import *  # noqa: F403


def pytest_configure(config):
    # The fp32 parity tests hold to 1e-5. On a GPU, XLA's and the Triton kernels' fp32 dots
    # default to TF32 (the incremental-decode tests then differ from the full forward by ~5e-4 on
    # an H100, 3e-7 with full fp32), so there the tests ask for full fp32 dots. The CPU's dots are
    # full fp32 anyway.
    if jax.default_backend() == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")
