"""`from_pretrained`: a Hugging Face directory or a converted (orbax) directory -> a model.

`load_format="dummy"` (vLLM's name) reads only config.json and fills the parameters with random
values, each device drawing only the slices it holds: the real geometry without the weights,
for benchmarks and memory planning."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import Qwen3NextConfig, RuntimeOptions

LOAD_FORMATS = ("auto", "dummy")


def model_config(path: str | Path, load_format: str = "auto") -> Qwen3NextConfig:
    """The config of the model at `path`. With real weights, MTP layers exist only when the
    checkpoint has `mtp.*` tensors; with dummy weights, as config.json says."""
    _check_load_format(load_format)
    path = Path(path)
    if load_format == "dummy":
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json (load_format='dummy' needs one)")
        return Qwen3NextConfig.from_hf(json.loads((path / "config.json").read_text()))
    import qnext_convert

    return qnext_convert.model_config(path)


def from_pretrained(
    path: str | Path,
    dtype: str = "bfloat16",
    *,
    options: RuntimeOptions | None = None,
    shardings_fn=None,
    progress: bool = True,
    load_format: str = "auto",
    seed: int = 0,
):
    """Load Qwen3-Next from `path` with parameters in `dtype`.

    `path` holds either the HF files (config.json + model.safetensors or a sharded index; the
    `mtp.*` tensors become the MTP head) or the output of `python -m qnext_convert`.
    shardings_fn(abstract parameter State) -> State of shardings places every parameter.
    Returns a Qwen3NextForCausalLM: `model(input_ids)` -> logits [B, T, vocab]."""
    _check_load_format(load_format)
    options = dataclasses.replace(options or RuntimeOptions(), dtype=str(dtype))
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory")
    if load_format == "dummy":
        cfg = model_config(path, load_format)
        return init_random(cfg, options, shardings_fn=shardings_fn, seed=seed)
    import qnext_convert

    return qnext_convert.load_pretrained(
        path, options, shardings_fn=shardings_fn, progress=progress
    )


def init_random(cfg: Qwen3NextConfig, options: RuntimeOptions, *, shardings_fn=None, seed=0):
    """A model with random parameters, each device drawing only its own slices (threefry is
    partitionable), so the 80B geometry never exists whole on one device or host.

    Matrices are the model's std-0.02 normal draws (std 0.3 for the conv weights), one jit per
    leaf; the expert stacks one layer at a time into a donated buffer (one program for the
    whole model kept ~3.5x the parameters' bytes as temporaries and compiled for minutes at
    48 layers). Vectors (norm weights, dt_bias, A_log) take the values a checkpoint-less build
    gives them (ones / zeros), from one small program."""
    from qnext_jax.model import Qwen3NextForCausalLM

    def build(rngs):
        return nnx.split(Qwen3NextForCausalLM(cfg, options, rngs=rngs), nnx.Param, ...)

    graphdef, abstract, _ = nnx.eval_shape(lambda: build(nnx.Rngs(seed)))
    flat_shardings = (
        dict(nnx.to_flat_state(shardings_fn(abstract))) if shardings_fn is not None else {}
    )
    flat = list(nnx.to_flat_state(abstract))

    def stacked(path):
        return path[0] == "segments"  # LayerStack leaves carry a leading layer axis

    def is_vector(path, var):
        return len(var.shape) - stacked(path) <= 1

    def vectors():
        _, params, rest = build(None)
        return [v[...] for p, v in nnx.to_flat_state(params) if is_vector(p, v)], rest

    out = [_value(flat_shardings.get(p)) for p, v in flat if is_vector(p, v)]
    vecs, rest = jax.jit(vectors, out_shardings=(out or None, None))()
    vecs = iter(vecs)
    key = jax.random.key(seed)
    leaves = []
    for i, (path, var) in enumerate(flat):
        if is_vector(path, var):
            value = next(vecs)
        else:
            std = 0.3 if "conv_w" in path else 0.02
            sharding = _value(flat_shardings.get(path))
            value = _normal(jax.random.fold_in(key, i), var, sharding, std, stacked(path))
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves), rest)


def _value(sharding):
    return getattr(sharding, "value", sharding)


def _normal(key, var, sharding, std: float, stacked: bool):
    """std * N(0, 1) of var's shape and dtype, placed on `sharding` (None: default device)."""
    shape, dtype = tuple(var.shape), var.dtype

    def draw(k, shape):
        return std * jax.random.normal(k, shape, dtype)

    if not stacked or var.size * jnp.dtype(dtype).itemsize < (4 << 30):
        return jax.jit(functools.partial(draw, shape=shape), out_shardings=sharding)(key)
    # a stack over layers of several GiB: fill one layer at a time in place
    buf = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
    fill = jax.jit(
        lambda b, k, i: jax.lax.dynamic_update_index_in_dim(b, draw(k, shape[1:]), i, 0),
        donate_argnums=0,
        out_shardings=sharding,
    )
    for i in range(shape[0]):
        buf = fill(buf, jax.random.fold_in(key, i), i)
    return buf


def _check_load_format(load_format: str) -> None:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not one of {list(LOAD_FORMATS)}")
