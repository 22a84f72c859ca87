"""Tasks: several skills distilled into one student, each with its own data, teacher and success signal.

A config file lists its tasks as `[tasks.<name>]` tables (in schedule order); every process reads them
from the same file (docs/tasks.md):

    [tasks.math]                          # a prompt task
    prompts = "data/math_train.jsonl"     # the worker's prompt file for this task
    verifier = "toy_arith"                # reward of each sample (optional)
    teacher = ["math-teacher:50051"]      # this task's teacher deployment (addresses or dns:///)
    teacher_model = "models/math_teacher" # `opd up`: the model this task's teacher replicas serve
    eval_file = "data/math_eval.jsonl"    # trainer eval: pass@1 with eval_verifier
    weight = 1.0                          # share of the schedule (task_schedule = "mix")

    [tasks.rooms]                         # an environment task (multi-turn episodes)
    env = "rooms"                         # services.worker.envs.make_env(env, **env_options)
    env_options = {}
    max_turns = 8
    teacher_model = "models/agent_teacher"
    eval_episodes = 32                    # trainer eval: greedy success rate on held-out env seeds
    [tasks.rooms.worker]                  # overrides of [worker] for this task's workers
    max_new_tokens = 16

One Redis stream per task, `opd:<run>:experience:<task>` (services/common/redis_keys.py): each task's
workers block on their own backlog bound, so a fast task cannot fill a shared stream with entries the
trainer holds back while it waits for the slow task's batch (which would block the slow task's workers).
Without tasks everything is as before: one stream `opd:<run>:experience`.

The trainer's schedule is `TaskSchedule` in trainer/schedule.py: "alternate" (round-robin in file order, the paper's) or
"mix" (smooth weighted round-robin: task i gets weight_i / sum(weights) of the batches, interleaved as
evenly as the weights allow; deterministic, so a resumed run continues the same sequence).
"""

from __future__ import annotations

import re
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.config import ConfigError, _coerce, opt

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
# Held-out env seeds for eval start here; training episodes use seeds 0 .. worker.env_seeds - 1.
EVAL_SEED_BASE = 1_000_000
# Worker keys a task owns: set in the task table itself, not in its [tasks.<name>.worker] overrides.
TASK_OWNED_WORKER_KEYS = ("task", "prompts", "env", "env_options", "max_turns", "verifier", "teacher")


