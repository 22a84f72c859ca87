"""Rollout worker (`opd rollout work`): prompts -> rollout service -> teacher -> Redis experience stream.

For every prompt of its shard the worker asks the rollout service for G top-p samples, has the teacher
score each sample's completion (top-K per position, plus the behaviour top-k ids as candidates for the
student-top-K support), optionally rewards each sample with a verifier, and appends one `ExperienceGroup`
to `opd:<run>:experience` (DESIGN.md 3.3).

- Pipelining: `concurrency` prompts are in flight on a thread pool, so one prompt's generate overlaps
  another's scoring and both services stay busy.
- Backpressure: an entry is appended only while the stream holds fewer than `max_backlog` entries. The
  check and the XADD run in one Lua script, so the bound holds exactly even with many workers; the worker
  never trims or drops unconsumed entries.
- Whole or nothing: a record is fully built (all samples generated and scored) before its single XADD.
- Failures: rollout/teacher calls that fail transiently (connection errors, UNAVAILABLE,
  RESOURCE_EXHAUSTED, HTTP 5xx/429) retry with exponential backoff for up to `retry_timeout_s`; a prompt
  the services reject as invalid (INVALID_ARGUMENT, HTTP 4xx) is skipped and counted; Redis connection
  errors retry until Redis is back (a restarted Redis with AOF keeps the stream).
- Stop: SIGTERM/SIGINT finish the prompts in flight, write what can be written at once, and exit; a
  record that cannot be written then (stream full, Redis down) is dropped whole. A second signal kills.
- Aliases (`token_aliases`, docs/aliases.md): the alias ids join every row's candidates and multi-token
  spellings are scored on a rewritten sequence, in the same single Score call (services/worker/aliasing.py).
- Delivery is exactly once per record id: the append script sets `opd:<run>:rid:<record_id>` with the
  XADD, so if the connection drops after Redis ran it but before its reply, the retry finds the marker and
  returns the first entry's id instead of appending the record again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import grpc
import httpx
import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.common.config import ConfigBase, ConfigError, opt
from services.common.experience import ExperienceRecord, SampleRecord, encode
from services.common.logs import setup_logging
from services.common.prompts import Prompt, cycle_prompts, load_prompts
from services.common.redis_keys import (
    RECORD_FIELD,
    RECORD_MARKER_TTL_S,
    connect,
    ensure_group,
    experience_stream,
    record_marker_key,
)
from services.common.token_aliases import parse_aliases
from services.common.verifiers import get_verifier
from services.rollout.client import RolloutClient, RolloutError
from services.rollout.protocol import GenerateRequest, GenerateResponse, Sample
from services.teacher.client import ScoredRows, TeacherClient
from services.worker.aliasing import WorkerAliases

log = logging.getLogger(__name__)
T = TypeVar("T")

SUPPORTS = ("teacher_topk", "student_topk", "teacher_topk_plus_sampled")
# A run of prompts rejected one after another means a misconfiguration, not bad data: stop then.
MAX_CONSECUTIVE_BAD_PROMPTS = 20

# Append once per record id, and only while the stream is below the bound. KEYS: stream, record marker;
# ARGV: max_backlog, field, data, marker ttl, nonce of this write() call. The marker holds "<nonce> <entry
# id>". Returns {entry id, nonce of the call that appended it}, or false (nil) when the stream is full: a
# retry after a lost reply sees its own nonce, a second write() of the same record another one.
_XADD_IF_ROOM = """
local first = redis.call('GET', KEYS[2])
if first then
  local sep = string.find(first, ' ', 1, true)
  return {string.sub(first, sep + 1), string.sub(first, 1, sep - 1)}
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
local id = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[3])
redis.call('SET', KEYS[2], ARGV[5] .. ' ' .. id, 'EX', tonumber(ARGV[4]))
return {id, ARGV[5]}
"""


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
    concurrency: int = opt(4, "prompts in flight")
    max_records: int = opt(0, "stop after writing this many records (0 = no limit)")
    epochs: int = opt(0, "passes over the prompt shard (0 = forever)")
    verifier: str | None = opt(
        None, "reward function: exact_match, toy_arith (needs `tokenizer`); None = none"
    )
    seed: int = opt(0, "base of the per-prompt sampling seeds (a function of seed, row and epoch)")
    metrics_port: int = opt(0, "Prometheus metrics port (0 = off)")
    task: str = opt("", "task tag stored in every record; records go to opd:<run>:experience:<task> then")
    env: str = opt("", "environment task: multi-turn episodes instead of prompts (services/worker/envs)")
    env_options: dict[str, Any] = opt({}, "environment options (TOML table), passed to make_env")
    max_turns: int = opt(0, "environment task: turn limit of an episode")
    env_seeds: int = opt(100_000, "environment task: episodes per epoch, env seeds 0..N-1 sharded by worker")
    max_context_tokens: int = opt(0, "environment task: end an episode before it can outgrow this (0 = off)")
    retry_timeout_s: float = opt(300.0, "give up on a failing rollout/teacher call after this long")
    log_interval_s: float = opt(10.0, "seconds between progress lines")
    token_aliases: list[Any] = opt(
        [], "special-token aliases [[student, teacher], ...] (docs/aliases.md); flag/env: JSON"
    )
    teacher_tokenizer: str | None = opt(None, "teacher tokenizer, for token_aliases given as strings")

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
        for name in ("max_records", "epochs"):
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
        if self.retry_timeout_s < 0 or self.log_interval_s <= 0:
            raise ConfigError(f"retry_timeout_s/log_interval_s: {self.retry_timeout_s}/{self.log_interval_s}")
        parse_aliases(self.token_aliases)


# ---------------------------------------------------------------- pure helpers


def request_seed(base: int, row: int, epoch: int) -> int:
    """Sampling seed of one prompt: the same (base, row, epoch) always gives the same samples."""
    digest = hashlib.blake2b(f"{base}:{row}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def completion_text(tokenizer: Any, token_ids: list[int]) -> str:
    """The text a verifier judges: the completion up to its first special token (an end marker of either
    model, a pad), decoded. Cutting there, not skipping specials, keeps text after a foreign end marker out."""
    special = set(tokenizer.all_special_ids)
    end = next((i for i, t in enumerate(token_ids) if t in special), len(token_ids))
    return tokenizer.decode(token_ids[:end])


def scorable(response: GenerateResponse) -> list[Sample]:
    """Samples that can be scored: the teacher needs at least one completion position."""
    return [s for s in response.samples if s.token_ids]


def build_record(
    record_id: str,
    prompt: Prompt,
    response: GenerateResponse,
    scored: list[ScoredRows],  # one per scorable sample
    teacher_model_id: str,
    task: str = "",
    rewards: list[float] | None = None,
    with_candidates: bool = False,
    candidate_ids: list[np.ndarray | None] | None = None,
) -> ExperienceRecord:
    """Assemble one experience record from a generate response (one prompt) and the teacher's scores.

    Per sample of completion length L: behaviour logprobs [L] from the rollout service; teacher top-K
    ids/logprobs [L, K] and target logprobs [L]; with `with_candidates` the behaviour top ids [L, C] are
    the teacher's candidates and their teacher logprobs [L, C] are stored beside them. `candidate_ids`
    (one [L, C] per sample, e.g. with alias ids) replaces the behaviour top ids as the stored candidates.
    """
    samples = scorable(response)
    if len(scored) != len(samples):
        raise ValueError(f"{len(scored)} teacher results for {len(samples)} samples")
    if rewards is not None and len(rewards) != len(samples):
        raise ValueError(f"{len(rewards)} rewards for {len(samples)} samples")
    out = []
    for i, (s, rows) in enumerate(zip(samples, scored, strict=True)):
        n = len(s.token_ids)
        if rows.topk_ids.shape[0] != n or rows.target_logprobs.shape != (n,):
            raise ValueError(f"sample {i}: teacher returned {rows.topk_ids.shape[0]} rows for {n} tokens")
        behaviour_top_ids = behaviour_top_logprobs = None
        if s.top_ids is not None:
            behaviour_top_ids = np.asarray(s.top_ids, dtype=np.int32).reshape(n, -1)  # [L, C]
            behaviour_top_logprobs = np.asarray(s.top_logprobs, dtype=np.float32).reshape(n, -1)  # [L, C]
        cand_ids = cand_lp = None
        if candidate_ids is not None and candidate_ids[i] is not None:
            if rows.candidate_logprobs is None:
                raise ValueError(f"sample {i}: candidates were asked but the teacher scored none")
            cand_ids = np.asarray(candidate_ids[i], dtype=np.int32)
            cand_lp = np.asarray(rows.candidate_logprobs, dtype=np.float32)  # [L, C]
            if cand_lp.shape != cand_ids.shape:
                raise ValueError(
                    f"sample {i}: candidate logprobs {cand_lp.shape} for candidates {cand_ids.shape}"
                )
        elif with_candidates:
            if behaviour_top_ids is None or rows.candidate_logprobs is None:
                raise ValueError(
                    f"sample {i}: student_topk support needs behaviour top ids and candidate scores"
                )
            cand_ids = behaviour_top_ids
            cand_lp = np.asarray(rows.candidate_logprobs, dtype=np.float32)  # [L, C]
            if cand_lp.shape != cand_ids.shape:
                raise ValueError(
                    f"sample {i}: candidate logprobs {cand_lp.shape} for candidates {cand_ids.shape}"
                )
        out.append(
            SampleRecord(
                completion_ids=np.asarray(s.token_ids, dtype=np.int32),
                behaviour_logprobs=np.asarray(s.logprobs, dtype=np.float32),
                teacher_topk_ids=np.asarray(rows.topk_ids, dtype=np.int32),
                teacher_topk_logprobs=np.asarray(rows.topk_logprobs, dtype=np.float32),
                teacher_target_logprobs=np.asarray(rows.target_logprobs, dtype=np.float32),
                finish_reason=s.finish_reason,
                teacher_model_id=teacher_model_id,
                teacher_candidate_ids=cand_ids,
                teacher_candidate_logprobs=cand_lp,
                behaviour_top_ids=behaviour_top_ids,
                behaviour_top_logprobs=behaviour_top_logprobs,
                reward=None if rewards is None else float(rewards[i]),
            )
        )
    return ExperienceRecord(
        record_id=record_id,
        policy_version=response.policy_version,
        prompt_ids=np.asarray(response.prompt_ids[0], dtype=np.int32),
        samples=out,
        task=task,
        prompt_text=prompt.text,
        answer=prompt.answer,
    )


class BadPromptError(ValueError):
    """The services' answer for this prompt cannot make a record (e.g. every completion is empty)."""


