"""qnext_jax parameters -> a Hugging Face Qwen3-Next directory (the converter's table, inverted).

Each parameter leaf is named and transformed by the same tables the loader reads with
(`mapping.LAYER_TABLE` / `GLOBAL_TABLE`), each transform run backwards:

  identity         ours == HF
  transpose        ours [in, out] -> HF [out, in]
  conv             ours [W, C] grouped per key head -> HF [C, 1, W] in [q_all | k_all | v_all]
  experts_gate_up  ours [E, D, 2F] (gate | up) -> mlp.experts.{e}.gate_proj / up_proj [F, D]
  experts_down     ours [E, F, D] -> mlp.experts.{e}.down_proj [D, F]

Stacked layer parameters [L, ...] unstack to `model.layers.{start + r * period + j}`. The output
uses the release naming (per-expert tensors, `mtp.*` included, no `lm_head.weight` when tied), so
`qnext_jax.from_pretrained` and `transformers` both load it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx

from .mapping import GLOBAL_TABLE, LAYER_TABLE, conv_channel_order

_ST_DTYPES = {
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
}


def _inverse(name: str, kind: str, x: np.ndarray, conv_perm: np.ndarray) -> dict[str, np.ndarray]:
    """One unstacked parameter in our layout -> {HF name: tensor}."""
    if kind == "identity":
        return {name: x}
    if kind == "transpose":
        return {name: x.T}
    if kind == "conv":
        W, C = x.shape
        hf = np.empty((C, W), x.dtype)
        hf[conv_perm] = x.T  # our channel c' is HF channel conv_perm[c']
        return {name: hf[:, None, :]}
    if kind == "experts_gate_up":
        F = x.shape[2] // 2
        out = {}
        for e in range(x.shape[0]):
            out[f"{name}.{e}.gate_proj.weight"] = x[e, :, :F].T
            out[f"{name}.{e}.up_proj.weight"] = x[e, :, F:].T
        return out
    if kind == "experts_down":
        return {f"{name}.{e}.down_proj.weight": x[e].T for e in range(x.shape[0])}
    raise ValueError(f"unknown transform {kind!r} for {name}")


def hf_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) for every parameter of `model`, in the model's own dtype."""
    from qnext_jax.model import segment_layers

    cfg = model.config
    conv_perm = conv_channel_order(
        cfg.linear_num_key_heads,
        cfg.linear_key_head_dim,
        cfg.linear_num_value_heads,
        cfg.linear_value_head_dim,
    )
    segments = segment_layers(cfg.layer_kinds())
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = np.asarray(var[...])
        if path[0] == "segments":  # ('segments', s, 'group', 'layers', j, *rest), stacked [L, ...]
            s, j, rest = path[1], path[4], ".".join(map(str, path[5:]))
            start, period, repeats = segments[s]
            hf_suffix, kind = LAYER_TABLE[rest]
            for r in range(repeats):
                prefix = f"model.layers.{start + r * period + j}."
                yield from _inverse(prefix + hf_suffix, kind, x[r], conv_perm).items()
        elif path[0] == "mtp" and path[1] == "layers":
            hf_suffix, kind = LAYER_TABLE[".".join(map(str, path[3:]))]
            yield from _inverse(f"mtp.layers.{path[2]}." + hf_suffix, kind, x, conv_perm).items()
        else:
            hf_name, kind = GLOBAL_TABLE[".".join(map(str, path))]
            yield from _inverse(hf_name, kind, x, conv_perm).items()


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata=None) -> None:
    """A minimal safetensors writer (numpy has no bf16, so safetensors.numpy cannot save it)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset, blobs = 0, []
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} not supported; allowed: {list(_ST_DTYPES)}")
        raw = t.tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)


def save_hf(model, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write `config.json` and `model.safetensors` (HF release naming, `mtp.*` included).

    Args:
      model: a Qwen3NextForCausalLM.
      out_dir: created if missing; existing files of the same names are replaced.
      dtype: "bfloat16", "float16" or "float32" for the stored tensors.
    Returns the directory."""
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in hf_tensors(model):
        if name in tensors:
            raise ValueError(f"two parameters map to the HF tensor {name}")
        tensors[name] = t.astype(np_dtype)
    write_safetensors(out / "model.safetensors", tensors)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
