"""Shared fixtures: tiny random HF checkpoints (written once per session) and a jitted forward.

This file's folder is put on sys.path by pytest, so tests can `import hf_utils`."""

from __future__ import annotations

import functools
import json

import hf_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids, positions):
    return nnx.merge(graphdef, state)(ids, positions=positions)


def jax_logits(model, ids, positions=None) -> np.ndarray:
    """Jitted `model(ids)` as fp32 numpy. Models with equal graphdefs share one compilation."""
    graphdef, state = nnx.split(model)
    pos = None if positions is None else jnp.asarray(positions, jnp.int32)
    out = _logits(graphdef, state, jnp.asarray(ids, jnp.int32), pos)
    return np.asarray(out.astype(jnp.float32))


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the parity metric of issue 2."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


class CheckpointFactory:
    """`get(name, **hf_overrides)` -> (directory, torch model); each name is written once."""

    def __init__(self, root):
        self.root, self.made = root, {}

    def get(self, name: str, dtype: str = "float32", seed: int = 0, **overrides):
        if name not in self.made:
            directory = self.root / name
            model = hf_utils.save_hf_model(directory, dtype=dtype, seed=seed, **overrides)
            self.made[name] = (directory, model)
        return self.made[name]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return CheckpointFactory(tmp_path_factory.mktemp("hf_checkpoints"))


@pytest.fixture(scope="session")
def base_checkpoint(checkpoints):
    """The default tiny config: GQA 4/2, GDN HV/H = 2, untied, all-MoE, 4 layers."""
    return checkpoints.get("base")


@pytest.fixture(scope="session")
def base_model(base_checkpoint):
    import qnext_jax

    return qnext_jax.from_pretrained(base_checkpoint[0], dtype="float32", progress=False)


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())
