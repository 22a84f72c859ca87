"""Prometheus metrics of a rollout worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.generate_s = Histogram(
            "opd_worker_generate_seconds",
            "rollout generate latency (one sample; a group for envs)",
            registry=r,
        )
        self.score_s = Histogram(
            "opd_worker_score_seconds", "teacher score latency (one sample; a group for envs)", registry=r
        )
        self.tokens_in_flight = Gauge(
            "opd_worker_tokens_in_flight", "prompt + max_new_tokens of the samples in flight", registry=r
        )
        self.reward = Histogram(
            "opd_worker_reward",
            "verifier rewards, strict (0 unless the sample ends with the student's own end marker)",
            buckets=(0.0, 0.5, 1.0),
            registry=r,
        )
        self.reward_lenient = Histogram(
            "opd_worker_reward_lenient",
            "verifier rewards of the answer cut at either model's end marker",
            buckets=(0.0, 0.5, 1.0),
            registry=r,
        )
