"""trainer.eval without a server: verifier resolution and the optional math-verify dependency.
(pass@1 through a real rollout service: tests/integration/test_trainer_push.py.)"""

from __future__ import annotations

import importlib.util

import pytest

from trainer.eval import resolve_verifier


def test_worker_verifiers_resolve():
    assert resolve_verifier("exact_match")("so the answer is 42", "42") == 1.0
    assert resolve_verifier("exact_match")("41", "42") == 0.0
    with pytest.raises(ValueError, match="unknown verifier"):
        resolve_verifier("nope")


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is not None, reason="math-verify is installed")
def test_math_verifier_says_what_to_install():
    with pytest.raises(RuntimeError, match="pip install math-verify"):
        resolve_verifier("math")


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="math-verify not installed")
def test_math_verifier_compares_answers():
    verify = resolve_verifier("math")
    assert verify("The answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert verify("The answer is $3$", "0.5") == 0.0
