"""Prometheus metrics of the rollout service, on a per-app registry (several apps may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.rollout.protocol import GenerateResponse, WeightInfo


class RolloutMetrics:
    """Request counts, generated tokens (tokens/s = rate of the counter), latency, the served version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "opd_rollout_requests", "HTTP requests by route and status code", ["route", "code"], registry=r
        )
        self.prompt_tokens = Counter(
            "opd_rollout_prompt_tokens", "prompt tokens of served requests", registry=r
        )
        self.generated_tokens = Counter(
            "opd_rollout_generated_tokens", "completion tokens generated", registry=r
        )
        self.samples = Counter(
            "opd_rollout_samples", "completions generated, by finish reason", ["reason"], registry=r
        )
        self.abandoned = Counter(
            "opd_rollout_abandoned_requests",
            "/v1/generate requests whose client disconnected before the answer: generation stopped",
            registry=r,
        )
        self.generate_latency = Histogram(
            "opd_rollout_generate_latency_seconds",
            "latency of successful /v1/generate requests",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.weight_swap_seconds = Histogram(
            "opd_rollout_weight_update_seconds",
            "successful weight updates: validation + swap, after the body is received",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.policy_version = Gauge("opd_rollout_policy_version", "version of the served weights", registry=r)
        self.ready = Gauge("opd_rollout_ready", "1 when the model is loaded and serving", registry=r)

    def observe_generate(self, resp: GenerateResponse, seconds: float) -> None:
        self.generate_latency.observe(seconds)
        self.prompt_tokens.inc(sum(len(p) for p in resp.prompt_ids))
        self.generated_tokens.inc(sum(len(s.token_ids) for s in resp.samples))
        for s in resp.samples:
            self.samples.labels(s.finish_reason).inc()

    def observe_swap(self, info: WeightInfo, seconds: float) -> None:
        self.weight_swap_seconds.observe(seconds)
        self.policy_version.set(info.version)

    def render(self) -> bytes:
        return generate_latest(self.registry)
