"""Teacher service configuration (`opd teacher serve`, env prefix OPD_TEACHER_, TOML section [teacher])."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from services.common.config import ConfigBase, ConfigError, load, opt

BACKENDS = ("hf", "vllm")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
VLLM_STEP_TOKENS = 4096  # default tokens per vLLM engine step: 4096 x 152K vocab x 7 B = 4.4 GB of log-probs


@dataclass
class TeacherConfig(ConfigBase):
    """Teacher gRPC service: top-K next-token log-probabilities of a causal LM."""

    SECTION: ClassVar[str] = "teacher"
    ENV_PREFIX: ClassVar[str] = "OPD_TEACHER_"

    model: str = opt("", "model path or Hugging Face hub id (required)")
    model_id: str = opt("", "name reported in GetInfo/ScoreResponse (default: `model`)")
    backend: str = opt("hf", "scoring backend: hf (transformers) or vllm (prompt_logprobs)")
    host: str = opt("127.0.0.1", "interface to bind; 0.0.0.0 or [::] in containers")
    port: int = opt(50051, "gRPC port (0 = any free port)")
    device: str = opt("auto", "hf backend device: auto (cuda if available), cpu or cuda[:N]")
    dtype: str = opt(
        "auto", "weights dtype: auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16"
    )
    max_top_k: int = opt(64, "largest top_k a request may ask for")
    max_candidates: int = opt(256, "largest CandidateIds.per_row a request may carry")
    max_sequence_tokens: int = opt(8192, "longest sequence (tokens) accepted")
    max_request_tokens: int = opt(65536, "most tokens (summed over sequences) in one request")
    max_batch_tokens: int = opt(16384, "token budget of one forward (padded rows x longest sequence for hf)")
    batch_window_ms: float = opt(5.0, "how long an idle batcher waits for more requests before a forward")
    max_queue: int = opt(64, "requests admitted and not yet answered; beyond it RESOURCE_EXHAUSTED")
    row_chunk: int = opt(
        0,
        "hf: rows per LM-head chunk, the rows of one [rows, V] log-prob buffer (0 = 256 MiB of float32 "
        "logits per chunk)",
    )
    prefix_reuse: bool = opt(
        True,
        "sequences that share their first score_from tokens (the G samples of a group) compute that prompt "
        "once: hf from one KV cache per forward, vllm from its prefix cache",
    )
    tensor_parallel_size: int = opt(1, "vllm: GPUs per model replica for tensor parallelism (hf: 1 only)")
    pipeline_parallel_size: int = opt(1, "vllm: pipeline stages (GPUs per replica = tp x pp; hf: 1 only)")
    vllm_max_num_batched_tokens: int = opt(
        0,
        "vllm: tokens per engine step (chunked prefill); bounds the per-step prompt-logprob buffers "
        f"(0 = min(max_batch_tokens, {VLLM_STEP_TOKENS}))",
    )
    logprob_memory_budget_gib: float = opt(
        0.0,
        "memory the log-prob buffers of one forward may take, checked at startup (0 = measure after the "
        "model loads: free memory of the GPUs, or available RAM on the CPU)",
    )
    token: str | None = opt(None, "bearer token required in metadata `authorization` (default: no auth)")
    token_file: str | None = opt(None, "file holding the bearer token (alternative to `token`)")
    tokens_file: str | None = opt(
        None,
        "file of named client tokens, one `name token [max_inflight=N]` per line (# comments); re-read "
        "when it changes (checked at most once a second) or on SIGHUP; may be combined with `token`, whose "
        "client is named default",
    )
    max_client_inflight: int = opt(
        0,
        "requests one client may have admitted and unanswered, beyond it RESOURCE_EXHAUSTED (0 = max_queue: "
        "only the global limit); the tokens file may set max_inflight per client",
    )
    tls_cert_file: str | None = opt(None, "PEM certificate chain; with tls_key_file enables TLS")
    tls_key_file: str | None = opt(None, "PEM private key for tls_cert_file")
    metrics_port: int = opt(0, "Prometheus /metrics port on `host` (0 = off)")
    max_connection_age_s: float = opt(
        300.0, "close client connections after this age so clients see new pods"
    )
    grace_s: float = opt(30.0, "drain: how long in-flight requests may take to finish on shutdown")
    threads: int = opt(0, "gRPC handler threads (0 = max_queue + 8, so health checks never starve)")
    vllm_gpu_memory_utilization: float = opt(
        0.9, "vllm: share of device memory (RAM on CPU) for weights + KV"
    )
    vllm_enforce_eager: bool = opt(False, "vllm: disable CUDA graphs / compilation (faster start)")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: required (a path or a Hugging Face hub id)")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        if self.device.split(":")[0] not in DEVICES:
            raise ConfigError(f"device: expected one of {DEVICES} (cuda may carry :N), got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: expected 0..65535, got {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: expected 0..65535, got {self.metrics_port}")
        for name in (
            "max_top_k",
            "max_candidates",
            "max_sequence_tokens",
            "max_request_tokens",
            "max_batch_tokens",
            "max_queue",
            "tensor_parallel_size",
            "pipeline_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_sequence_tokens < 2:
            raise ConfigError(f"max_sequence_tokens: must be >= 2, got {self.max_sequence_tokens}")
        # A sequence is the unit of a forward: it must fit one batch and one request, so that any request
        # within the limits is split into forwards instead of being rejected.
        if self.max_sequence_tokens > self.max_batch_tokens:
            raise ConfigError(
                f"max_sequence_tokens={self.max_sequence_tokens} exceeds max_batch_tokens={self.max_batch_tokens}"
            )
        if self.max_sequence_tokens > self.max_request_tokens:
            raise ConfigError(
                f"max_sequence_tokens={self.max_sequence_tokens} exceeds "
                f"max_request_tokens={self.max_request_tokens}"
            )
        if self.batch_window_ms < 0:
            raise ConfigError(f"batch_window_ms: must be >= 0, got {self.batch_window_ms}")
        if self.backend == "hf":
            for name in ("tensor_parallel_size", "pipeline_parallel_size"):
                if getattr(self, name) > 1:
                    raise ConfigError(
                        f"{name}={getattr(self, name)}: the hf backend runs one model on one device; "
                        "use backend=vllm for tensor or pipeline parallelism"
                    )
        if self.vllm_max_num_batched_tokens < 0:
            raise ConfigError(
                f"vllm_max_num_batched_tokens: must be >= 0, got {self.vllm_max_num_batched_tokens}"
            )
        if not (self.logprob_memory_budget_gib >= 0 and math.isfinite(self.logprob_memory_budget_gib)):
            raise ConfigError(
                f"logprob_memory_budget_gib: must be >= 0, got {self.logprob_memory_budget_gib}"
            )
        if self.max_client_inflight < 0:
            raise ConfigError(f"max_client_inflight: must be >= 0, got {self.max_client_inflight}")
        if self.row_chunk < 0 or self.threads < 0:
            raise ConfigError(f"row_chunk/threads: must be >= 0, got {self.row_chunk}/{self.threads}")
        if self.max_connection_age_s < 0 or self.grace_s < 0:
            raise ConfigError(
                f"max_connection_age_s/grace_s: must be >= 0, got {self.max_connection_age_s}/{self.grace_s}"
            )
        if self.token is not None and self.token_file is not None:
            raise ConfigError("token and token_file: give at most one")
        if self.token is not None and not self.token.strip():
            raise ConfigError("token: must not be empty")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file: give both or neither")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"vllm_gpu_memory_utilization: expected (0, 1], got {self.vllm_gpu_memory_utilization}"
            )

    @property
    def served_model_id(self) -> str:
        return self.model_id or self.model

    @property
    def vllm_step_tokens(self) -> int:
        """vLLM's max_num_batched_tokens: the most tokens (and prompt-logprob rows) of one engine step."""
        return self.vllm_max_num_batched_tokens or min(self.max_batch_tokens, VLLM_STEP_TOKENS)

    def bearer_token(self) -> str | None:
        """The configured token (read from token_file if given), stripped; None when auth is off."""
        if self.token_file is not None:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as e:
                raise ConfigError(f"token_file: {self.token_file}: {e.strerror}") from e
            if not token:
                raise ConfigError(f"token_file: {self.token_file} is empty")
            return token
        return self.token.strip() if self.token is not None else None


def load_config(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> TeacherConfig:
    return load(TeacherConfig, argv, env=env, prog="opd teacher serve")
