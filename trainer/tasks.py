"""The trainer's side of tasks (services/common/tasks.py, docs/tasks.md): one stream per task with its
reader and restart recovery, acks on the right stream, per-task metrics and per-task eval.

Without tasks there is one "task" named "" whose stream is `opd:<run>:experience`, so the trainer loop
(trainer/train.py) has a single code path.

Exactly-once with several streams: entry ids are unique only within a stream, so every commit-log line
names its task (`"task"`), recovery compares a stream's pending entries with that task's committed ids only
(`Loaded.committed_entries_of`), and committed entries are acked and deleted on their own stream.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from services.common.experience import ExperienceRecord
from services.common.tasks import TaskConfig
from services.common.verifiers import get_verifier
from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.consumer import ExperienceReader, StreamConsumer

if TYPE_CHECKING:
    from services.worker.envs.base import Environment

log = logging.getLogger("trainer")


@dataclass
class TaskStream:
    """One task's experience stream ("" = the single-task stream) and its reader."""

    consumer: StreamConsumer
    reader: ExperienceReader


@dataclass
class TaskCounters:
    """Per task: batches trained and stale entries dropped (rebuilt from the commit log on resume)."""

    batches: dict[str, int] = field(default_factory=dict)
    stale: dict[str, int] = field(default_factory=dict)

    def add(self, task: str, batches: int, stale: int) -> None:
        self.batches[task] = self.batches.get(task, 0) + batches
        self.stale[task] = self.stale.get(task, 0) + stale

    @classmethod
    def from_commits(cls, commits: list[dict[str, Any]]) -> TaskCounters:
        out = cls()
        for line in commits:
            out.add(line.get("task", ""), int(bool(line["entries"])), len(line["stale_entries"]))
        return out


def task_names(cfg: TrainerConfig) -> list[str]:
    """The stream names in schedule order: the tasks, or [""] without tasks."""
    return [t.name for t in cfg.tasks] or [""]


def open_streams(
    client: redis.Redis,
    cfg: TrainerConfig,
    check: Callable[[ExperienceRecord], None],
    loaded: ckpt.Loaded | None,
    should_stop: Callable[[], bool],
) -> dict[str, TaskStream]:
    """A reader per task stream, each with the entries this consumer left pending there requeued (those its
    task's commit lines already hold are only acked)."""
    streams: dict[str, TaskStream] = {}
    for task in task_names(cfg):
        consumer = StreamConsumer(client, cfg.run, cfg.consumer, task)
        reader = ExperienceReader(
            consumer,
            check,
            batch_size=cfg.batch_size,
            max_policy_lag=cfg.max_policy_lag,
            read_block_ms=cfg.read_block_ms,
            idle_timeout_s=cfg.idle_timeout_s,
            should_stop=should_stop,
        )
        streams[task] = TaskStream(consumer, reader)
        # Recover: entries this consumer read before a restart. Committed ones are only acked.
        pending = consumer.pending()
        if cfg.claim_orphans_idle_ms:
            seen = {e.entry_id for e in pending}
            pending += [
                e for e in consumer.claim_orphans(cfg.claim_orphans_idle_ms) if e.entry_id not in seen
            ]
            pending.sort(key=lambda e: tuple(int(x) for x in e.entry_id.split("-")))
        committed = loaded.committed_entries_of(task) if loaded else set()
        done = [e.entry_id for e in pending if e.entry_id in committed]
        consumer.ack_delete(done)
        reader.requeue([e for e in pending if e.entry_id not in committed])
        if pending:
            log.info(
                "recovered %d pending entries%s: %d already committed (acked now), %d to train",
                len(pending),
                f" of task {task}" if task else "",
                len(done),
                len(pending) - len(done),
            )
    return streams


