"""Shared test fixtures."""

import pytest


@pytest.fixture(scope="session")
def tiny_toy_budget() -> dict:
    """A ToyConfig budget that exercises `opd toy prepare` end to end in seconds (models learn nothing)."""
    return dict(
        n_train=60,
        n_eval=12,
        hidden_size=64,
        num_heads=2,
        num_layers=1,
        intermediate_size=128,
        batch_size=8,
        teacher_steps=6,
        student_steps=4,
        warmup_steps=2,
        eval_max_new_tokens=48,
        threads=1,
    )