def classify_error(exc: BaseException) -> str:
    """'retry' (transient), 'bad_input' (the services reject this prompt) or 'fatal'."""
    if isinstance(exc, BadPromptError):
        return "bad_input"
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        code = exc.code()
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.ABORTED,
        ):
            return "retry"
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
            return "bad_input"
        return "fatal"
    if isinstance(exc, RolloutError):
        status = exc.status_code
        if status >= 500 or status == 429:
            return "retry"
        if status in (400, 413, 422):
            return "bad_input"
        return "fatal"
    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return "retry"
    return "fatal"


class _Stopped(Exception):
    """A stop was requested while a service or Redis call was waiting to be retried."""


class WorkerMetrics:
    """Prometheus metrics of one worker (own registry, so several workers can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.records = Counter("opd_worker_records", "experience records written", registry=r)
        self.samples = Counter("opd_worker_samples", "samples written", registry=r)
        self.tokens = Counter("opd_worker_completion_tokens", "completion tokens written", registry=r)
        self.bad_prompts = Counter(
            "opd_worker_bad_prompts", "prompts rejected by a service, skipped", registry=r
        )
        self.dropped = Counter(
            "opd_worker_dropped_records", "records not written because of a stop", registry=r
        )
        self.retries = Counter("opd_worker_retries", "retried calls", ["call"], registry=r)
        self.backlog = Gauge("opd_worker_backlog", "stream length at the last write", registry=r)
        self.policy_version = Gauge(
            "opd_worker_policy_version", "policy version of the last record", registry=r
        )
        self.blocked_s = Counter(
            "opd_worker_backpressure_seconds", "time waiting for a full stream", registry=r
        )
        self.generate_s = Histogram("opd_worker_generate_seconds", "rollout generate latency", registry=r)
        self.score_s = Histogram("opd_worker_score_seconds", "teacher score latency", registry=r)
        self.reward = Histogram("opd_worker_reward", "verifier rewards", buckets=(0.0, 0.5, 1.0), registry=r)


# ---------------------------------------------------------------- the loop


class RolloutWorker:
    """The worker loop over injected clients of the rollout service, the teacher and Redis."""

    def __init__(
        self,
        cfg: WorkerConfig,
        rollout_client: RolloutClient,
        teacher_client: TeacherClient,
        redis_client: redis.Redis,
    ):
        self.cfg = cfg
        self.rollout, self.teacher, self.redis = rollout_client, teacher_client, redis_client
        self.tokenizer = None
        if cfg.tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        self.verifier = get_verifier(cfg.verifier)
        # The nonce makes record ids unique across restarts of the same worker index.
        self.worker_id = f"w{cfg.worker_index}-{secrets.token_hex(4)}"
        self.stream = experience_stream(cfg.run, cfg.task)
        self.make_env = None
        if cfg.env:
            from services.worker.envs import make_env

            make_env(cfg.env, **cfg.env_options)  # an unknown env or option fails now, not per episode
            self.make_env = lambda: make_env(cfg.env, **cfg.env_options)
        self.stop_event = threading.Event()
        self.metrics = WorkerMetrics()
        self.aliases = WorkerAliases.from_config(
            cfg.token_aliases, self.tokenizer, cfg.teacher_tokenizer, self.metrics.registry
        )
        self.teacher_model_id: str | None = None
        self._xadd_if_room = self.redis.register_script(_XADD_IF_ROOM)
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._blocked_since: float | None = None
        self._redis_down = False
        self._bad_in_row = 0
        self.totals = {"records": 0, "samples": 0, "tokens": 0, "bad_prompts": 0, "dropped": 0}

    # -- one prompt

    def prepare(self) -> None:
        """Wait for the services, check the teacher can serve this config, create the consumer group."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.retry_timeout_s
        while not self._call_quietly(self.rollout.ready):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rollout service at {cfg.rollout_url} not ready after {cfg.retry_timeout_s} s"
                )
            if self.stop_event.wait(1.0):
                raise _Stopped("stopped while waiting for the rollout service")
        info = self._retry(self.teacher.info, "teacher_info")
        if cfg.top_k > info.max_top_k:
            raise ConfigError(f"top_k: {cfg.top_k} > the teacher's max_top_k {info.max_top_k}")
        if cfg.support == "student_topk" and not info.supports_candidates:
            raise ConfigError(
                f"support: student_topk needs candidates; teacher backend {info.backend!r} has none"
            )
        if self.aliases is not None:
            self.aliases.check_teacher(info, cfg.top_k if cfg.support == "student_topk" else 0)
        self.teacher_model_id = info.model_id
        self._redis_call(lambda: ensure_group(self.redis, cfg.run, cfg.task))
        log.info(
            "teacher %s (%s, vocab %d); stream %s; worker %s",
            info.model_id,
            info.backend,
            info.vocab_size,
            self.stream,
            self.worker_id,
        )

    def next_record_id(self) -> str:
        with self._lock:
            return f"{self.worker_id}-{next(self._counter)}"

    def run_one(self, prompt: Prompt) -> ExperienceRecord:
        """Generate G samples for `prompt`, score them with the teacher, reward them; no Redis I/O."""
        cfg = self.cfg
        if self.teacher_model_id is None:
            self.teacher_model_id = self._retry(self.teacher.info, "teacher_info").model_id
        record_id = self.next_record_id()
        if self.make_env is not None:
            return self._run_episodes(prompt, record_id)
        student_topk = cfg.support == "student_topk"
        request = GenerateRequest(
            prompts=[list(prompt.token_ids)] if prompt.token_ids else None,
            texts=None if prompt.token_ids else [prompt.text],
            n=cfg.group_size,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=request_seed(cfg.seed, prompt.row, prompt.epoch),
            return_top_k=cfg.top_k if student_topk else 0,
        )
        with self.metrics.generate_s.time():
            response = self._retry(lambda: self.rollout.generate(request), "rollout_generate")
        prompt_ids = list(response.prompt_ids[0])
        samples = scorable(response)
        if not samples:
            raise BadPromptError(
                f"prompt row {prompt.row}: all {len(response.samples)} completions are empty"
            )
        candidates = None
        if student_topk:
            candidates = [
                np.asarray(s.top_ids, dtype=np.int32).reshape(len(s.token_ids), -1) for s in samples
            ]
        if self.aliases is not None:
            candidates = [
                self.aliases.candidates(None if candidates is None else candidates[i], len(s.token_ids))
                for i, s in enumerate(samples)
            ]
        with self.metrics.score_s.time():
            scored = self._retry(
                lambda: self._score(record_id, prompt_ids, samples, candidates), "teacher_score"
            )
        rewards = None
        if self.verifier is not None:
            texts = [completion_text(self.tokenizer, s.token_ids) for s in samples]
            rewards = [float(self.verifier(t, prompt.answer)) for t in texts]
            for r in rewards:
                self.metrics.reward.observe(r)
        return build_record(
            record_id,
            prompt,
            response,
            scored,
            self.teacher_model_id,
            cfg.task,
            rewards,
            with_candidates=student_topk,
            candidate_ids=candidates if self.aliases is not None else None,
        )

    def _score(
        self, record_id: str, prompt_ids: list[int], samples: list[Sample], candidates: list | None
    ) -> list[ScoredRows]:
        def score(seqs, score_from, cands):
            return self.teacher.score(
                seqs, score_from=score_from, top_k=self.cfg.top_k, candidates=cands, request_id=record_id
            )

        completions = [list(s.token_ids) for s in samples]
        if self.aliases is not None:
            scored = self.aliases.score(score, prompt_ids, completions, candidates)
            self.aliases.count(completions)
            return scored
        return score([prompt_ids + c for c in completions], [len(prompt_ids)] * len(samples), candidates)

    def _run_episodes(self, prompt: Prompt, record_id: str) -> ExperienceRecord:
        """G episodes of the environment from seed `prompt.row` (services/worker/episode.py)."""
        from services.worker.episode import EpisodeSettings, run_episodes

        cfg = self.cfg
        settings = EpisodeSettings(
            group_size=cfg.group_size,
            max_turns=cfg.max_turns,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            sample_seed=request_seed(cfg.seed, prompt.row, prompt.epoch),
            max_context_tokens=cfg.max_context_tokens,
        )
        record = run_episodes(
            make_env=self.make_env,
            env_seed=prompt.row,
            rollout=self.rollout,
            teacher=self.teacher,
            tokenizer=self.tokenizer,
            settings=settings,
            record_id=record_id,
            task=cfg.task,
            teacher_model_id=self.teacher_model_id,
            call=self._retry,
        )
        for s in record.samples:
            self.metrics.reward.observe(s.reward)  # 1.0 for a successful episode
        return record

    # -- Redis

    def write(self, record: ExperienceRecord) -> str | None:
        """Append `record` as one stream entry once the stream has room; its entry id, or None when a stop
        came while the record could not be written (it is then dropped whole). A record id written before
        (by an earlier call) is not appended again: the first entry's id is returned."""
        data = encode(record)
        keys = [self.stream, record_marker_key(self.cfg.run, record.record_id)]
        nonce = secrets.token_hex(8)  # tells this call's own lost-reply retry from an earlier write()
        args = [self.cfg.max_backlog, RECORD_FIELD, data, RECORD_MARKER_TTL_S, nonce]

        def append() -> list | None:
            return self._xadd_if_room(keys=keys, args=args)

        poll = 0.05
        while True:
            reply = self._redis_call(append)
            if reply is not None:
                entry, owner = (x.decode() if isinstance(x, bytes) else str(x) for x in reply)
                break
            now = time.monotonic()
            with self._lock:
                if self._blocked_since is None:
                    self._blocked_since = now
                    log.info(
                        "stream %s holds %d entries (max_backlog): waiting for the trainer",
                        self.stream,
                        self.cfg.max_backlog,
                    )
            if self.stop_event.is_set():
                return self._drop(record, "the stream is full")
            self.stop_event.wait(poll)  # then one more try before giving up
            poll = min(poll * 2, 1.0)
        if owner != nonce:
            log.warning(
                "record %s was already written as entry %s; not appended again", record.record_id, entry
            )
            return entry
        self._account(record)
        return entry

    def _drop(self, record: ExperienceRecord, why: str) -> None:
        log.warning("stopping: record %s not written (%s)", record.record_id, why)
        self.metrics.dropped.inc()
        with self._lock:
            self.totals["dropped"] += 1
        return None

    def _account(self, record: ExperienceRecord) -> None:
        tokens = sum(len(s) for s in record.samples)
        m = self.metrics
        m.records.inc()
        m.samples.inc(len(record.samples))
        m.tokens.inc(tokens)
        m.policy_version.set(record.policy_version)
        with self._lock:
            if self._blocked_since is not None:
                waited = time.monotonic() - self._blocked_since
                m.blocked_s.inc(waited)
                log.info("stream has room again after %.1f s; resuming", waited)
                self._blocked_since = None
            self.totals["records"] += 1
            self.totals["samples"] += len(record.samples)
            self.totals["tokens"] += tokens

    def _redis_call(self, fn: Callable[[], T]) -> T:
        """Run a Redis command, retrying connection errors with backoff until Redis answers (redis-py
        reconnects on the next command) or a stop is requested (then `_Stopped`)."""
        delay = 0.1
        while True:
            try:
                result = fn()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if self.stop_event.is_set():
                    raise _Stopped(f"Redis unavailable during stop: {e}") from e
                with self._lock:
                    if not self._redis_down:
                        self._redis_down = True
                        log.warning("Redis unavailable (%s); reconnecting with backoff", e)
                self.stop_event.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._redis_down:
                with self._lock:
                    self._redis_down = False
                log.info("Redis is back")
            return result

    # -- services

    def _retry(self, fn: Callable[[], T], call: str) -> T:
        """Call `fn`, retrying transient failures with exponential backoff for up to `retry_timeout_s`."""
        deadline = time.monotonic() + self.cfg.retry_timeout_s
        delay, attempt = 0.5, 0
        while True:
            try:
                return fn()
            except Exception as e:
                if classify_error(e) != "retry" or time.monotonic() + delay > deadline:
                    raise
                attempt += 1
                self.metrics.retries.labels(call).inc()
                log.warning("%s failed (%s); retry %d in %.1f s", call, _short(e), attempt, delay)
                if self.stop_event.wait(delay):
                    raise _Stopped(f"stopped while retrying {call}") from e
                delay = min(delay * 2, 15.0)

    @staticmethod
    def _call_quietly(fn: Callable[[], bool]) -> bool:
        try:
            return bool(fn())
        except Exception as e:
            if classify_error(e) == "fatal":
                raise
            return False

    # -- loop

    def _process(self, prompt: Prompt) -> None:
        """One prompt end to end, on a pool thread. Bad prompts are skipped; fatal errors propagate."""
        try:
            record = self.run_one(prompt)
        except _Stopped:
            return
        except Exception as e:
            if classify_error(e) != "bad_input":
                raise
            self.metrics.bad_prompts.inc()
            with self._lock:
                self.totals["bad_prompts"] += 1
                self._bad_in_row += 1
                in_row = self._bad_in_row
            log.error("prompt row %d skipped: %s", prompt.row, _short(e))
            if in_row >= MAX_CONSECUTIVE_BAD_PROMPTS:
                raise RuntimeError(f"{in_row} prompts rejected in a row; last: {_short(e)}") from e
            return
        with self._lock:
            self._bad_in_row = 0
        try:
            self.write(record)
        except _Stopped as e:
            self._drop(record, str(e))

    def stop(self) -> None:
        """Ask the loop to finish the prompts in flight and return."""
        self.stop_event.set()

    def run(self, prompts: Iterable[Prompt] | None = None) -> dict[str, float]:
        """Process prompts (default: this worker's shard of `cfg.prompts`, cycled `epochs` times) until they
        run out, `max_records` are written, or `stop()`. Returns totals: records, samples, tokens, seconds."""
        cfg = self.cfg
        if prompts is None and cfg.env:
            # An environment's "rows" are its seeds: episode r starts from env seed r.
            seeds = range(cfg.worker_index, cfg.env_seeds, cfg.num_workers)
            log.info(
                "env %s: %d episode seeds in shard %d/%d",
                cfg.env,
                len(seeds),
                cfg.worker_index,
                cfg.num_workers,
            )
            prompts = cycle_prompts([Prompt(row=r, text="") for r in seeds], cfg.epochs)
        if prompts is None:
            shard = load_prompts(cfg.prompts, cfg.worker_index, cfg.num_workers, self.tokenizer)
            log.info(
                "%d prompts in shard %d/%d of %s", len(shard), cfg.worker_index, cfg.num_workers, cfg.prompts
            )
            if not shard:
                log.warning(
                    "shard %d/%d is empty: more workers than prompts", cfg.worker_index, cfg.num_workers
                )
            prompts = cycle_prompts(shard, cfg.epochs)
        metrics_server = None
        if cfg.metrics_port:
            metrics_server, _ = start_http_server(cfg.metrics_port, registry=self.metrics.registry)
        start = time.monotonic()
        try:
            self.prepare()
            self._loop(iter(prompts), start)
        except _Stopped:
            pass
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
        summary = dict(self.totals, seconds=time.monotonic() - start)
        log.info(
            "done: %s",
            " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()),
        )
        return summary

    def _loop(self, prompts: Iterable[Prompt], start: float) -> None:
        cfg = self.cfg
        in_flight: set[Future] = set()
        exhausted = False
        last_log, last_totals = start, dict(self.totals)
        with ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="rollout") as pool:
            try:
                while True:
                    while (
                        not self.stop_event.is_set()
                        and not exhausted
                        and len(in_flight) < cfg.concurrency
                        and (
                            cfg.max_records == 0 or self.totals["records"] + len(in_flight) < cfg.max_records
                        )
                    ):
                        prompt = next(prompts, None)
                        if prompt is None:
                            exhausted = True
                            break
                        in_flight.add(pool.submit(self._process, prompt))
                    if not in_flight:
                        break
                    done, in_flight = wait(in_flight, timeout=0.5, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()  # re-raise a fatal error from the pool thread
                    now = time.monotonic()
                    if now - last_log >= cfg.log_interval_s:
                        self._log_progress(now - last_log, last_totals, len(in_flight))
                        last_log, last_totals = now, dict(self.totals)
            except BaseException:
                # Let the other in-flight prompts finish (or drop) quickly before the pool joins them.
                self.stop_event.set()
                raise

    def _log_progress(self, dt: float, before: dict[str, int], in_flight: int) -> None:
        try:
            backlog = int(self.redis.xlen(self.stream))
            self.metrics.backlog.set(backlog)
        except (redis.ConnectionError, redis.TimeoutError):
            backlog = -1
        t = self.totals
        log.info(
            "records %d (%.2f/s) tokens %.0f/s backlog %s in_flight %d bad %d",
            t["records"],
            (t["records"] - before["records"]) / dt,
            (t["tokens"] - before["tokens"]) / dt,
            backlog if backlog >= 0 else "?",
            in_flight,
            t["bad_prompts"],
        )

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: graceful stop; a second signal gets the default behaviour (exit now)."""

        def handler(signum: int, _frame: Any) -> None:
            log.info("%s: finishing the prompts in flight (again to exit now)", signal.Signals(signum).name)
            self.stop()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def _short(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError) and isinstance(e, grpc.Call):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def parse_worker_config(argv: list[str] | None) -> WorkerConfig:
    """`parse_config` plus the file's tasks: a worker of task T (`task` from the flags, the environment or
    [worker]) takes T's values from `[tasks.T]` over the [worker] section (services/common/tasks.py)."""
    import os

    from services.common.config import build_config
    from services.common.tasks import cli_layers, find_task, load_tasks

    values, cli, path = cli_layers(WorkerConfig, argv, "opd rollout work")
    tasks = load_tasks(path)
    if tasks:
        name = cli.get("task") or os.environ.get("OPD_WORKER_TASK") or values.get("task", "")
        if not name:
            raise ConfigError(f"task: the config has tasks {[t.name for t in tasks]}; name this worker's")
        values.update(find_task(tasks, name).worker_values())
    return build_config(WorkerConfig, values, cli=cli)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_worker_config(argv)
    except ConfigError as e:
        print(f"opd rollout work: {e}", file=sys.stderr)
        return 2
    setup_logging("worker")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the progress
    with (
        RolloutClient(
            cfg.rollout_url, token=cfg.rollout_token, tls_ca_file=cfg.rollout_tls_ca_file
        ) as rollout,
        TeacherClient(cfg.teacher, token=cfg.teacher_token, tls_ca_file=cfg.teacher_tls_ca_file) as teacher,
    ):
        worker = RolloutWorker(cfg, rollout, teacher, connect(cfg.redis_url))
        worker.install_signal_handlers()
        worker.run()
    return 0
