"""Load HF safetensors into a Qwen3-Next model's parameters, one tensor slice at a time.

Every parameter is created with `jax.make_array_from_callback`: each device's callback reads
only the slice that device holds, straight from the memory-mapped files. So no host or device
ever holds the whole checkpoint, sharded or not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .mapping import LayerSource, conv_channel_order, layer_source
from .safetensors_io import SafetensorsCheckpoint

log = logging.getLogger("qnext_convert")


class CheckpointError(ValueError):
    """The checkpoint does not match the model: missing tensors or wrong shapes."""


def _leaf_sources(path, shape, cfg, segments, ckpt, conv_perm) -> list[LayerSource] | LayerSource:
    """A list (one per stacked repeat) or a single LayerSource for one parameter leaf."""
    if path[0] == "segments":
        s, j, rest = path[1], path[4], ".".join(map(str, path[5:]))
        start, period, repeats = segments[s]
        return [
            layer_source(
                f"model.layers.{start + r * period + j}.", rest, shape[1:], ckpt, conv_perm
            )
            for r in range(repeats)
        ]
    if path[0] == "mtp" and path[1] == "layers":
        rest = ".".join(map(str, path[3:]))
        return layer_source(f"mtp.layers.{path[2]}.", rest, shape, ckpt, conv_perm)
    return layer_source("", ".".join(map(str, path)), shape, ckpt, conv_perm)


def plan(abstract_params, cfg, ckpt: SafetensorsCheckpoint, segments):
    """Map every parameter leaf to its sources; check names and shapes before reading.

    Returns {path: (reader(index) -> np.ndarray)}. Raises CheckpointError listing every missing
    tensor or every shape mismatch; warns about checkpoint tensors nobody uses."""
    conv_perm = conv_channel_order(
        cfg.linear_num_key_heads,
        cfg.linear_key_head_dim,
        cfg.linear_num_value_heads,
        cfg.linear_value_head_dim,
    )
    readers: dict[tuple, Callable] = {}
    expected: dict[str, tuple[int, ...]] = {}
    for path, var in nnx.to_flat_state(abstract_params):
        shape = tuple(var.shape if hasattr(var, "shape") else var[...].shape)
        src = _leaf_sources(path, shape, cfg, segments, ckpt, conv_perm)
        if isinstance(src, list):
            for s in src:
                expected.update(s.sources)
            readers[path] = _stacked_reader(src, ckpt)
        else:
            expected.update(src.sources)
            readers[path] = lambda idx, s=src: s.read(ckpt, idx)
    missing = sorted(n for n in expected if n not in ckpt)
    if missing:
        raise CheckpointError(
            f"{ckpt.directory}: {len(missing)} tensor(s) missing from the checkpoint: {missing}"
        )
    wrong = [
        f"{n}: expected {expected[n]}, found {ckpt.shape(n)}"
        for n in sorted(expected)
        if ckpt.shape(n) != expected[n]
    ]
    if wrong:
        raise CheckpointError(f"{ckpt.directory}: wrong tensor shape(s): " + "; ".join(wrong))
    unused = sorted(set(ckpt.names()) - set(expected))
    if unused:
        log.warning("%d checkpoint tensor(s) not used by the model: %s", len(unused), unused)
    return readers, unused


def _stacked_reader(sources: list[LayerSource], ckpt):
    def read(idx):
        return np.stack([sources[r].read(ckpt, idx[1:]) for r in range(len(sources))[idx[0]]])

    return read


def load_params(
    abstract_params,
    cfg,
    ckpt: SafetensorsCheckpoint,
    segments,
    *,
    dtype,
    shardings=None,
    progress: bool = True,
):
    """Fill an abstract parameter State from the checkpoint.

    shardings: a State of the same structure holding a jax.sharding.Sharding per leaf, or None
    (everything on the first local device)."""
    readers, _ = plan(abstract_params, cfg, ckpt, segments)
    flat_shard = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    out = []
    items = list(nnx.to_flat_state(abstract_params))
    for path, var in tqdm(items, desc="loading parameters", disable=not progress, unit="tensor"):
        shape = tuple(var.shape if hasattr(var, "shape") else var[...].shape)
        sharding = flat_shard.get(path, default)
        sharding = getattr(sharding, "value", sharding)
        read = readers[path]

        def callback(index, read=read, shape=shape):
            index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
            return np.ascontiguousarray(read(index)).astype(dtype)

        array = jax.make_array_from_callback(shape, sharding, callback)
        out.append((path, var.replace(array) if hasattr(var, "replace") else array))
    return nnx.from_flat_state(out)
