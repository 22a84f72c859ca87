"""Verifiers: `(completion_text, answer) -> reward` functions, the one registry both the worker (rewards) and
the trainer's eval (pass@1) look names up in.

    exact_match  the completion's final answer (boxed / `answer:` / last line) equals the answer
    toy_arith    the synthetic addition task: the last line is `=<digits>` and the digits equal the answer
    math         `math-verify` judges the answers equal (optional dependency, checked when looked up)

Both judge `completion_text`: the completion up to its first special token, decoded. Rewards are logged and
stored with the experience (for evaluation and reward-based baselines); the distillation loss does not need
them.

Lenient and strict scores. `completion_text` cuts at the first special token of either model, so a student
that ends its answer with the TEACHER's end marker still gets its answer judged, although served alone it
would run on past that marker (it stops only at its own). The strict score also asks that the completion end
with the student's own end marker (`ends_with_own_marker`; 0 otherwise): the pass@1 a deployed student would get. Evals
report the strict score as the headline and the lenient one beside it.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

Verifier = Callable[[str, str], float]

_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_ANSWER_LINE = re.compile(r"(?:####|answer\s*(?:is|:))\s*(.+)", re.IGNORECASE)


def final_answer(text: str) -> str:
    """The answer a completion commits to: the last `\\boxed{...}`, else what follows the last `####` or
    `answer:` / `answer is`, else the last non-empty line; stripped of spaces, `$` and a trailing period."""
    boxed = _BOXED.findall(text)
    if boxed:
        found = boxed[-1]
    else:
        marked = _ANSWER_LINE.findall(text)
        if marked:
            found = marked[-1]
        else:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            found = lines[-1] if lines else ""
    return found.strip().strip("$").strip().rstrip(".").strip()


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:  # "3.0" and "3" are the same number; "1e3" and "1000" too
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return False


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals `answer` (as text, or as numbers), else 0.0."""
    return 1.0 if answer.strip() and _same(final_answer(completion), answer.strip()) else 0.0


_TOY_ANSWER_LINE = re.compile(r"=([0-9]+)")  # ASCII digits only (\d also matches e.g. "１")


def toy_arith_answer(completion: str, end_markers: Sequence[str] = ()) -> str | None:
    """The toy addition task's final answer, or None when the completion has no well-formed answer line.

    The completion ends at its first end marker (any of `end_markers`); trailing whitespace is ignored; the
    last line must be exactly `=` followed by ASCII digits.
    """
    if not isinstance(completion, str):
        return None
    cut = len(completion)
    for marker in end_markers:
        i = completion.find(marker)
        if i != -1:
            cut = min(cut, i)
    last_line = completion[:cut].rstrip().rsplit("\n", 1)[-1]
    m = _TOY_ANSWER_LINE.fullmatch(last_line)
    return m.group(1) if m else None


def toy_arith(completion: str, answer: str, end_markers: Sequence[str] = ()) -> float:
    """1.0 iff the toy completion's final answer (cut at `end_markers`) equals `answer` exactly (as a digit
    string)."""
    got = toy_arith_answer(completion, end_markers)
    return 1.0 if got is not None and got == str(answer).strip() else 0.0


def math_verify(completion: str, answer: str) -> float:
    """1.0 when `math-verify` judges the completion's answer equal to `answer` (optional dependency)."""
    from math_verify import parse, verify

    return 1.0 if verify(parse(answer), parse(completion)) else 0.0


def _math() -> Verifier:
    if importlib.util.find_spec("math_verify") is None:  # fail when looked up (at start), not at first use
        raise ValueError("verifier 'math' needs the `math-verify` package (pip install math-verify)")
    return math_verify


_VERIFIERS: dict[str, Callable[[], Verifier]] = {
    "exact_match": lambda: exact_match,
    "toy_arith": lambda: toy_arith,
    "math": _math,
}
VERIFIERS = tuple(_VERIFIERS)


def get_verifier(name: str | None) -> Verifier | None:
    """The verifier called `name`; None for no name. Unknown names (or a missing optional dependency) raise
    ValueError with the reason."""
    if not name:
        return None
    if name not in _VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(_VERIFIERS)}")
    return _VERIFIERS[name]()


def completion_text(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """The text a verifier judges: the completion up to its first special token (an end marker of either
    model, a pad), decoded. Cutting there, not skipping specials, keeps text after a foreign end marker out."""
    special = set(tokenizer.all_special_ids)
    end = next((i for i, t in enumerate(token_ids) if t in special), len(token_ids))
    return tokenizer.decode(token_ids[:end])


def own_end_ids(tokenizer: Any, extra: Sequence[int] = ()) -> frozenset[int]:
    """The student's own end markers: its tokenizer's eos id plus `extra` (configured end ids, e.g. a
    generation config's further eos ids)."""
    ids = {int(i) for i in extra}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the student tokenizer has no eos token and no end ids were configured")
    return frozenset(ids)


def ends_with_own_marker(tokenizer: Any, token_ids: Sequence[int], end_ids: Collection[int]) -> bool:
    """True iff the completion's first special token is one of `end_ids` (the student's own end markers):
    the point where `completion_text` cuts is where the student, served alone, would stop. A completion
    that first writes another special token (the teacher's end marker, a pad) or none (cut by the length
    limit) is False."""
    special = set(tokenizer.all_special_ids) | set(end_ids)
    first = next((t for t in token_ids if t in special), None)
    return first is not None and first in end_ids


class SampleScores(NamedTuple):
    """One prompt's completions, scored: `lenient` (the verifier on the text up to the first special token),
    `strict` (the lenient score where the sample ends with the student's own end marker, else 0: the
    headline pass@1 and the worker's reward) and `own` (whether each ends with that marker)."""

    lenient: list[float]
    strict: list[float]
    own: list[bool]


def score_samples(
    tokenizer: Any,
    samples: Sequence[Sequence[int]],
    answer: str,
    verifier: Verifier,
    end_ids: Collection[int],
) -> SampleScores:
    """Lenient and strict scores, and own-end-marker flags, of one prompt's completions (token ids)."""
    lenient = [float(verifier(completion_text(tokenizer, ids), answer)) for ids in samples]
    own = [ends_with_own_marker(tokenizer, ids, end_ids) for ids in samples]
    strict = [score if ended else 0.0 for score, ended in zip(lenient, own, strict=True)]
    return SampleScores(lenient, strict, own)
