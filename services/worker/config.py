"""Configuration of a rollout worker (`opd rollout work`): one typed class; flags, env vars and TOML derive
from it. With tasks, a worker of task T takes `[tasks.T]` over the `[worker]` section (docs/tasks.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from services.common.config import ConfigBase, ConfigError, Layers, load, opt
from services.common.experience import SUPPORTS
from services.common.tasks import find_task, load_tasks
from services.common.token_aliases import parse_aliases


@dataclass
class WorkerConfig(ConfigBase):
    """Rollout worker: samples from the rollout service, scores with the teacher, appends to Redis."""

    SECTION: ClassVar[str] = "worker"
    ENV_PREFIX: ClassVar[str] = "OPD_WORKER_"

    run: str = opt("default", "run name; records go to the stream opd:<run>:experience")
    redis_url: str = opt("redis://127.0.0.1:6379/0", "Redis URL")
    rollout_url: str = opt("http://127.0.0.1:8000", "rollout service base URL")
    rollout_token: str | None = opt(None, "bearer token for the rollout service, if it requires one")
    rollout_tls_ca_file: str | None = opt(None, "CA bundle for an https:// rollout_url (None = system CAs)")
    teacher: list[str] = opt(
        ["127.0.0.1:50051"], "teacher replicas: host:port list (comma-separated) or dns:///"
    )
    teacher_token: str | None = opt(None, "bearer token for the teacher service, if it requires one")
    teacher_tls_ca_file: str | None = opt(None, "CA bundle for TLS to the teacher (None = plaintext)")
    prompts: str = opt("", "prompt file, .jsonl or .parquet (`prompt` or `messages`, optional `answer`)")
    tokenizer: str | None = opt(
        None, "tokenizer (hub id or path) for `messages` prompts and verifiers; None = none"
    )
    worker_index: int = opt(0, "this worker's shard: prompt rows r with r mod num_workers == worker_index")
    num_workers: int = opt(1, "number of workers sharing the prompt file")
    group_size: int = opt(4, "samples per prompt (G)")
    max_new_tokens: int = opt(256, "completion length limit")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(0.9, "nucleus sampling: smallest set of tokens with mass >= top_p")
    top_k: int = opt(32, "teacher top-K per position (and behaviour top-k for the student_topk support)")
    support: str = opt("teacher_topk", f"support variant, one of {SUPPORTS}")
    max_backlog: int = opt(256, "wait while the stream holds this many entries")
    concurrency: int = opt(
        4,
        "prompt tasks with max_tokens_in_flight 0: concurrency x group_size samples in flight (a finished "
        "sample's slot goes to the next prompt's); environment tasks: prompts (whole groups) in flight",
    )
    max_tokens_in_flight: int = opt(
        0,
        "bound on the samples in flight, each counting its prompt + max_new_tokens tokens (0 = the sample "
        "bound concurrency x group_size); environment tasks keep the concurrency bound",
    )
    max_records: int = opt(0, "stop after writing this many records (0 = no limit)")
    epochs: int = opt(0, "passes over the prompt shard (0 = forever)")
    verifier: str | None = opt(
        None, "reward function: exact_match, toy_arith (needs `tokenizer`); None = none"
    )
    seed: int = opt(0, "base of the per-prompt sampling seeds (a function of seed, row and epoch)")
    shuffle_prompts: bool = opt(
        True, "visit the shard in a new order every epoch, drawn from (seed, worker_index, epoch)"
    )
    metrics_port: int = opt(0, "Prometheus metrics port (0 = off)")
    task: str = opt("", "task tag stored in every record; records go to opd:<run>:experience:<task> then")
    env: str = opt("", "environment task: multi-turn episodes instead of prompts (services/worker/envs)")
    env_options: dict[str, Any] = opt({}, "environment options (TOML table), passed to make_env")
    max_turns: int = opt(0, "environment task: turn limit of an episode")
    env_seeds: int = opt(100_000, "environment task: episodes per epoch, env seeds 0..N-1 sharded by worker")
    max_context_tokens: int = opt(0, "environment task: end an episode before it can outgrow this (0 = off)")
    retry_timeout_s: float = opt(
        300.0, "retry a failing rollout/teacher call for this long after it first fails"
    )
    rollout_timeout_s: float = opt(
        3600.0,
        "HTTP timeout of one /v1/generate call: one sample (G for an environment task) of up to max_new_tokens (15,360 tokens at ~10 "
        "tokens/s per sequence is ~26 min); the server stops a generation whose client went away",
    )
    rollout_resends: int = opt(
        1, "times the rollout client itself resends a generate that lost its connection"
    )
    teacher_timeout_s: float = opt(
        600.0,
        "gRPC deadline of one teacher Score call (one sequence, G for an environment task, of up to 16K)",
    )
    log_interval_s: float = opt(10.0, "seconds between progress lines")
    token_aliases: list[Any] = opt(
        [], "special-token aliases [[student, teacher], ...] (docs/aliases.md); flag/env: JSON"
    )
    teacher_tokenizer: str | None = opt(None, "teacher tokenizer, for token_aliases given as strings")
    allow_vocab_mismatch: bool = opt(
        False,
        "start although the student and teacher tokenizer hashes differ beyond the aliased ids "
        "(services/worker/vocab_check.py; for vocabularies aliased on purpose)",
    )

    def __post_init__(self) -> None:
        if not self.run or ":" in self.run:
            raise ConfigError(f"run: {self.run!r} must be non-empty without ':'")
        if bool(self.prompts) == bool(self.env):
            raise ConfigError("prompts/env: give exactly one (a .jsonl or .parquet prompt file, or an env)")
        if self.env and (self.max_turns < 1 or self.env_seeds < 1 or self.verifier or not self.tokenizer):
            raise ConfigError(
                f"env {self.env!r}: needs max_turns >= 1 (got {self.max_turns}), env_seeds >= 1 "
                f"(got {self.env_seeds}), a tokenizer (got {self.tokenizer!r}) and no verifier (success is "
                "the environment's reward)"
            )
        if not self.teacher:
            raise ConfigError("teacher: at least one address is required")
        if self.num_workers < 1 or not 0 <= self.worker_index < self.num_workers:
            raise ConfigError(
                f"worker_index: {self.worker_index} outside [0, num_workers={self.num_workers})"
            )
        for name in ("group_size", "max_new_tokens", "top_k", "max_backlog", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} < 1")
        for name in ("max_records", "epochs", "max_tokens_in_flight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: {getattr(self, name)} < 0")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: {self.temperature} <= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: {self.top_p} not in (0, 1]")
        if self.support not in SUPPORTS:
            raise ConfigError(f"support: {self.support!r} is not one of {SUPPORTS}")
        if self.verifier and not self.tokenizer:
            raise ConfigError(f"verifier: {self.verifier!r} needs `tokenizer` to decode completions")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: {self.metrics_port} is outside [0, 65535]")
        if self.rollout_timeout_s <= 0 or self.teacher_timeout_s <= 0 or self.rollout_resends < 0:
            raise ConfigError(
                f"rollout_timeout_s/teacher_timeout_s/rollout_resends: {self.rollout_timeout_s}/"
                f"{self.teacher_timeout_s}/{self.rollout_resends}"
            )
        if self.retry_timeout_s < 0 or self.log_interval_s <= 0:
            raise ConfigError(f"retry_timeout_s/log_interval_s: {self.retry_timeout_s}/{self.log_interval_s}")
        parse_aliases(self.token_aliases)


def task_overlay(layers: Layers) -> dict[str, Any]:
    """A worker of task T (`task` from the flags, the environment or [worker]) takes T's values from
    `[tasks.T]` over the [worker] section; a file without tasks adds nothing."""
    tasks = load_tasks(layers.path)
    if not tasks:
        return {}
    name = (
        layers.cli.get("task")
        or layers.env.get(WorkerConfig.ENV_PREFIX + "TASK")
        or layers.toml.get("task", "")
    )
    if not name:
        raise ConfigError(f"task: the config has tasks {[t.name for t in tasks]}; name this worker's")
    return find_task(tasks, name).worker_values()


def load_config(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> WorkerConfig:
    return load(WorkerConfig, argv, task_overlay, env=env, prog="opd rollout work")
