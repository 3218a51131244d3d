"""One process of the two-process CPU test (test_sharding.py starts two, each with 2 devices).

    python multihost_worker.py PROCESS_ID PORT OUT_DIR   (XLA_FLAGS gives each process 2 devices)

The processes join through jax.distributed (gloo CPU collectives over 127.0.0.1), build a
4-device mesh spanning both, place the same random model on it, prefill a sharded cache and take
one decode step; process 0 writes the gathered logits for the parent to compare."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qnext_jax.config import FULL, LINEAR, RuntimeOptions, tiny_config
from qnext_jax.model import Qwen3NextForCausalLM

CFG = tiny_config(
    num_attention_heads=8,
    num_key_value_heads=2,
    linear_num_key_heads=8,
    linear_num_value_heads=16,
    num_experts=16,
    num_mtp_layers=0,
    num_hidden_layers=2,
    layer_types=(LINEAR, FULL),
)  # one GDN, one attention layer
PROMPT = np.array([[5, 9, 2, 7, 1, 3, 3, 8], [100, 42, 17, 6, 250, 11, 0, 4]], np.int32)
NEXT = np.array([[12], [13]], np.int32)


def prefill_and_step(model, prompt, nxt, cache):
    """Logits of the prompt (with the cache) and of one decode step after it: [B, 9, vocab]."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, prompt, nxt, cache):
        m = nnx.merge(graphdef, state)
        B, T = prompt.shape
        out = m.forward(prompt, cache=cache)
        pos = jnp.full((B, 1), T, jnp.int32)
        step = m.forward(nxt, pos, out.cache)
        return m.compute_logits(jnp.concatenate([out.hidden, step.hidden], axis=1))

    return run(state, prompt, nxt, cache)


def main(process_id: int, port: int, out_dir: str) -> None:
    from jax.experimental import multihost_utils

    from qnext_jax import sharding

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=120,
    )
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    mesh = sharding.make_mesh(CFG, 4)  # spans both processes
    model = Qwen3NextForCausalLM(CFG, RuntimeOptions(dtype="float32", mesh=mesh), rngs=nnx.Rngs(0))
    sharding.shard_params(model, mesh=mesh, cfg=CFG)
    cache = sharding.shard_cache(model.init_cache(2, 16), mesh=mesh, cfg=CFG)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    prompt, nxt = (
        jax.make_array_from_callback(a.shape, rep, lambda i, a=a: a[i]) for a in (PROMPT, NEXT)
    )
    logits = prefill_and_step(model, prompt, nxt, cache)
    assert not logits.is_fully_addressable  # really split over both processes (vocab axis)
    full = multihost_utils.process_allgather(logits, tiled=True)
    if process_id == 0:
        np.save(f"{out_dir}/logits.npy", np.asarray(full))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
