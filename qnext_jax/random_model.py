"""A small random-weight Qwen3-Next with the demo tokenizer, for when no model is given and
the package carries no trained demo checkpoint. Written once to a cache folder (HF format)."""

from __future__ import annotations

import json
import os
from pathlib import Path

CACHE = Path(os.environ.get("QNEXT_CACHE", Path.home() / ".cache" / "qnext_jax")) / "random_demo"


def random_demo_checkpoint(path: Path = CACHE, seed: int = 0) -> Path:
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    from flax import nnx
    from qnext_convert.export import save_hf

    from qnext_jax.config import RuntimeOptions, tiny_config
    from qnext_jax.demo.tokenizer import build_tokenizer
    from qnext_jax.model import Qwen3NextForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    tok = json.loads((path / "tokenizer.json").read_text())
    vocab = len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
    specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    cfg = tiny_config(
        vocab_size=vocab,
        eos_token_id=specials.get("<|im_end|>"),
        pad_token_id=specials.get("<|endoftext|>"),
    )
    model = Qwen3NextForCausalLM(cfg, RuntimeOptions(dtype="float32"), rngs=nnx.Rngs(seed))
    save_hf(model, path, dtype="float32")
    eos = [specials[t] for t in ("<|im_end|>", "<|endoftext|>") if t in specials]
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "do_sample": False})
    )
    return path
