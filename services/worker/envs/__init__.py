"""Text environments for multi-turn episodes, by name (the worker's `env` setting).

rooms     the built-in toy household game (services/worker/envs/rooms.py), no downloads
alfworld  ALFWorld's TextWorld games (services/worker/envs/alfworld.py), needs `pip install alfworld`
          and its data; the package is imported only when an environment is made
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.worker.envs.base import Environment, StepResult


def _rooms(**options: Any) -> Environment:
    from services.worker.envs.rooms import RoomsEnv

    return RoomsEnv(**options)


def _alfworld(**options: Any) -> Environment:
    from services.worker.envs.alfworld import AlfworldEnv

    return AlfworldEnv(**options)


ENVIRONMENTS: dict[str, Callable[..., Environment]] = {"rooms": _rooms, "alfworld": _alfworld}


def make_env(name: str, **options: Any) -> Environment:
    """A new environment `name` built with `options` (the environment's constructor arguments)."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; known: {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[name](**options)


__all__ = ["ENVIRONMENTS", "Environment", "StepResult", "make_env"]
