"""The verifier registry the worker and the trainer's eval share, and the optional math-verify dependency.
(pass@1 through a real rollout service: tests/integration/test_trainer_push.py.)"""

from __future__ import annotations

import importlib.util

import pytest

from services.common.verifiers import VERIFIERS, get_verifier, toy_arith


def test_worker_verifiers_resolve():
    assert get_verifier("exact_match")("so the answer is 42", "42") == 1.0
    assert get_verifier("exact_match")("41", "42") == 0.0
    with pytest.raises(ValueError, match="unknown verifier"):
        get_verifier("nope")


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is not None, reason="math-verify is installed")
def test_math_verifier_says_what_to_install():
    with pytest.raises(ValueError, match="pip install math-verify"):
        get_verifier("math")


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="math-verify not installed")
def test_math_verifier_compares_answers():
    verify = get_verifier("math")
    assert verify("The answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert verify("The answer is $3$", "0.5") == 0.0


def test_registry_names_and_toy_arith():
    assert set(VERIFIERS) == {"exact_match", "toy_arith", "math"}
    assert get_verifier(None) is None
    assert toy_arith("3+9+0=12\n=1112", "1112") == 1.0
    assert toy_arith("=1112\nmore", "1112") == 0.0  # the answer must be the last line
    assert toy_arith("=１１１２", "1112") == 0.0  # ASCII digits only
