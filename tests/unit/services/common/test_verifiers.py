"""Verifiers: final-answer extraction, exact match, lookup by name."""

import importlib.util

import pytest

from services.common.verifiers import exact_match, final_answer, get_verifier


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so we get \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("reasoning...\n#### 17", "17"),
        ("The answer is 9.", "9"),
        ("Answer: $x+1$", "x+1"),
        ("3+4=\n7\n\n", "7"),
        ("", ""),
    ],
)
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_exact_match():
    assert exact_match("2+3=5\nAnswer: 5", "5") == 1.0
    assert exact_match("\\boxed{5.0}", "5") == 1.0  # same number
    assert exact_match("\\boxed{1,000}", "1000") == 1.0
    assert exact_match("Answer: 6", "5") == 0.0
    assert exact_match("the answer is 55", "5") == 0.0  # no substring matches
    assert exact_match("anything", "") == 0.0  # no reference answer: no reward
    assert exact_match("\\boxed{abc}", " abc ") == 1.0


def test_get_verifier():
    assert get_verifier(None) is None
    assert get_verifier("") is None
    assert get_verifier("exact_match") is exact_match
    with pytest.raises(ValueError, match="unknown verifier 'nope'.*exact_match"):
        get_verifier("nope")


def test_toy_arith_is_imported_lazily():
    if importlib.util.find_spec("experiments.toy.task") is None:
        with pytest.raises(ValueError, match="toy_arith.*experiments.toy.task"):
            get_verifier("toy_arith")
    else:
        from experiments.toy.task import Problem

        verify = get_verifier("toy_arith")
        problem = Problem(123, 989)
        assert verify(problem.completion, problem.answer) == 1.0
        assert verify(problem.completion, "1113") == 0.0
        assert verify("no answer line", problem.answer) == 0.0
