"""The environment interface of multi-turn episodes (services/worker/episode.py drives it).

An environment is a text game: `reset(seed)` starts an episode and returns the first observation (which
states the goal); `step(action)` applies one action given as free text and returns the next observation,
the reward of that step, whether the episode is over and whether it ended in success. An environment never
raises on what the model writes: an illegal or malformed action gets an observation that says so (and the
episode goes on), exactly as a text game answers a player's typo.

One environment object runs one episode at a time; the episode runner makes one per episode of a group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class StepResult:
    observation: str  # what the environment answers (the next turn's context)
    reward: float  # reward of this step (the toy game: 1.0 on the step that reaches the goal, else 0.0)
    done: bool  # the episode is over (goal reached, or the game ended it); further steps are no-ops
    success: bool  # the goal was reached (the eval metric)


@runtime_checkable
class Environment(Protocol):
    def reset(self, seed: int) -> str:
        """Start a new episode, deterministic from `seed`; the first observation (it states the goal)."""
        ...

    def step(self, action: str) -> StepResult:
        """Apply one action written as text; an illegal or malformed action -> an observation saying so."""
        ...