def ack_lines(streams: dict[str, TaskStream], lines: list[dict[str, Any]]) -> None:
    """XACK + XDEL the committed lines' entries, each on its task's stream."""
    for task, stream in streams.items():
        mine = [line for line in lines if line.get("task", "") == task]
        stream.consumer.ack_delete([e for line in mine for e in line["entries"] + line["stale_entries"]])


def reward_metrics(records: list[ExperienceRecord]) -> dict[str, float]:
    """Mean verifier/environment reward of the batch's samples that carry one (success rate of episodes)."""
    rewards = [s.reward for r in records for s in r.samples if s.reward is not None]
    return {"reward/mean": sum(rewards) / len(rewards)} if rewards else {}


def task_metrics(
    task: str, metrics: dict[str, float], backlogs: dict[str, int], counters: TaskCounters
) -> dict[str, float]:
    """The batch's training metrics again as task/<task>/..., this task's counters, every task's backlog
    (`backlogs`: task -> entries in its stream, in schedule order)."""
    if not task:
        return {}
    # Training metrics only: eval keys are per task already, and time/perf describe the whole batch loop.
    skip = ("time/", "perf/", "task/", "eval/", "train/task_index")
    out = {f"task/{task}/{k}": v for k, v in metrics.items() if not k.startswith(skip)}
    out[f"task/{task}/queue/dropped_stale"] = float(counters.stale.get(task, 0))
    out[f"task/{task}/train/batches"] = float(counters.batches.get(task, 0))
    for name, backlog in backlogs.items():
        out[f"task/{name}/queue/backlog"] = float(backlog)
    out["train/task_index"] = float(list(backlogs).index(task))
    return out


def load_task_evals(cfg: TrainerConfig, tokenizer: Any) -> dict[str, tuple[list, Any]]:
    """Prompt task -> (its eval prompts, its verifier), for the tasks with an eval_file."""
    from trainer.eval import load_eval_prompts

    return {
        t.name: (
            load_eval_prompts(t.eval_file, tokenizer, cfg.eval_max_prompts),
            get_verifier(t.resolved_eval_verifier),
        )
        for t in cfg.tasks
        if t.eval_file
    }


def eval_tasks(
    cfg: TrainerConfig, client: Any, task_evals: dict[str, tuple[list, Any]], tokenizer: Any
) -> dict[str, float]:
    """Per task, through the rollout service `client`: `task/<name>/eval/pass@1` (prompt tasks,
    trainer/eval.py) or `task/<name>/eval/success_rate` (greedy episodes on held-out env seeds)."""
    from trainer.eval import EvalSettings, evaluate

    out: dict[str, float] = {}
    for t in cfg.tasks:
        max_new = int(t.worker.get("max_new_tokens", cfg.eval_max_new_tokens))
        if t.name in task_evals:
            prompts, verifier = task_evals[t.name]
            settings = EvalSettings(
                n=cfg.eval_n,
                greedy=cfg.eval_greedy,
                temperature=cfg.eval_temperature,
                top_p=cfg.eval_top_p,
                max_new_tokens=max_new,
                chat_template=cfg.eval_chat_template,
                seed=cfg.seed,
            )
            metrics = evaluate(client, tokenizer, prompts, verifier, settings)
        elif t.eval_episodes:
            from services.worker.episode import evaluate_env

            t0 = time.perf_counter()
            success = evaluate_env(
                make_env=functools.partial(eval_env, t),
                seeds=t.eval_seeds(),
                rollout=client,
                tokenizer=tokenizer,
                max_turns=t.max_turns,
                max_new_tokens=max_new,
                max_context_tokens=cfg.max_seq_len,
            )
            metrics = {"eval/success_rate": success, "time/eval": time.perf_counter() - t0}
        else:
            continue
        out.update({f"task/{t.name}/{k}": v for k, v in metrics.items()})
    return out


def eval_env(task: TaskConfig) -> Environment:
    """A new environment for a task's eval: its env_options with eval_env_options over them."""
    from services.worker.envs import make_env

    return make_env(task.env, **{**task.env_options, **task.eval_env_options})
