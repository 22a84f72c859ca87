"""Rollout worker loop: prompts -> rollout service -> teacher -> Redis experience stream.

For every prompt of its shard the worker asks the rollout service for G top-p samples, has the teacher
score each sample's completion (top-K per position, plus the behaviour top-k ids as candidates for the
student-top-K support), optionally rewards each sample with a verifier, and appends one `ExperienceGroup`
to `opd:<run>:experience` (DESIGN.md 3.3).

- Pipelining (#17): a group's G samples are G generate requests of n = 1 with the group's seed and
  `first_sample_index` j, which the rollout service samples exactly as sample j of one n = G request, each
  scored by the teacher as soon as it finishes, so no sample waits for its group's slowest; the record is assembled once all G are scored.
  Samples in flight are bounded by tokens (`max_tokens_in_flight`, each sample counting prompt +
  max_new_tokens; 0 = concurrency x group_size samples). Environment tasks (multi-turn episodes) keep
  whole groups: `concurrency` prompts in flight, each `run_one`.
- Backpressure and exactly-once appends: services/worker/sink.py.
- Whole or nothing: a record is fully built (all samples generated and scored) before its single XADD.
- Failures: rollout/teacher calls that fail transiently (connection errors, UNAVAILABLE,
  RESOURCE_EXHAUSTED, HTTP 5xx/429) retry with exponential backoff for up to `retry_timeout_s`; a prompt
  the services reject as invalid (INVALID_ARGUMENT, HTTP 4xx) is skipped and counted; Redis connection
  errors retry until Redis is back (a restarted Redis with AOF keeps the stream).
- Stop: SIGTERM/SIGINT finish the prompts in flight, write what can be written at once, and exit; a
  record that cannot be written then (stream full, Redis down) is dropped whole. A second signal kills.
- Aliases (`token_aliases`, docs/aliases.md): the alias ids join every row's candidates and multi-token
  spellings are scored on a rewritten sequence, in the same single Score call (services/worker/aliasing.py).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import redis
from opd_teacher_client import ScoredRows, TeacherClient
from prometheus_client import start_http_server

from services.common.config import ConfigError
from services.common.experience import ExperienceRecord
from services.common.prompts import Prompt, cycle_prompts, load_prompts
from services.common.verifiers import get_verifier, own_end_ids, score_samples
from services.rollout.client import RolloutClient
from services.rollout.protocol import GenerateRequest, GenerateResponse, Sample
from services.worker.aliasing import WorkerAliases
from services.worker.config import WorkerConfig
from services.worker.metrics import WorkerMetrics
from services.worker.record import (
    BadPromptError,
    build_record,
    request_seed,
    scorable,
)
from services.worker.retry import ErrorKind, Stopped, call_with_retry, classify_error, short
from services.worker.sink import RecordSink
from services.worker.vocab_check import check_worker_vocabulary

log = logging.getLogger(__name__)
T = TypeVar("T")

# A run of prompts rejected one after another means a misconfiguration, not bad data: stop then.
MAX_CONSECUTIVE_BAD_PROMPTS = 20


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
        # The student's own end markers, for strict rewards (a verifier needs the tokenizer: WorkerConfig).
        self.end_ids = own_end_ids(self.tokenizer) if self.verifier is not None else frozenset()
        # The nonce makes record ids unique across restarts of the same worker index.
        self.worker_id = f"w{cfg.worker_index}-{secrets.token_hex(4)}"
        self.make_env = None
        if cfg.env:
            from services.worker.envs import make_env

            make_env(cfg.env, **cfg.env_options)  # an unknown env or option fails now, not per episode
            self.make_env = lambda: make_env(cfg.env, **cfg.env_options)
        self.stop_event = threading.Event()
        self.metrics = WorkerMetrics()
        self.sink = RecordSink(
            redis_client, cfg.run, cfg.task, cfg.max_backlog, self.metrics, self.stop_event
        )
        self.stream = self.sink.stream
        self.aliases = WorkerAliases.from_config(
            cfg.token_aliases, self.tokenizer, cfg.teacher_tokenizer, self.metrics.registry
        )
        self.teacher_model_id: str | None = None
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._bad_in_row = 0
        self._open_groups = 0  # groups of the pipelined loop started and not yet finished
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
                raise Stopped("stopped while waiting for the rollout service")
        info = self._retry(self.teacher.info, "teacher_info")
        if cfg.top_k > info.max_top_k:
            raise ConfigError(f"top_k: {cfg.top_k} > the teacher's max_top_k {info.max_top_k}")
        if cfg.support == "student_topk" and not info.supports_candidates:
            raise ConfigError(
                f"support: student_topk needs candidates; teacher backend {info.backend!r} has none"
            )
        if self.aliases is not None:
            self.aliases.check_teacher(info, cfg.top_k if cfg.support == "student_topk" else 0)
        check_worker_vocabulary(cfg, self.tokenizer, info, self.aliases)
        self.teacher_model_id = info.model_id
        self.sink.ensure_group()
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
        """Generate G samples for `prompt` in one n = G request, score them in one teacher call, reward
        them; no Redis I/O. The loop pipelines per sample instead (`_run_sample`); this whole-group path
        serves environment tasks (episodes), callers outside the loop and as the reference in tests."""
        cfg = self.cfg
        self._ensure_teacher_model_id()
        record_id = self.next_record_id()
        if self.make_env is not None:
            return self._run_episodes(prompt, record_id)
        request = self._generate_request(prompt, cfg.group_size, self._group_seed(prompt))
        with self.metrics.generate_s.time():
            response = self._retry(lambda: self.rollout.generate(request), "rollout_generate")
        prompt_ids = list(response.prompt_ids[0])
        samples = scorable(response)
        if not samples:
            raise BadPromptError(
                f"prompt row {prompt.row}: all {len(response.samples)} completions are empty"
            )
        candidates = self._candidates(samples)
        with self.metrics.score_s.time():
            scored = self._retry(
                lambda: self._score(record_id, prompt_ids, samples, candidates), "teacher_score"
            )
        return self._assemble(record_id, prompt, response, scored, candidates)

    def _ensure_teacher_model_id(self) -> None:
        if self.teacher_model_id is None:
            self.teacher_model_id = self._retry(self.teacher.info, "teacher_info").model_id

    def _shuffle_seed(self) -> str | None:
        """The seed of this worker's per-epoch prompt order (None: file order)."""
        return f"{self.cfg.seed}:{self.cfg.worker_index}" if self.cfg.shuffle_prompts else None

    def _group_seed(self, prompt: Prompt) -> int:
        return request_seed(self.cfg.seed, prompt.row, prompt.epoch)

    def _generate_request(self, prompt: Prompt, n: int, seed: int, first_sample: int = 0) -> GenerateRequest:
        cfg = self.cfg
        return GenerateRequest(
            prompts=[list(prompt.token_ids)] if prompt.token_ids else None,
            texts=None if prompt.token_ids else [prompt.text],
            n=n,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=seed,
            first_sample_index=first_sample,
            return_top_k=cfg.top_k if cfg.support == "student_topk" else 0,
        )

    def _candidates(self, samples: list[Sample]) -> list[np.ndarray | None] | None:
        """Per (scorable) sample: the [L, C] ids the teacher also scores, or None when there are none."""
        candidates: list[np.ndarray | None] | None = None
        if self.cfg.support == "student_topk":
            candidates = [
                np.asarray(s.top_ids, dtype=np.int32).reshape(len(s.token_ids), -1) for s in samples
            ]
        if self.aliases is not None:
            candidates = [
                self.aliases.candidates(None if candidates is None else candidates[i], len(s.token_ids))
                for i, s in enumerate(samples)
            ]
        return candidates

    def _assemble(
        self,
        record_id: str,
        prompt: Prompt,
        response: GenerateResponse,
        scored: list[ScoredRows],
        candidates: list[np.ndarray | None] | None,
    ) -> ExperienceRecord:
        """The record of one group: verifier rewards, then build_record."""
        samples = scorable(response)
        rewards = None
        if self.verifier is not None:
            # Strict, like the trainer's pass@1: a right answer earns its reward only when the sample ends
            # with the student's own end marker (services/common/verifiers.py); lenient in the metrics.
            verdicts = score_samples(
                self.tokenizer, [s.token_ids for s in samples], prompt.answer, self.verifier, self.end_ids
            )
            rewards = verdicts.strict
            for strict_reward, lenient_reward in zip(verdicts.strict, verdicts.lenient, strict=True):
                self.metrics.reward.observe(strict_reward)
                self.metrics.reward_lenient.observe(lenient_reward)
        assert self.teacher_model_id is not None  # set by prepare or _ensure_teacher_model_id
        return build_record(
            record_id,
            prompt,
            response,
            scored,
            self.teacher_model_id,
            self.cfg.task,
            rewards,
            with_candidates=self.cfg.support == "student_topk",
            candidate_ids=candidates if self.aliases is not None else None,
        )

    # -- one sample (the pipelined loop)

    def _prompt_cost(self, prompt: Prompt) -> int:
        """Tokens one sample of `prompt` holds in flight: prompt + max_new_tokens. A text prompt's length is
        estimated (the worker's tokenizer, else its UTF-8 bytes) until the first response gives it exactly."""
        if prompt.token_ids:
            n = len(prompt.token_ids)
        elif self.tokenizer is not None:
            n = len(self.tokenizer(prompt.text)["input_ids"])
        else:
            n = len(prompt.text.encode("utf-8"))
        return n + self.cfg.max_new_tokens

    def _run_sample(self, group: _Group, index: int) -> None:
        """Sample `index` of `group` on a pool thread: generate it (n = 1), have the teacher score it at
        once, and write the group's record if it was the group's last sample."""
        try:
            if group.failed is not None:
                raise _Skipped
            request = self._generate_request(group.prompt, 1, group.seed, first_sample=index)
            with self.metrics.generate_s.time():
                response = self._retry(lambda: self.rollout.generate(request), "rollout_generate")
            (sample,) = response.samples
            prompt_ids = list(response.prompt_ids[0])
            group.cost = len(prompt_ids) + self.cfg.max_new_tokens  # exact from now on
            scored = cands = None
            if sample.token_ids:  # an empty completion has nothing to score (`scorable`)
                candidates = self._candidates([sample])
                with self.metrics.score_s.time():
                    (scored,) = self._retry(
                        lambda: self._score(group.record_id, prompt_ids, [sample], candidates),
                        "teacher_score",
                    )
                cands = None if candidates is None else candidates[0]
            last = group.resolve(index, _Done(prompt_ids, sample, scored, cands))
        except _Skipped:
            last = group.resolve(index, None)
        except Stopped as e:
            last = group.fail(index, e)
        except Exception as e:
            if classify_error(e) != ErrorKind.BAD_INPUT:
                raise
            last = group.fail(index, e)
        if last:
            self._finish(group)

    def _finish(self, group: _Group) -> None:
        """A group all of whose admitted samples are done: write its record, or count it a bad prompt."""
        try:
            self._finish_group(group)
        finally:
            with self._lock:
                self._open_groups -= 1

    def _finish_group(self, group: _Group) -> None:
        failed = group.failed
        if isinstance(failed, Stopped):
            return
        if failed is None:
            done = [d for d in group.done if d is not None]
            assert len(done) == self.cfg.group_size
            samples = [d.sample for d in done]
            response = GenerateResponse(
                policy_version=min(s.first_token_version for s in samples),
                prompt_ids=[done[0].prompt_ids],
                samples=samples,
            )
            kept = [d for d in done if d.sample.token_ids]
            if not kept:
                failed = BadPromptError(
                    f"prompt row {group.prompt.row}: all {len(samples)} completions are empty"
                )
            else:
                scored = [d.scored for d in kept]
                assert all(x is not None for x in scored)
                candidates = None if kept[0].candidates is None else [d.candidates for d in kept]
                record = self._assemble(
                    group.record_id, group.prompt, response, cast(list[ScoredRows], scored), candidates
                )
                with self._lock:
                    self._bad_in_row = 0
                self.write(record)
                return
        self._bad_prompt(group.prompt, failed)

    def _score(
        self,
        record_id: str,
        prompt_ids: list[int],
        samples: list[Sample],
        candidates: list[np.ndarray | None] | None,
    ) -> list[ScoredRows]:
        def score(seqs, score_from, cands):
            return self.teacher.score(
                seqs, score_from=score_from, top_k=self.cfg.top_k, candidates=cands, request_id=record_id
            )

        completions = [list(s.token_ids) for s in samples]
        if self.aliases is not None:
            assert candidates is not None  # aliases always add their ids (run_one)
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
        assert self.make_env is not None and self.teacher_model_id is not None  # run_one checked both
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
            self.metrics.reward.observe(s.reward or 0.0)  # 1.0 for a successful episode, else 0.0
        return record

    # -- Redis

    def write(self, record: ExperienceRecord) -> str | None:
        """Append `record` once the stream has room (services/worker/sink.py); its entry id, or None when a
        stop came while it could not be written (it is then dropped whole)."""
        try:
            entry, appended = self.sink.append(record)
        except Stopped as e:
            self._drop(record, str(e))
            return None
        if appended:
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
            self.totals["records"] += 1
            self.totals["samples"] += len(record.samples)
            self.totals["tokens"] += tokens

    # -- services

    def _retry(self, fn: Callable[[], T], call: str) -> T:
        """`fn` with the worker's retry policy (services/worker/retry.py) for up to `retry_timeout_s`."""
        return call_with_retry(
            fn,
            call,
            timeout_s=self.cfg.retry_timeout_s,
            stop=self.stop_event,
            on_retry=lambda c: self.metrics.retries.labels(c).inc(),
        )

    @staticmethod
    def _call_quietly(fn: Callable[[], bool]) -> bool:
        try:
            return bool(fn())
        except Exception as e:
            if classify_error(e) == ErrorKind.FATAL:
                raise
            return False

    # -- loop

    def _process(self, prompt: Prompt) -> None:
        """One prompt end to end, on a pool thread. Bad prompts are skipped; fatal errors propagate."""
        try:
            record = self.run_one(prompt)
        except Stopped:
            return
        except Exception as e:
            if classify_error(e) != ErrorKind.BAD_INPUT:
                raise
            self._bad_prompt(prompt, e)
            return
        with self._lock:
            self._bad_in_row = 0
        self.write(record)

    def _bad_prompt(self, prompt: Prompt, e: BaseException) -> None:
        """Count a prompt the services rejected; a run of them means a misconfiguration: raise then."""
        self.metrics.bad_prompts.inc()
        with self._lock:
            self.totals["bad_prompts"] += 1
            self._bad_in_row += 1
            in_row = self._bad_in_row
        log.error("prompt row %d skipped: %s", prompt.row, short(e))
        if in_row >= MAX_CONSECUTIVE_BAD_PROMPTS:
            raise RuntimeError(f"{in_row} prompts rejected in a row; last: {short(e)}") from e

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
            prompts = cycle_prompts([Prompt(row=r, text="") for r in seeds], cfg.epochs, self._shuffle_seed())
        if prompts is None:
            shard = load_prompts(cfg.prompts, cfg.worker_index, cfg.num_workers, self.tokenizer)
            log.info(
                "%d prompts in shard %d/%d of %s", len(shard), cfg.worker_index, cfg.num_workers, cfg.prompts
            )
            if not shard:
                log.warning(
                    "shard %d/%d is empty: more workers than prompts", cfg.worker_index, cfg.num_workers
                )
            prompts = cycle_prompts(shard, cfg.epochs, self._shuffle_seed())
        metrics_server = None
        if cfg.metrics_port:
            metrics_server, _ = start_http_server(cfg.metrics_port, registry=self.metrics.registry)
        start = time.monotonic()
        try:
            self.prepare()
            if self.make_env is not None:
                self._loop(iter(prompts), start)
            else:
                self._pipeline(iter(prompts), start)
        except Stopped:
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

    def _pipeline(self, prompts: Iterator[Prompt], start: float) -> None:
        """Prompt tasks: sample by sample. Each of a group's G samples is its own n = 1 generate, scored by
        the teacher as soon as it finishes (`_run_sample`); the group's last sample writes the record.
        Samples are admitted in prompt order while the tokens in flight (prompt + max_new_tokens each) stay
        within max_tokens_in_flight (0: while fewer than concurrency x group_size samples are in flight);
        one sample is always admitted when none is in flight. A stop starts no new group but finishes the
        samples of the groups already started."""
        cfg = self.cfg
        budget = cfg.max_tokens_in_flight
        max_samples = (
            cfg.concurrency * cfg.group_size if budget == 0 else max(1, budget // (cfg.max_new_tokens + 1))
        )
        in_flight: dict[Future, int] = {}  # sample -> the tokens it was admitted with
        tokens = 0
        group: _Group | None = None  # the group whose samples are being admitted
        exhausted = False
        last_log, last_totals = start, dict(self.totals)
        with ThreadPoolExecutor(max_samples, thread_name_prefix="rollout") as pool:
            try:
                while True:
                    while True:
                        if group is not None and group.failed is not None and not group.closed:
                            if group.close():  # admit no more of a failed group
                                self._finish(group)
                        if group is None or group.closed:
                            group = None
                            if (
                                self.stop_event.is_set()
                                or exhausted
                                or len(in_flight) >= max_samples
                                or (
                                    cfg.max_records
                                    and self.totals["records"] + self._open_groups >= cfg.max_records
                                )
                            ):
                                break
                            prompt = next(prompts, None)
                            if prompt is None:
                                exhausted = True
                                break
                            group = _Group(
                                prompt,
                                self.next_record_id(),
                                self._group_seed(prompt),
                                cfg.group_size,
                                self._prompt_cost(prompt),
                            )
                            with self._lock:
                                self._open_groups += 1
                        cost = group.cost
                        if in_flight and (
                            len(in_flight) >= max_samples or (budget and tokens + cost > budget)
                        ):
                            break
                        index = group.admit()
                        in_flight[pool.submit(self._run_sample, group, index)] = cost
                        tokens += cost
                    self.metrics.tokens_in_flight.set(tokens)
                    if not in_flight:
                        break
                    done, _ = wait(list(in_flight), timeout=0.5, return_when=FIRST_COMPLETED)
                    for f in done:
                        tokens -= in_flight.pop(f)
                        f.result()  # re-raise a fatal error from the pool thread
                    now = time.monotonic()
                    if now - last_log >= cfg.log_interval_s:
                        self._log_progress(now - last_log, last_totals, len(in_flight))
                        last_log, last_totals = now, dict(self.totals)
            except BaseException:
                # Let the other in-flight samples finish (or drop) quickly before the pool joins them.
                self.stop_event.set()
                raise

    def _loop(self, prompts: Iterator[Prompt], start: float) -> None:
        """Environment tasks: `concurrency` whole groups (run_one) in flight."""
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
        backlog = self.sink.backlog()
        if backlog is not None:
            self.metrics.backlog.set(backlog)
        t = self.totals
        log.info(
            "records %d (%.2f/s) tokens %.0f/s backlog %s in_flight %d bad %d",
            t["records"],
            (t["records"] - before["records"]) / dt,
            (t["tokens"] - before["tokens"]) / dt,
            "?" if backlog is None else backlog,
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


@dataclass
class _Done:
    """One finished sample of a group: its generate response's parts and its teacher scores (None for an
    empty completion, which is not scored)."""

    prompt_ids: list[int]
    sample: Sample
    scored: ScoredRows | None
    candidates: np.ndarray | None


class _Skipped(Exception):
    """A sample not generated because its group had already failed."""


class _Group:
    """One prompt's G samples in the pipelined loop. The loop admits them in order (`admit`, `close`); pool
    threads resolve them; whoever resolves the last admitted sample of a closed group finishes it, once."""

    def __init__(self, prompt: Prompt, record_id: str, seed: int, size: int, cost: int):
        self.prompt, self.record_id, self.seed, self.size = prompt, record_id, seed, size
        self.cost = cost  # tokens one sample holds in flight; exact once a response gave the prompt ids
        self.done: list[_Done | None] = [None] * size
        self.failed: BaseException | None = None  # the first failure: a stop or a rejected prompt
        self.admitted = 0
        self.closed = False  # no more samples will be admitted
        self._resolved = 0
        self._finished = False
        self._lock = threading.Lock()

    def admit(self) -> int:
        with self._lock:
            index = self.admitted
            self.admitted += 1
            self.closed = self.admitted == self.size
            return index

    def close(self) -> bool:
        """Admit no more samples; True when the caller is to finish the group now."""
        with self._lock:
            self.closed = True
            return self._take_finish()

    def resolve(self, index: int, done: _Done | None) -> bool:
        with self._lock:
            self.done[index] = done
            self._resolved += 1
            return self._take_finish()

    def fail(self, index: int, error: BaseException) -> bool:
        with self._lock:
            if self.failed is None:
                self.failed = error
            self._resolved += 1
            return self._take_finish()

    def _take_finish(self) -> bool:
        if self.closed and self._resolved == self.admitted and not self._finished:
            self._finished = True
            return True
        return False
