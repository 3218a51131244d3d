"""The demo tokenizer: ids of Qwen's tokens, digits as single tokens, round trips, and a chat
template that renders thinking on/off exactly as Qwen3's hybrid template does."""

import json

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from qnext_jax.demo import data
from qnext_jax.demo.tokenizer import TOKEN_IDS, build_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), seed=0)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def _ids(hf, text):
    return hf(text, add_special_tokens=False)["input_ids"]


def test_deterministic(tok_dir, tmp_path):
    again = build_tokenizer(tmp_path, seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tok_dir / name).read_bytes()


def test_special_token_ids(hf, tok_dir):
    assert TOKEN_IDS == {
        "<|endoftext|>": 0,
        "<|im_start|>": 1,
        "<|im_end|>": 2,
        "<think>": 3,
        "</think>": 4,
    }
    for t, i in TOKEN_IDS.items():
        assert hf.convert_tokens_to_ids(t) == i
        assert _ids(hf, t) == [i]
        assert _ids(hf, f"x{t}y")[1:-1] == [i]  # split out of surrounding text
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 2
    assert hf.pad_token == "<|endoftext|>" and hf.pad_token_id == 0
    assert hf.bos_token is None
    spec = {
        a["content"]: a["special"]
        for a in json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"]
    }
    assert spec == {
        "<|endoftext|>": True,
        "<|im_start|>": True,
        "<|im_end|>": True,
        "<think>": False,
        "</think>": False,
    }
    assert 256 < len(hf) <= 1024


def test_skip_special_keeps_think(hf):
    ids = _ids(hf, "<|im_start|>assistant\n<think>\nhm\n</think>\n\nThe answer is 7.<|im_end|>")
    assert (
        hf.decode(ids, skip_special_tokens=True)
        == "assistant\n<think>\nhm\n</think>\n\nThe answer is 7."
    )


def test_digits_are_single_tokens(hf):
    for d in "0123456789":
        assert len(_ids(hf, d)) == 1
    vocab = hf.get_vocab()
    # no token other than a lone digit contains a digit byte
    assert not [t for t in vocab if any(c.isdigit() for c in t) and len(t) > 1]
    assert hf.convert_ids_to_tokens(_ids(hf, "1234+987"))[:4] == ["1", "2", "3", "4"]


def test_round_trip(hf, tok_dir):
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for split in data.SPLITS:
        for ex in data.make_examples(150, split, seed=11):
            for thinking in (True, False):
                text = hf.apply_chat_template(data.render_chat(ex, thinking), tokenize=False)
                ids = _ids(hf, text)
                assert hf.decode(ids) == text
                assert raw.decode(raw.encode(text).ids, skip_special_tokens=False) == text
                assert len(ids) <= 256
    odd = "Ünïcode – ok? 12 × 3 \t tabs\n\n\nend"
    assert hf.decode(_ids(hf, odd)) == odd


Q = "What is 12 + 34?"
TRACE = "12 + 34\n2+4+0=6, write 6, carry 0\n1+3+0=4, write 4, carry 0\nso 12 + 34 = 46"


def test_chat_template_generation_prompt(hf):
    msgs = [{"role": "user", "content": Q}]
    base = f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == base
    on = hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    off = hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert on == base
    assert off == base + "<think>\n\n</think>\n\n"
    assert hf.apply_chat_template(msgs, tokenize=False) == f"<|im_start|>user\n{Q}<|im_end|>\n"
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs]
    assert hf.apply_chat_template(sys_msgs, tokenize=False, add_generation_prompt=True).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )


def test_chat_template_history(hf):
    answer = "The answer is 46."
    on = [
        {"role": "user", "content": Q},
        {"role": "assistant", "content": f"<think>\n{TRACE}\n</think>\n\n{answer}"},
    ]
    assert hf.apply_chat_template(on, tokenize=False) == (
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n<think>\n{TRACE}\n</think>\n\n{answer}<|im_end|>\n"
    )
    # reasoning_content is rendered into the think block, as Qwen3's template renders the last turn
    rc = [on[0], {"role": "assistant", "content": answer, "reasoning_content": TRACE}]
    assert hf.apply_chat_template(rc, tokenize=False) == hf.apply_chat_template(on, tokenize=False)


@pytest.mark.parametrize("thinking", [True, False])
def test_prompt_is_token_prefix_of_training_text(hf, thinking):
    """The inference prompt tokenizes exactly as the start of the training text."""
    for ex in data.make_examples(60, "heldout", seed=2):
        chat = data.render_chat(ex, thinking)
        text = hf.apply_chat_template(chat, tokenize=False)
        prompt_text = hf.apply_chat_template(
            chat[:1], tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        assert text.startswith(prompt_text)
        full, prompt = _ids(hf, text), _ids(hf, prompt_text)
        assert full[: len(prompt)] == prompt
        assert hf.decode(full[len(prompt) :]) == text[len(prompt_text) :]
