"""Chat prompts through the checkpoint's own template, and the reasoning splitter.

Text between `<think>` and `</think>` is reasoning, the rest is content. A Thinking-style
template opens `<think>` in the prompt, so the output holds only `</think>`: whether the output
starts inside a think block is read off the rendered prompt.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def render_chat(tokenizer, messages, chat_template_kwargs: dict | None = None) -> str:
    """The generation prompt for `messages`; `chat_template_kwargs` (e.g. enable_thinking)
    go to the template as variables."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template; use generate() with a plain prompt")
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
    )


def starts_in_reasoning(prompt: str) -> bool:
    """True when the prompt leaves a `<think>` block open (the output begins as reasoning)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a complete output; reasoning is None when the output has none.

    Defined as the stream splitter fed the whole text, so streamed and non-streamed splits
    agree by construction."""
    stream = ReasoningStream(in_reasoning)
    reasoning, content = stream.feed(text, final=True)
    return (reasoning if stream.had_reasoning else None), content


class ReasoningStream:
    """Split a stream of text deltas into (reasoning_delta, content_delta) pairs.

    Grammar: [<think>] reasoning </think> content. The open tag counts only before any
    non-whitespace content (or it comes from the prompt); the first close ends reasoning.
    Newlines around the reasoning and at the start of the content are dropped. A tail that
    could still become a tag (or newlines that could precede one) is held back until the next
    delta, so the tags never leak into either side."""

    def __init__(self, in_reasoning: bool = False):
        self.mode = "reasoning" if in_reasoning else "pre"
        self.had_reasoning = in_reasoning
        self.lead = True  # strip leading newlines of the current section
        self.buf = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.buf += delta
        reasoning, content = "", ""
        while True:
            if self.mode == "pre":
                s = self.buf.lstrip()
                if s.startswith(THINK_OPEN):
                    self.buf, self.mode, self.lead, self.had_reasoning = (
                        s[len(THINK_OPEN) :],
                        "reasoning",
                        True,
                        True,
                    )
                    continue
                if not final and THINK_OPEN.startswith(s):
                    break  # may still become <think>
                self.mode, self.lead = "content", False
                continue
            if self.mode == "reasoning":
                if self.lead:
                    self.buf = self.buf.lstrip("\n")
                    if not self.buf and not final:
                        break
                    self.lead = False
                at = self.buf.find(THINK_CLOSE)
                if at >= 0:
                    reasoning += self.buf[:at].rstrip("\n")
                    self.buf, self.mode, self.lead = (
                        self.buf[at + len(THINK_CLOSE) :],
                        "content",
                        True,
                    )
                    continue
                if final:
                    reasoning += self.buf.rstrip("\n")
                    self.buf = ""
                    break
                emit = self.buf[: len(self.buf) - _partial_tag_suffix(self.buf, THINK_CLOSE)]
                emit = emit.rstrip("\n")  # newlines that may precede </think>
                reasoning += emit
                self.buf = self.buf[len(emit) :]
                break
            # content
            if self.lead:
                self.buf = self.buf.lstrip("\n")
                if not self.buf and not final:
                    break
                self.lead = False
            content += self.buf
            self.buf = ""
            break
        return reasoning, content


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
