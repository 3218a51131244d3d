"""A small byte-level BPE tokenizer with Qwen3's special tokens and hybrid chat template.

Trained with HF `tokenizers` on the demo arithmetic data. The pre-tokenizer is Qwen2/3's own split
regex, which isolates every digit (`\\p{N}`), so merges never cross digits and each digit stays a
single token: column arithmetic is learnable. Ids 0-4 are the Qwen tokens below; `<think>` and
`</think>` are added tokens with special=false, as in Qwen3, so `skip_special_tokens` keeps them.

    python -m qnext_jax.demo.tokenizer --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from qnext_jax.demo import data

VOCAB_SIZE = 1024  # an upper bound: the templated data runs out of merges before it
# Qwen's tokens at fixed low ids (the real model has them at 151643-151645, 151667-151668).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
TOKEN_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + THINK_TOKENS)}
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"

# Qwen2/3 tokenizer.json pre-tokenizer split pattern (single digits, newline runs kept whole).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3 hybrid template behaviour: ChatML turns; the generation prompt is `<|im_start|>assistant\n`,
# followed by an empty think block when enable_thinking is false. Assistant turns render their
# content (which carries its own think block); a `reasoning_content` field renders as Qwen3 does it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.reasoning_content is defined"
    " and message.reasoning_content is string %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + message.reasoning_content.strip('\\n')"
    " + '\\n</think>\\n\\n' + message.content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def training_texts(seed: int = 0, n: int = 4000) -> list[str]:
    """Text the BPE learns from: every message of n train examples, both thinking modes, without the
    tags (they are whole tokens, never merged) and the ChatML role lines."""
    texts = []
    for ex in data.make_examples(n, "train", seed):
        texts += ["user\n", "assistant\n"]
        for thinking in (True, False):
            for msg in data.render_chat(ex, thinking):
                content = msg["content"]
                for tag in THINK_TOKENS:
                    content = content.replace(tag, "\x00")
                texts.extend(part for part in content.split("\x00") if part)
    return texts


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the BPE; the five Qwen tokens take ids 0-4, `<think>`/`</think>` as non-special."""
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS + THINK_TOKENS),  # reserves ids 0-4 in that order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(seed), trainer=trainer)
    # The trainer registers all reserved tokens as special; Qwen3 marks the think tags non-special.
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] in SPECIAL_TOKENS
    tok = Tokenizer.from_str(json.dumps(spec))
    for t, i in TOKEN_IDS.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def tokenizer_config() -> dict:
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t, i in TOKEN_IDS.items()
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 4096,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }


def build_tokenizer(out_dir: str | Path, seed: int = 0) -> Path:
    """Train and write `tokenizer.json` + `tokenizer_config.json` (byte-identical per seed).

    Returns the directory, loadable with `transformers.AutoTokenizer.from_pretrained(out_dir)`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(seed)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n")
    cfg = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(cfg + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Train the demo BPE tokenizer and write it to a directory."
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = build_tokenizer(args.out, args.seed)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    print(f"wrote {out} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
