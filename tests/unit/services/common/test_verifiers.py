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


def test_strict_needs_the_students_own_end_marker():
    """A right answer closed with the TEACHER's end marker passes the lenient check (the text is cut
    there) but not the strict one: the student, served alone, would run on past it."""
    from experiments.tiny_models import STUDENT_EOS, TEACHER_EOS
    from experiments.toy.task import build_tokenizer
    from services.common.verifiers import completion_text, ends_with_own_marker, own_end_ids, toy_arith

    tok = build_tokenizer(STUDENT_EOS)
    own_id, teacher_id = tok.convert_tokens_to_ids([STUDENT_EOS, TEACHER_EOS])
    body = tok("=12", add_special_tokens=False)["input_ids"]
    end_ids = own_end_ids(tok)
    assert end_ids == {own_id}
    cases = {
        "own marker": (body + [own_id], True),
        "teacher marker, then runs on": (
            body + [teacher_id] + tok("\n=7", add_special_tokens=False)["input_ids"],
            False,
        ),
        "teacher marker, then own": (body + [teacher_id, own_id], False),
        "no marker (length cap)": (body, False),
        "pad first": (body + [tok.pad_token_id, own_id], False),
    }
    for name, (ids, strict_ok) in cases.items():
        assert toy_arith(completion_text(tok, ids), "12") == 1.0, name  # lenient: every case is right
        assert ends_with_own_marker(tok, ids, end_ids) is strict_ok, name
    # Configured end ids count as the student's own markers too.
    assert ends_with_own_marker(tok, body + [teacher_id], own_end_ids(tok, [teacher_id]))


def test_own_end_ids_needs_an_end_marker():
    class NoEos:
        eos_token_id = None

    from services.common.verifiers import own_end_ids

    with pytest.raises(ValueError, match="no eos token"):
        own_end_ids(NoEos())
    assert own_end_ids(NoEos(), [7]) == {7}
