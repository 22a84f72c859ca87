"""Configuration of the rollout HTTP service (`opd rollout serve`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from services.common.config import WEIGHTS_TOKEN_ENV, ConfigBase, ConfigError, load, opt

BACKENDS = ("hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class RolloutConfig(ConfigBase):
    """Rollout service: samples completions from the student and accepts versioned weight updates."""

    SECTION: ClassVar[str] = "rollout"
    ENV_PREFIX: ClassVar[str] = "OPD_ROLLOUT_"

    model: str = opt("", "Hugging Face hub id or local path of the student model")
    backend: str = opt("hf", "generation backend: hf (PyTorch loop, any device) or vllm")
    host: str = opt("127.0.0.1", "address to bind")
    port: int = opt(8000, "HTTP port (0 = any free port)")
    device: str = opt("auto", "hf backend: torch device (auto = cuda if available, else cpu)")
    dtype: str = opt("auto", "weights dtype: auto (the checkpoint's), float32, bfloat16, float16")
    seed: int = opt(0, "base seed for requests without a seed (and vLLM's engine seed)")
    max_model_len: int = opt(0, "longest prompt + completion in tokens (0 = the model's maximum)")
    max_batch_size: int = opt(64, "sequences decoded together (hf: rows per batch; vllm: max_num_seqs)")
    token: str | None = opt(
        None, f"weight-update bearer token (prefer env {WEIGHTS_TOKEN_ENV} or --token-file)"
    )
    token_file: str | None = opt(None, "file holding the weight-update bearer token")
    tls_cert_file: str | None = opt(None, "PEM certificate chain; with tls_key_file the service speaks HTTPS")
    tls_key_file: str | None = opt(None, "PEM private key for tls_cert_file")
    insecure_no_token: bool = opt(False, "accept weight updates without a token (local demo only)")
    weights_dir: str | None = opt(None, "POST /v1/weights/load accepts only paths under this directory")
    max_weights_bytes: int = opt(32 << 30, "largest accepted PUT /v1/weights body, bytes (413 above)")
    max_request_bytes: int = opt(64 << 20, "largest accepted body of any other request, bytes (413 above)")
    vllm_gpu_memory_utilization: float = opt(0.9, "vllm: share of accelerator memory (of RAM on CPU) to use")
    vllm_enforce_eager: bool = opt(False, "vllm: no CUDA graphs / compilation (faster start, slower decode)")
    initial_version: int = opt(0, "policy version of the weights loaded at start")
    resume_from: str | None = opt(
        None,
        "trainer checkpoint_dir or shared_weights_dir: at start, serve the newest trainer weights found there "
        "at their policy version (not ready until loaded; a restart mid-run never serves the initial weights)",
    )
    trust_remote_code: bool = opt(False, "allow model code from the hub (only for models you trust)")
    log_level: str = opt("info", "uvicorn log level")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: required (a hub id or a local path)")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: {self.backend!r} is not one of {BACKENDS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {DTYPES}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is outside [0, 65535]")
        if self.max_model_len < 0:
            raise ConfigError(f"max_model_len: {self.max_model_len} < 0")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size: {self.max_batch_size} < 1")
        if self.max_weights_bytes < 1 or self.max_request_bytes < 1:
            raise ConfigError(
                f"max_weights_bytes/max_request_bytes: {self.max_weights_bytes}/{self.max_request_bytes} < 1"
            )
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"vllm_gpu_memory_utilization: {self.vllm_gpu_memory_utilization} not in (0, 1]"
            )
        if self.initial_version < 0:
            raise ConfigError(f"initial_version: {self.initial_version} < 0")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file: give both or neither")
        for name in ("tls_cert_file", "tls_key_file"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).is_file():
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not a file")
        if self.token_file is not None and not Path(self.token_file).is_file():
            raise ConfigError(f"token_file: {self.token_file!r} is not a file")

    def resolve_token(self) -> str | None:
        """The weight-update token: `token`, else $OPD_WEIGHTS_TOKEN, else the first line of `token_file`."""
        token = self.token or os.environ.get(WEIGHTS_TOKEN_ENV) or None
        if token is None and self.token_file is not None:
            token = Path(self.token_file).read_text().strip() or None
        return token


def load_config(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> RolloutConfig:
    return load(RolloutConfig, argv, env=env, prog="opd rollout serve")
