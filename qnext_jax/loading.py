"""`from_pretrained`: a Hugging Face directory or a converted (orbax) directory -> a model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qnext_jax.config import RuntimeOptions


def from_pretrained(
    path: str | Path,
    dtype: str = "bfloat16",
    *,
    options: RuntimeOptions | None = None,
    shardings_fn=None,
    progress: bool = True,
):
    """Load Qwen3-Next from `path` with parameters in `dtype`.

    `path` holds either the HF files (config.json + model.safetensors or a sharded index; the
    `mtp.*` tensors become the MTP head) or the output of `python -m qnext_convert`.
    Returns a Qwen3NextForCausalLM: `model(input_ids)` -> logits [B, T, vocab]."""
    import qnext_convert

    options = dataclasses.replace(options or RuntimeOptions(), dtype=str(dtype))
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory")
    return qnext_convert.load_pretrained(
        path, options, shardings_fn=shardings_fn, progress=progress
    )
