"""Verifiers: `(completion_text, answer) -> reward` functions, looked up by name from the worker config.

Rewards are logged and stored with the experience (for evaluation and reward-based baselines); the
distillation loss itself does not need them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

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


def _toy_arith() -> Verifier:
    # Lazy: the toy task lives in the trainer package, which a worker image need not import otherwise.
    try:
        from experiments.toy.task import verify
    except ImportError as e:
        raise ValueError(f"verifier 'toy_arith' needs experiments.toy.task.verify: {e}") from e
    return lambda completion, answer: float(verify(completion, answer))


_VERIFIERS: dict[str, Callable[[], Verifier]] = {
    "exact_match": lambda: exact_match,
    "toy_arith": _toy_arith,
}


def get_verifier(name: str | None) -> Verifier | None:
    """The verifier called `name`; None for no name. Unknown names raise ValueError listing the known."""
    if not name:
        return None
    if name not in _VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(_VERIFIERS)}")
    return _VERIFIERS[name]()
