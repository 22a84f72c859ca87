"""What `opd up` starts for a run's tasks: teacher processes per task deployment, workers per task.

The tasks file schema itself is services/common/tasks.py; this module only turns it into processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.config import ConfigError
from services.common.tasks import TaskConfig, find_task
from services.teacher.config import TeacherConfig
from services.worker.config import WorkerConfig


@dataclass(frozen=True)
class TeacherPlan:
    """One teacher process of `opd up`: its task ("" = no tasks), child name, and environment overrides."""

    task: str
    child_name: str
    env: dict[str, str]


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def teacher_plans(tasks: Sequence[TaskConfig], replicas: int) -> list[TeacherPlan]:
    """The teacher processes of a run: `replicas` of [teacher] without tasks, else per task its own
    deployment (`teacher_model` and `teacher_service` over [teacher], its `teacher_replicas` or `replicas`)."""
    if not tasks:
        return [TeacherPlan("", f"teacher-{i}", {}) for i in range(replicas)]
    plans = []
    for t in tasks:
        overrides = dict(t.teacher_service)
        if t.teacher_model:
            overrides["model"] = t.teacher_model
        env = {f"OPD_TEACHER_{k.upper()}": _env_value(v) for k, v in overrides.items()}
        plans += [
            TeacherPlan(t.name, f"teacher-{t.name}-{i}", env) for i in range(t.teacher_replicas or replicas)
        ]
    return plans


def task_workers(tasks: Sequence[TaskConfig], task: str, default: int) -> int:
    """Worker processes of a task: its [tasks.<name>.worker] num_workers, else `default` ([up]'s)."""
    return int(find_task(tasks, task).worker.get("num_workers", default)) if task else default


def check_task_overrides(tasks: Sequence[TaskConfig]) -> None:
    """Every [tasks.<name>.worker] / [tasks.<name>.teacher_service] key must be a WorkerConfig /
    TeacherConfig field (caught when the file is read, not in a child's log)."""
    workers = {f.name for f in dataclasses.fields(WorkerConfig)}
    teachers = {f.name for f in dataclasses.fields(TeacherConfig)}
    for t in tasks:
        for table, values, known in (
            ("worker", t.worker, workers),
            ("teacher_service", t.teacher_service, teachers),
        ):
            unknown = sorted(set(values) - known)
            if unknown:
                raise ConfigError(f"tasks.{t.name}.{table}: unknown keys {unknown}")
