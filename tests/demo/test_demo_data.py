"""The demo task data: deterministic, split-disjoint, every worked trace arithmetically right."""

import re

import pytest

from qnext_jax.demo import data

N = 1500

_ADD = re.compile(r"(\d)\+(\d)\+(\d)=(\d+), write (\d), carry (\d)")
_SUB_OK = re.compile(r"(\d)-(\d)-(\d)=(\d), write (\d), borrow 0")
_SUB_BORROW = re.compile(r"(\d)-(\d)-(\d)<0, (\d+)-(\d)-(\d)=(\d), write (\d), borrow 1")
_MUL = re.compile(r"(\d)\*(\d)\+(\d)=(\d+), write (\d), carry (\d)")
_HEAD = re.compile(r"(\d+) ([-+*]) (\d+)")
_KIND_OP = {"add": "+", "sub": "-", "mul": "*"}
_SO = re.compile(r"so (\d+) ([-+*]) (\d+) = (\d+)")


def _check_block(lines: list[str]) -> int:
    """Check one worked operation (header, column lines, result line); return its result."""
    a, op, b = _HEAD.fullmatch(lines[0]).groups()
    a, b = int(a), int(b)
    width = len(str(a)) if op in "-*" else max(len(str(a)), len(str(b)))
    cols = lines[1:-1]
    assert len(cols) == width, lines
    written, state = [], 0  # state: carry or borrow
    for i, line in enumerate(cols):
        x = (a // 10**i) % 10
        y = (b // 10**i) % 10
        if op == "+":
            g = [int(v) for v in _ADD.fullmatch(line).groups()]
            assert g[:3] == [x, y, state] and g[3] == x + y + state, line
            assert g[4] == g[3] % 10 and g[5] == g[3] // 10, line
            written.append(g[4])
            state = g[5]
        elif op == "*":
            g = [int(v) for v in _MUL.fullmatch(line).groups()]
            assert g[:3] == [x, b, state] and g[3] == x * b + state, line
            assert g[4] == g[3] % 10 and g[5] == g[3] // 10, line
            written.append(g[4])
            state = g[5]
        elif m := _SUB_OK.fullmatch(line):
            g = [int(v) for v in m.groups()]
            assert g[:3] == [x, y, state] and g[3] == x - y - state >= 0 and g[4] == g[3], line
            written.append(g[4])
            state = 0
        else:
            g = [int(v) for v in _SUB_BORROW.fullmatch(line).groups()]
            assert g[:3] == [x, y, state] and x - y - state < 0, line
            assert g[3:6] == [x + 10, y, state] and g[6] == x + 10 - y - state == g[7], line
            written.append(g[7])
            state = 1
    value = int("".join(map(str, reversed(written))))
    if op in "+*":
        value += state * 10**width  # final carry becomes the leading digit
    else:
        assert state == 0, lines  # a >= b: no borrow out of the top column
    sa, sop, sb, sr = _SO.fullmatch(lines[-1]).groups()
    assert (int(sa), sop, int(sb)) == (a, op, b) and int(sr) == value, lines
    assert value == {"+": a + b, "-": a - b, "*": a * b}[op]
    return value


def _check_trace(ex: data.Example) -> None:
    lines = ex.trace.split("\n")
    if ex.kind == "word":
        assert lines[0] == "Step 1:"
        k = lines.index("Step 2:")
        r1 = _check_block(lines[1:k])
        second = lines[k + 1 :]
        assert int(_HEAD.fullmatch(second[0]).group(1)) == r1  # step 2 starts from step 1's result
        result = _check_block(second)
    else:
        result = _check_block(lines)
        a, op, b = _HEAD.fullmatch(lines[0]).groups()
        assert (int(a), op, int(b)) == (ex.operands[0], _KIND_OP[ex.kind[:3]], ex.operands[1])
    assert result == ex.answer
    for n in ex.operands[1:] if ex.kind == "word" else ex.operands:
        assert str(n) in ex.question


@pytest.mark.parametrize("split", data.SPLITS)
def test_traces_are_correct(split):
    for ex in data.make_examples(N, split, seed=3):
        _check_trace(ex)


def test_deterministic():
    assert data.make_examples(300, "train", seed=7) == data.make_examples(300, "train", seed=7)
    assert data.make_examples(300, "heldout", seed=7) == data.make_examples(300, "heldout", seed=7)
    assert data.make_examples(300, "train", seed=7) != data.make_examples(300, "train", seed=8)


def test_splits_disjoint():
    train = {(e.kind, e.operands) for s in range(3) for e in data.make_examples(N, "train", seed=s)}
    held = {
        (e.kind, e.operands) for s in range(3) for e in data.make_examples(N, "heldout", seed=s)
    }
    assert train and held and not train & held
    assert all(data.split_of(*k) == "heldout" for k in held)


def test_levels_and_uniqueness():
    exs = data.make_examples(600, "heldout", seed=0)
    assert [e.level for e in exs[:6]] == [1, 2, 3, 1, 2, 3]
    assert len({(e.kind, e.operands) for e in exs}) == len(exs)
    kinds = {lv: {e.kind for e in exs if e.level == lv} for lv in data.LEVELS}
    assert kinds == {1: {"add2", "sub2"}, 2: {"add3", "sub3", "mul"}, 3: {"add4", "sub4", "word"}}
    assert all(e.answer >= 0 for e in exs)


def test_render_chat():
    ex = data.make_examples(1, "train", seed=0)[0]
    on, off = data.render_chat(ex, thinking=True), data.render_chat(ex, thinking=False)
    assert [m["role"] for m in on] == ["user", "assistant"] and on[0] == off[0]
    assert on[0]["content"] == ex.question
    assert on[1]["content"] == f"<think>\n{ex.trace}\n</think>\n\nThe answer is {ex.answer}."
    assert off[1]["content"] == f"<think>\n\n</think>\n\nThe answer is {ex.answer}."


def test_extract_answer():
    ex = data.make_examples(20, "train", seed=1)
    for e in ex:
        for thinking in (True, False):
            assert data.extract_answer(data.render_chat(e, thinking)[1]["content"]) == e.answer
    assert data.extract_answer("The answer is 1234.") == 1234
    assert data.extract_answer("<think>\nso 1 + 2 = 3\n</think>\n\nThe answer is 3.") == 3
    assert data.extract_answer("<think>\nThe answer is 3.") is None  # think never closed
    assert data.extract_answer("I think it is 3") is None
    assert data.extract_answer("The answer is 3. The answer is 4.") == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.make_examples(1, "test")
    with pytest.raises(ValueError, match="levels"):
        data.make_examples(1, levels=(4,))
