"""Data, tokenizer and evaluation for the small Qwen3-Next that ships as the embedded default model.

data.py       seeded arithmetic problems with worked traces, rendered as Qwen3 hybrid chats
tokenizer.py  byte-level BPE with Qwen's special tokens and an enable_thinking chat template
evaluate.py   greedy held-out accuracy by level, thinking on and off
"""