@dataclass
class TaskConfig:
    """One task: where its rollouts come from, who scores them, how it is judged, and its share."""

    name: str = opt("", "task name: [a-z0-9_-], also the suffix of its Redis stream")
    weight: float = opt(1.0, "share of the schedule when trainer.task_schedule = 'mix'")
    prompts: str = opt("", "prompt task: the prompt file (JSONL/Parquet), as worker.prompts")
    verifier: str | None = opt(None, "prompt task: reward of each sample (worker verifier), None = none")
    env: str = opt("", "environment task: name in services.worker.envs.ENVIRONMENTS")
    env_options: dict[str, Any] = opt({}, "environment task: keyword options of make_env")
    max_turns: int = opt(0, "environment task: turn limit of an episode")
    teacher: list[str] = opt([], "this task's teacher replicas (host:port list or dns:///); opd up fills it")
    teacher_model: str = opt("", "opd up: the model this task's teacher serves (default: [teacher] model)")
    teacher_replicas: int = opt(0, "opd up: teacher processes for this task (0 = [up] teacher_replicas)")
    eval_file: str = opt("", "prompt task: held-out prompts of the trainer's eval (empty = no eval)")
    eval_verifier: str = opt("", "prompt task: eval answer checker (empty = verifier, else exact_match)")
    eval_episodes: int = opt(0, "environment task: held-out episodes of the trainer's eval (0 = no eval)")
    eval_env_options: dict[str, Any] = opt({}, "environment task: env_options overrides for eval (a split)")
    worker: dict[str, Any] = opt({}, "overrides of the [worker] section for this task's workers")
    teacher_service: dict[str, Any] = opt({}, "opd up: overrides of the [teacher] section for its teachers")

    def __post_init__(self) -> None:
        where = f"tasks.{self.name}"
        if not NAME_RE.match(self.name):
            raise ConfigError(f"{where}: name {self.name!r} must match {NAME_RE.pattern}")
        if not self.weight > 0:
            raise ConfigError(f"{where}.weight: {self.weight} must be > 0")
        if bool(self.prompts) == bool(self.env):
            raise ConfigError(
                f"{where}: give exactly one of `prompts` (a prompt task) or `env` (an environment)"
            )
        if self.env:
            if self.max_turns < 1:
                raise ConfigError(f"{where}.max_turns: {self.max_turns} < 1 (required with env)")
            if self.verifier or self.eval_file:
                raise ConfigError(
                    f"{where}: verifier/eval_file are for prompt tasks; an environment's success is its reward"
                )
        elif self.max_turns or self.env_options or self.eval_episodes or self.eval_env_options:
            raise ConfigError(f"{where}: max_turns/env_options/eval_episodes/eval_env_options need `env`")
        if self.teacher_replicas < 0 or self.eval_episodes < 0:
            raise ConfigError(f"{where}: teacher_replicas/eval_episodes must be >= 0")
        owned = sorted(set(self.worker) & set(TASK_OWNED_WORKER_KEYS))
        if owned:
            raise ConfigError(f"{where}.worker: {owned} are set in the task table itself, not its overrides")

    @property
    def is_env(self) -> bool:
        return bool(self.env)

    @property
    def resolved_eval_verifier(self) -> str:
        return self.eval_verifier or self.verifier or "exact_match"

    def eval_seeds(self) -> list[int]:
        """Held-out environment seeds, disjoint from every training seed (those are < EVAL_SEED_BASE)."""
        return [EVAL_SEED_BASE + i for i in range(self.eval_episodes)]

    def worker_values(self) -> dict[str, Any]:
        """What this task sets in a worker's config: its own keys, then its [worker] overrides."""
        values: dict[str, Any] = {"task": self.name, **self.worker}
        # The task decides the source: the other kind's keys from [worker] are cleared.
        if self.prompts:
            values.update(prompts=self.prompts, env="", env_options={}, max_turns=0)
            if self.verifier:
                values["verifier"] = self.verifier
        else:
            values.update(
                prompts="",
                verifier=None,
                env=self.env,
                env_options=dict(self.env_options),
                max_turns=self.max_turns,
            )
        if self.teacher:
            values["teacher"] = list(self.teacher)
        return values


def parse_tasks(raw: Any, where: str = "tasks") -> list[TaskConfig]:
    """`[tasks.<name>]` tables (a dict of dicts, file order kept) -> validated TaskConfigs."""
    if not raw:
        return []
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"{where}: expected tables [tasks.<name>], got {raw!r}")
    hints = typing.get_type_hints(TaskConfig)
    out = []
    for name, table in raw.items():
        unknown = sorted(set(table) - set(hints) - {"name"})
        if unknown:
            raise ConfigError(f"{where}.{name}: unknown keys {unknown}; known: {sorted(hints)}")
        if "name" in table and table["name"] != name:
            raise ConfigError(f"{where}.{name}: name {table['name']!r} differs from the table name")
        values = {k: _coerce(hints[k], v, f"{where}.{name}.{k}") for k, v in table.items() if k != "name"}
        out.append(TaskConfig(name=name, **values))
    return out


def load_tasks(path: str | Path | None) -> list[TaskConfig]:
    """The tasks of a TOML file (empty when it has none)."""
    if not path:
        return []
    with open(path, "rb") as fh:
        return parse_tasks(tomllib.load(fh).get("tasks"))


def find_task(tasks: Sequence[TaskConfig], name: str) -> TaskConfig:
    for t in tasks:
        if t.name == name:
            return t
    raise ConfigError(f"task {name!r} is not one of the configured tasks {[t.name for t in tasks]}")
