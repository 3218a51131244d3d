"""Reasoning split on crafted outputs (whole and streamed in pieces) and the chat prompt."""

from __future__ import annotations

import random

import pytest

from qnext_jax.chat import ReasoningStream, split_reasoning, starts_in_reasoning

CASES = [
    # (output text, prompt opened <think>, expected (reasoning, content))
    (
        "<think>\n12 + 7 = 19\n</think>\n\nThe answer is 19.",
        False,
        ("12 + 7 = 19", "The answer is 19."),
    ),
    ("12 + 7 = 19\n</think>\n\nThe answer is 19.", True, ("12 + 7 = 19", "The answer is 19.")),
    ("still thinking, cut by max_tokens", True, ("still thinking, cut by max_tokens", "")),
    ("<think>\nunfinished", False, ("unfinished", "")),
    ("The answer is 19.", False, (None, "The answer is 19.")),
    ("<think>\n\n</think>\n\nThe answer is 19.", False, ("", "The answer is 19.")),
    ("a < b and <thin is not a tag", False, (None, "a < b and <thin is not a tag")),
    ("x</think", True, ("x</think", "")),
]


@pytest.mark.parametrize("text,opened,expected", CASES)
def test_split_whole_and_streamed(text, opened, expected):
    assert split_reasoning(text, opened) == expected
    rng = random.Random(0)
    for _ in range(30):  # random cut points, tags split across deltas
        stream, reasoning, content, i = ReasoningStream(opened), "", "", 0
        while i < len(text):
            j = i + rng.randint(1, 5)
            r, c = stream.feed(text[i:j])
            reasoning, content, i = reasoning + r, content + c, j
        r, c = stream.feed("", final=True)
        got = (reasoning + r if stream.had_reasoning else None, content + c)
        assert got == expected


def test_prompt_decides_where_the_output_starts():
    assert starts_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert not starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not starts_in_reasoning("<|im_start|>assistant\n")
