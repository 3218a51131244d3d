"""Arithmetic task data for the embedded demo model.

Problems where a written procedure visibly helps a tiny model: column addition and subtraction of
2-4 digit numbers, a 2-digit number times a 1-digit number, and two-step word problems. Each example
renders as a Qwen3 hybrid chat: the assistant turn opens with a `<think>` block that either holds a
digit-by-digit worked trace (thinking on) or is empty (thinking off), then states the answer as
"The answer is N."

Difficulty levels (what "harder problems" means in the evaluation):
  1  add/sub of 2-digit numbers
  2  add/sub of 3-digit numbers, 2-digit x 1-digit
  3  add/sub of 4-digit numbers, two-step word problems

Splits are disjoint by operand tuple: a stable hash of (kind, operands) puts 1 in 10 problems in
"heldout" and the rest in "train", whatever the seed, so no held-out problem is ever trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re

SPLITS = ("train", "heldout")
LEVELS = (1, 2, 3)
HELDOUT_BUCKETS = 10  # 1 in HELDOUT_BUCKETS operand tuples is held out

# kind -> levels it appears at; a level's examples draw kinds uniformly from its list.
_KINDS_BY_LEVEL = {
    1: ("add2", "sub2"),
    2: ("add3", "sub3", "mul"),
    3: ("add4", "sub4", "word"),
}

_ADD_Q = (
    "What is {a} + {b}?",
    "Compute {a} plus {b}.",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
)
_SUB_Q = (
    "What is {a} - {b}?",
    "Compute {a} minus {b}.",
    "Subtract {b} from {a}.",
    "What is the difference between {a} and {b}?",
)
_MUL_Q = (
    "What is {a} * {b}?",
    "Compute {a} times {b}.",
    "Multiply {a} by {b}.",
    "What is the product of {a} and {b}?",
)
_NAMES = ("Tom", "Anna", "Ravi", "Mia", "Leo", "Sara", "Ken", "Lina")
_ITEMS = ("apples", "stamps", "marbles", "books", "coins", "shells", "cards", "pens")
# Two-step word problems: form -> question template over name n, item i and operands a, b, c; the
# steps are r1 = a op1 b, answer = r1 op2 c (ops in _WORD_STEPS). Keep the order: the form's index
# is the first operand of a word problem.
_HOW_MANY = " How many {i} does {n} have now?"
_WORD_FORMS = {
    "add_sub": "{n} has {a} {i}. {n} buys {b} more and then gives away {c}." + _HOW_MANY,
    "add_add": "{n} has {a} {i}, gets {b} more from a friend and then buys {c} more." + _HOW_MANY,
    "sub_add": "{n} had {a} {i}, lost {b} of them and then found {c}." + _HOW_MANY,
    "mul_add": "A box holds {a} {i}. {n} buys {b} boxes and {c} loose {i}."
    " How many {i} does {n} have in total?",
}

ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")


@dataclasses.dataclass(frozen=True)
class Example:
    """One arithmetic problem. `operands` (with `kind`) is the identity used for the split."""

    kind: str  # add2|add3|add4|sub2|sub3|sub4|mul|word
    level: int
    operands: tuple[int, ...]
    question: str
    trace: str  # the worked procedure, without the <think> tags
    answer: int


# ----------------------------------------------------------------------------- worked procedures


def _digits(x: int, width: int) -> list[int]:
    """Digits of x from the units up, zero-padded to width."""
    return [(x // 10**i) % 10 for i in range(width)]


def add_trace(a: int, b: int) -> list[str]:
    """Column addition, units first: one line per column with the carry in written out."""
    width = max(len(str(a)), len(str(b)))
    lines, carry = [f"{a} + {b}"], 0
    for x, y in zip(_digits(a, width), _digits(b, width), strict=True):
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}, write {s % 10}, carry {s // 10}")
        carry = s // 10
    lines.append(f"so {a} + {b} = {a + b}")
    return lines


def sub_trace(a: int, b: int) -> list[str]:
    """Column subtraction (a >= b), units first, borrowing when a column goes below zero."""
    width = len(str(a))
    lines, borrow = [f"{a} - {b}"], 0
    for x, y in zip(_digits(a, width), _digits(b, width), strict=True):
        d = x - y - borrow
        if d >= 0:
            lines.append(f"{x}-{y}-{borrow}={d}, write {d}, borrow 0")
            borrow = 0
        else:
            lines.append(
                f"{x}-{y}-{borrow}<0, {x + 10}-{y}-{borrow}={d + 10}, write {d + 10}, borrow 1"
            )
            borrow = 1
    lines.append(f"so {a} - {b} = {a - b}")
    return lines


def mul_trace(a: int, m: int) -> list[str]:
    """Multiply a by the single digit m, units first, carrying into the next column."""
    lines, carry = [f"{a} * {m}"], 0
    for x in _digits(a, len(str(a))):
        p = x * m + carry
        lines.append(f"{x}*{m}+{carry}={p}, write {p % 10}, carry {p // 10}")
        carry = p // 10
    lines.append(f"so {a} * {m} = {a * m}")
    return lines


_OPS = {
    "+": (add_trace, lambda x, y: x + y),
    "-": (sub_trace, lambda x, y: x - y),
    "*": (mul_trace, lambda x, y: x * y),
}
_WORD_STEPS = {
    "add_sub": ("+", "-"),
    "add_add": ("+", "+"),
    "sub_add": ("-", "+"),
    "mul_add": ("*", "+"),
}


# ----------------------------------------------------------------------------- sampling problems


def _ndigit(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1), 10**n - 1)


def _sample_operands(kind: str, rng: random.Random) -> tuple[int, ...]:
    if kind[:3] in ("add", "sub"):
        n = int(kind[3])
        a, b = _ndigit(rng, n), rng.randint(10 ** (n - 1) if rng.random() < 0.7 else 1, 10**n - 1)
        if kind.startswith("sub") and b > a:
            a, b = b, a  # keep results non-negative
        return (a, b) if kind.startswith("sub") or rng.random() < 0.5 else (b, a)
    if kind == "mul":
        return _ndigit(rng, 2), rng.randint(2, 9)
    # word: form index, then a, b, c chosen so both steps stay non-negative
    form = rng.randrange(len(_WORD_FORMS))
    op1, op2 = _WORD_STEPS[list(_WORD_FORMS)[form]]
    a, b = _ndigit(rng, 2), rng.randint(2, 9) if op1 == "*" else _ndigit(rng, 2)
    if op1 == "-" and b > a:
        a, b = b, a
    r1 = _OPS[op1][1](a, b)
    c = rng.randint(10, r1) if op2 == "-" else _ndigit(rng, 2)
    return form, a, b, c


def _build(kind: str, level: int, operands: tuple[int, ...], rng: random.Random) -> Example:
    if kind == "word":
        form, a, b, c = operands
        name = list(_WORD_FORMS)[form]
        op1, op2 = _WORD_STEPS[name]
        r1 = _OPS[op1][1](a, b)
        answer = _OPS[op2][1](r1, c)
        question = _WORD_FORMS[name].format(
            n=rng.choice(_NAMES), i=rng.choice(_ITEMS), a=a, b=b, c=c
        )
        lines = ["Step 1:", *_OPS[op1][0](a, b), "Step 2:", *_OPS[op2][0](r1, c)]
    else:
        a, b = operands
        op, templates = {"add": ("+", _ADD_Q), "sub": ("-", _SUB_Q), "mul": ("*", _MUL_Q)}[kind[:3]]
        answer = _OPS[op][1](a, b)
        question = rng.choice(templates).format(a=a, b=b)
        lines = _OPS[op][0](a, b)
    return Example(kind, level, operands, question, "\n".join(lines), answer)


def split_of(kind: str, operands: tuple[int, ...]) -> str:
    """The split a problem belongs to: a stable hash of its identity, independent of any seed."""
    key = f"{kind}:{','.join(map(str, operands))}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % HELDOUT_BUCKETS
    return "heldout" if bucket == 0 else "train"


def make_examples(
    n: int,
    split: str = "train",
    seed: int = 0,
    levels: tuple[int, ...] = LEVELS,
    unique: bool = True,
) -> list[Example]:
    """Generate n examples of one split; example i has level levels[i % len(levels)].

    Deterministic in (n, split, seed, levels). With `unique`, no operand tuple repeats in the list
    (for large training sets pass unique=False: level 2 has only ~650 train multiplications).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not levels or any(lv not in LEVELS for lv in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels!r}")
    rng = random.Random(f"qnext_demo:{split}:{seed}")
    seen: set[tuple[str, tuple[int, ...]]] = set()
    out: list[Example] = []
    for _ in range(200 * n + 1000):  # generous: rejection keeps ~1 draw in 10 for heldout
        if len(out) == n:
            break
        level = levels[len(out) % len(levels)]
        kind = rng.choice(_KINDS_BY_LEVEL[level])
        operands = _sample_operands(kind, rng)
        if split_of(kind, operands) != split or (unique and (kind, operands) in seen):
            continue
        seen.add((kind, operands))
        out.append(_build(kind, level, operands, rng))
    if len(out) < n:
        raise ValueError(f"could not draw {n} unique {split} examples at levels {levels}")
    return out


# ----------------------------------------------------------------------------- chat rendering


def answer_text(answer: int) -> str:
    return f"The answer is {answer}."


def assistant_content(example: Example, thinking: bool) -> str:
    """The assistant turn as Qwen3's hybrid template renders a final turn: think block, answer."""
    reasoning = example.trace if thinking else ""
    return f"<think>\n{reasoning}\n</think>\n\n{answer_text(example.answer)}"


def render_chat(example: Example, thinking: bool) -> list[dict[str, str]]:
    """The example as a [user, assistant] message list for `apply_chat_template`."""
    return [
        {"role": "user", "content": example.question},
        {"role": "assistant", "content": assistant_content(example, thinking)},
    ]


def extract_answer(text: str) -> int | None:
    """The final answer in an assistant text ("... The answer is N."), or None if it states none.

    The last statement wins; a text that opened a think block but never closed it has no answer.
    """
    if "<think>" in text and "</think>" not in text:
        return None
    text = text.rsplit("</think>", 1)[-1]
    found = ANSWER_RE.findall(text)
    return int(found[-1]) if found else None
