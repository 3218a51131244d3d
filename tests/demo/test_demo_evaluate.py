"""The held-out evaluator, driven by stub models whose accuracy is known."""

import math

import pytest

from qnext_jax.demo import data, evaluate

N = 20


def _oracle(skip_level_without_thinking=None):
    """A stub model: answers held-out questions right, except one level without thinking."""
    by_question = {ex.question: ex for ex in evaluate.heldout_set(N)}
    calls = []

    def generate_fn(conversations, enable_thinking, max_tokens):
        calls.append((len(conversations), enable_thinking, max_tokens))
        out = []
        for conv in conversations:
            assert [m["role"] for m in conv] == ["user"]
            ex = by_question[conv[0]["content"]]
            text = data.assistant_content(ex, enable_thinking)
            if not enable_thinking:
                text = text.removeprefix("<think>\n\n</think>\n\n")  # prompt already holds it
                if ex.level == skip_level_without_thinking:
                    text = "The answer is -1."
            out.append(text)
        return out

    return generate_fn, calls


def test_heldout_set_fixed():
    a, b = evaluate.heldout_set(N), evaluate.heldout_set(N)
    assert a == b and len(a) == 3 * N
    assert [sum(e.level == lv for e in a) for lv in data.LEVELS] == [N, N, N]
    assert all(data.split_of(e.kind, e.operands) == "heldout" for e in a)


def test_perfect_model():
    fn, calls = _oracle()
    res = evaluate.evaluate(fn, n_per_level=N, max_tokens=99, batch_size=16)
    for mode in ("thinking_on", "thinking_off"):
        assert res[mode] == {1: 1.0, 2: 1.0, 3: 1.0, "all": 1.0}
        assert res["failures"][mode] == []
    assert [c[0] for c in calls] == [16, 16, 16, 12] * 2
    assert {c[1] for c in calls[:4]} == {True} and {c[1] for c in calls[4:]} == {False}
    assert {c[2] for c in calls} == {99}


def test_per_level_accounting():
    fn, _ = _oracle(skip_level_without_thinking=3)
    res = evaluate.evaluate(fn, n_per_level=N)
    assert res["thinking_on"]["all"] == 1.0
    assert res["thinking_off"][3] == 0.0 and res["thinking_off"][1] == 1.0
    assert math.isclose(res["thinking_off"]["all"], 2 / 3)
    assert len(res["failures"]["thinking_off"]) == 5
    table = evaluate.format_table(res)
    assert "| thinking off | 1.000 | 1.000 | 0.000 | 0.667 |" in table


def test_wrong_output_count():
    with pytest.raises(ValueError, match="returned"):
        evaluate.evaluate(lambda convs, thinking, n: [], n_per_level=2)
