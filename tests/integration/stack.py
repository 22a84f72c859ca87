"""The loopback service stack several integration tests share: tiny random Llamas (student seed 0, the i-th
teacher seed i + 1, one character vocabulary), a real redis-server, one hf teacher gRPC server per teacher,
the hf rollout HTTP service (ready before the stack is handed out) and clients of both services."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd_teacher_client import TeacherClient

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common.redis_server import EmbeddedRedis
from services.rollout.app import build_app
from services.rollout.client import RolloutClient
from services.rollout.config import RolloutConfig
from services.rollout.server import running_server
from services.teacher.config import TeacherConfig
from services.teacher.server import run_server


def write_prompts(path: Path, pairs: Sequence[tuple[str, str]]) -> Path:
    """A prompt file: one {"prompt", "answer"} JSON object a line."""
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    return path


@dataclass
class LoopbackStack:
    root: Path
    tok: Any  # the shared character tokenizer
    student: Path  # model dir
    teachers: dict[str, Path]  # teacher name -> model dir
    handles: dict[str, Any]  # teacher name -> running teacher server (.address, .metrics)
    teacher_clients: dict[str, TeacherClient]  # teacher name -> client of that server alone
    prompts: Path | None
    redis: EmbeddedRedis
    rollout_url: str
    rollout: RolloutClient

    @property
    def redis_url(self) -> str:
        return self.redis.url

    # The first teacher, for the stacks that have one.
    @property
    def teacher(self) -> Path:
        return next(iter(self.teachers.values()))

    @property
    def handle(self) -> Any:
        return next(iter(self.handles.values()))

    @property
    def teacher_address(self) -> str:
        return self.handle.address

    @property
    def teacher_client(self) -> TeacherClient:
        return next(iter(self.teacher_clients.values()))


@contextmanager
def loopback_stack(
    root: Path,
    prompts: Sequence[tuple[str, str]] = (),
    teachers: dict[str, dict[str, Any]] | None = None,
) -> Iterator[LoopbackStack]:
    """Build the models under `root`, start every service, yield the stack, stop everything.

    `teachers`: teacher name (its model dir under `root`) -> extra TeacherConfig fields (default: one
    teacher named "teacher"). `prompts`: (prompt, answer) pairs written to root/prompts.jsonl (none: no file).
    """
    teachers = {"teacher": {}} if teachers is None else teachers
    tok = build_char_tokenizer()
    student = make_tiny_llama(root / "student", seed=0, tokenizer=tok)
    models = {
        name: make_tiny_llama(root / name, seed=i + 1, tokenizer=tok) for i, name in enumerate(teachers)
    }
    prompt_file = write_prompts(root / "prompts.jsonl", prompts) if prompts else None
    with ExitStack() as stack:
        redis_server = stack.enter_context(EmbeddedRedis())
        handles = {
            name: stack.enter_context(
                run_server(TeacherConfig(model=str(models[name]), backend="hf", port=0, **extra))
            )
            for name, extra in teachers.items()
        }
        rollout_url = stack.enter_context(
            running_server(
                build_app(RolloutConfig(model=str(student), backend="hf", port=0, insecure_no_token=True))
            )
        )
        rollout = stack.enter_context(RolloutClient(rollout_url))
        clients = {name: stack.enter_context(TeacherClient([h.address])) for name, h in handles.items()}
        rollout.wait_ready(60)
        yield LoopbackStack(
            root=root,
            tok=tok,
            student=student,
            teachers=models,
            handles=handles,
            teacher_clients=clients,
            prompts=prompt_file,
            redis=redis_server,
            rollout_url=rollout_url,
            rollout=rollout,
        )
