"""Greedy accuracy of a chat model on the fixed held-out arithmetic set, by level, thinking on/off.

The model is reached only through a callable, so the same evaluation serves the engine, HF
transformers or a stub in tests:

    generate_fn(conversations: list[list[dict]], enable_thinking: bool, max_tokens: int)
        -> list[str]

It receives user-only conversations, must decode greedily, and returns the assistant texts (with or
without the think block; the answer is read from after the last `</think>`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qnext_jax.demo import data

GenerateFn = Callable[[list[list[dict[str, str]]], bool, int], list[str]]

HELDOUT_SEED = 1234  # the fixed held-out set; disjoint from train by construction of the splits
MODES = {"thinking_on": True, "thinking_off": False}


def heldout_set(n_per_level: int = 100, seed: int = HELDOUT_SEED) -> list[data.Example]:
    """The fixed evaluation problems: n_per_level unique held-out problems at each level."""
    return [
        ex
        for lv in data.LEVELS
        for ex in data.make_examples(n_per_level, "heldout", seed, levels=(lv,))
    ]


def _accuracy(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def evaluate(
    generate_fn: GenerateFn,
    n_per_level: int = 100,
    max_tokens: int = 256,
    batch_size: int = 64,
    seed: int = HELDOUT_SEED,
) -> dict:
    """Accuracy per level and overall for thinking on and off.

    Returns:
      {"n_per_level": int,
       "thinking_on":  {1: acc, 2: acc, 3: acc, "all": acc},
       "thinking_off": {1: acc, 2: acc, 3: acc, "all": acc},
       "failures": {"thinking_on": [(question, expected, text), ...] (first 5), ...}}
    """
    examples = heldout_set(n_per_level, seed)
    prompts = [[{"role": "user", "content": ex.question}] for ex in examples]
    result: dict = {"n_per_level": n_per_level, "failures": {}}
    for mode, thinking in MODES.items():
        texts: list[str] = []
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            out = generate_fn(batch, thinking, max_tokens)
            if len(out) != len(batch):
                raise ValueError(
                    f"generate_fn returned {len(out)} texts for {len(batch)} conversations"
                )
            texts.extend(out)
        correct = [
            data.extract_answer(t) == ex.answer for t, ex in zip(texts, examples, strict=True)
        ]
        table = {
            lv: _accuracy([c for c, ex in zip(correct, examples, strict=True) if ex.level == lv])
            for lv in data.LEVELS
        }
        table["all"] = _accuracy(correct)
        result[mode] = table
        fails = [
            (ex.question, ex.answer, t)
            for c, ex, t in zip(correct, examples, texts, strict=True)
            if not c
        ]
        result["failures"][mode] = fails[:5]
    return result


def format_table(result: dict) -> str:
    """A markdown table of the accuracies, for the model card."""
    cols = [*data.LEVELS, "all"]
    head = "| mode | " + " | ".join(f"level {c}" if c != "all" else "all" for c in cols) + " |"
    rows = [head, "|---" * (len(cols) + 1) + "|"]
    for mode in MODES:
        rows.append(
            f"| {mode.replace('_', ' ')} | "
            + " | ".join(f"{result[mode][c]:.3f}" for c in cols)
            + " |"
        )
    rows.append(f"\n{result['n_per_level']} held-out problems per level, greedy decoding.")
    return "\n".join(rows)
