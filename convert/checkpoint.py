"""From a checkpoint directory to a ready model: HF safetensors (converted on the fly) or a
directory this package converted before (orbax), with the same call."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from .loader import load_params
from .safetensors_io import SafetensorsCheckpoint

log = logging.getLogger("qnext_convert")
MARKER = "qnext_jax.json"  # present in a converted (orbax) directory
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def is_converted(path: str | Path) -> bool:
    return (Path(path) / MARKER).exists()


def model_config(path: str | Path):
    """The Qwen3NextConfig of a checkpoint; MTP layers only when `mtp.*` tensors exist."""
    from qnext_jax.config import Qwen3NextConfig

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    hf = json.loads((path / "config.json").read_text())
    if is_converted(path):
        n_mtp = json.loads((path / MARKER).read_text())["num_mtp_layers"]
        return Qwen3NextConfig.from_hf(hf, num_mtp_layers=n_mtp)
    ckpt = SafetensorsCheckpoint(path)
    has_mtp = any(n.startswith("mtp.") for n in ckpt.names())
    if not has_mtp:
        return Qwen3NextConfig.from_hf(hf, num_mtp_layers=0)
    return Qwen3NextConfig.from_hf(hf)


def abstract_model(cfg, opts):
    from qnext_jax.model import Qwen3NextForCausalLM

    return nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, opts))


def load_pretrained(path, opts, *, shardings_fn=None, progress=True):
    """Build the model for `path` with parameters loaded (HF safetensors or converted orbax).

    shardings_fn(abstract_param_state) -> State of shardings, for sharded placement."""
    from qnext_jax.model import segment_layers

    path = Path(path)
    cfg = model_config(path)
    model = abstract_model(cfg, opts)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    shardings = shardings_fn(params) if shardings_fn is not None else None
    dtype = jnp.dtype(opts.dtype)
    if is_converted(path):
        params = restore_params(path, params, dtype, shardings)
    else:
        ckpt = SafetensorsCheckpoint(path)
        segments = segment_layers(cfg.layer_kinds())
        params = load_params(
            params, cfg, ckpt, segments, dtype=dtype, shardings=shardings, progress=progress
        )
    return nnx.merge(graphdef, params, rest)


def save_converted(model, hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Save a loaded model's parameters with orbax, plus the HF side files (config, tokenizer,
    generation config), so the next load skips the conversion."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    params = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", nnx.to_pure_dict(params), force=True)
    for name in SIDE_FILES:
        if (Path(hf_dir) / name).exists():
            shutil.copy(Path(hf_dir) / name, out / name)
    meta = {
        "format_version": 1,
        "num_mtp_layers": model.config.num_mtp_layers,
        "dtype": str(model.dtype),
    }
    (out / MARKER).write_text(json.dumps(meta, indent=1))
    return out


def restore_params(path, abstract_params, dtype, shardings=None):
    """Restore orbax parameters straight into their (sharded) placement."""
    import orbax.checkpoint as ocp

    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    flat_shard = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}

    def target(path, var):
        sh = flat_shard.get(path, default)
        return jax.ShapeDtypeStruct(var.shape, dtype, sharding=getattr(sh, "value", sh))

    flat = [(p, target(p, v)) for p, v in nnx.to_flat_state(abstract_params)]
    tree = nnx.to_pure_dict(nnx.from_flat_state(flat))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(Path(path).absolute() / "params", tree)
    nnx.replace_by_pure_dict(abstract_params, restored)
    return abstract_params
