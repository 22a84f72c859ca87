"""Configuration of the trainer (`opd train`): one typed class; flags, env vars and TOML derive from it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from services.common.config import WEIGHTS_TOKEN_ENV, ConfigBase, ConfigError, Layers, load, opt
from services.common.experience import SUPPORTS
from services.common.tasks import load_tasks
from services.common.token_aliases import parse_aliases
from services.common.verifiers import VERIFIERS
from trainer.schedule import SCHEDULES

OBJECTIVES = ("lsm", "sampled_token", "gamma", "full_kl")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
PUSH_DTYPES = ("auto", *DTYPES)
PUSH_MODES = ("http", "shared", "collective")
COLLECTIVE_BACKENDS = ("auto", "gloo", "nccl")
PARALLELISMS = ("replicate", "fsdp")
CHECKPOINTING = ("auto", "on", "off")
SWITCHES = ("auto", "on", "off")
SAMPLED_TOKEN_OBJECTIVES = ("sampled_token", "gamma")


@dataclass
class TrainerConfig(ConfigBase):
    """Trainer: consumes experience from Redis, trains the student, pushes weights, checkpoints, evaluates."""

    SECTION: ClassVar[str] = "trainer"
    ENV_PREFIX: ClassVar[str] = "OPD_TRAINER_"

    # --- model
    model: str = opt("", "student: Hugging Face hub id or local path (also the start point of training)")
    tokenizer: str = opt("", "tokenizer hub id or path (empty = the model's)")
    device: str = opt("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda")
    dtype: str = opt(
        "float32", "master weights and optimizer state: float32 (bfloat16 is refused; use compute_dtype)"
    )
    compute_dtype: str = opt(
        "float32", "matmul dtype: float32, or bfloat16 (fp32 master weights, fp32 gradient reduction)"
    )
    parallelism: str = opt(
        "replicate", "replicate: a whole student per rank; fsdp: FSDP2, parameters/grads/optimizer sharded"
    )
    activation_checkpointing: str = opt(
        "auto", "recompute each decoder layer in backward: on, off, auto (on from 1B parameters)"
    )
    max_seq_len: int = opt(16384, "longest prompt + completion trained on; longer completions are cut")
    max_tokens_per_micro_batch: int = opt(
        0, "split each rank's share of a mini-batch into micro-batches of at most this many tokens (0 = off)"
    )
    pack_sequences: bool = opt(False, "pack a micro-batch's sequences into one row (no padding)")
    chunk_size: int = opt(1024, "positions per chunk in the LM-head kernels (trainer/heads.py)")
    seed: int = opt(0, "seed for torch, numpy and python RNGs")

    # --- data
    redis_url: str = opt("redis://127.0.0.1:6379/0", "Redis holding the experience stream")
    run: str = opt("default", "run name: the Redis keys are opd:<run>:...")
    consumer: str = opt("trainer-0", "consumer name in group 'trainers'; keep it stable across restarts")
    batch_size: int = opt(128, "sequences per batch (records are read whole until at least this many)")
    mini_batch_size: int = opt(64, "sequences per optimizer step; a batch gives ceil(batch/mini) steps")
    max_policy_lag: int = opt(1, "drop records with policy_version < current - max_policy_lag (counted)")
    read_block_ms: int = opt(1000, "XREADGROUP block time per call, ms")
    idle_timeout_s: float = opt(0.0, "stop when no experience arrives for this long (0 = wait forever)")
    max_batches: int = opt(0, "stop after this many batches in total, resumes included (0 = no limit)")
    claim_orphans_idle_ms: int = opt(
        0,
        "on start, XAUTOCLAIM entries other consumers left pending this long, ms (0 = off; see consumer.py)",
    )

    # --- tasks (services/common/tasks.py, docs/tasks.md)
    tasks_file: str = opt(
        "",
        "TOML file with [tasks.<name>] tables (empty = one task); `opd train --config F` uses F if it has any",
    )
    task_schedule: str = opt(
        "alternate", "with tasks: alternate = one task per batch in turn (the paper's); mix = by task weight"
    )

    # --- objective
    objective: str = opt("lsm", f"loss: one of {OBJECTIVES}")
    support: str = opt("teacher_topk", f"lsm support variant: one of {SUPPORTS}")
    top_k: int = opt(16, "support size K (the record must hold at least K teacher/behaviour ids)")
    renormalize: bool = opt(True, "lsm: renormalise both distributions inside the support (off = ablation)")
    gamma: float = opt(1.0, "objective 'gamma': discount of the return-to-go (0 = token-level OPD)")
    clip_low: float = opt(0.2, "PPO ratio clip below 1 (sampled_token, gamma)")
    clip_high: float = opt(0.2, "PPO ratio clip above 1 (sampled_token, gamma)")
    recompute_old_logprobs: str = opt(
        "auto",
        "PPO old policy: on = the trainer's model before the batch's first update (ratio 1 at the first "
        "step), off = the rollout's logprobs, auto = on for sampled_token/gamma, off for lsm/full_kl",
    )
    special_token_masking: bool = opt(
        True, "special-token masking on/off; its two parts: mask_special_positions, mask_special_support"
    )
    mask_special_positions: bool = opt(True, "masking drops positions whose sampled token is a masked id")
    mask_special_support: bool = opt(True, "masking drops the masked ids from every support")
    masked_token_ids: list[int] = opt(
        [], "ids to mask (empty = the special ids the student and teacher tokenizers disagree on)"
    )
    token_aliases: list[Any] = opt(
        [],
        "special-token aliases [[student, teacher], ...] as the worker's (docs/aliases.md); flag/env: JSON",
    )
    teacher_tokenizer: str = opt(
        "",
        "teacher tokenizer: resolves token_aliases strings and the default masked ids "
        "(empty = the student's, i.e. the two agree on every special token)",
    )

    # --- optimizer
    lr: float = opt(2e-6, "AdamW peak learning rate")
    lr_warmup_batches: int = opt(0, "linear warmup from 0 to lr over the first batches (0 = none)")
    lr_decay: str = opt("constant", "after warmup: constant, or cosine to lr_min_ratio * lr at max_batches")
    lr_min_ratio: float = opt(0.1, "cosine decay floor as a fraction of lr")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")

    # --- weight push
    push_every: int = opt(1, "push weights and bump the policy version every N batches (0 = never)")
    push_mode: str = opt(
        "http",
        "http: PUT safetensors to each rollout; shared: write a file, POST its path; collective: one broadcast "
        "to every rollout over a torch.distributed group (docs/rollout.md)",
    )
    rollout_urls: list[str] = opt([], "rollout services to push to (empty = only bump the version in Redis)")
    shared_weights_dir: str = opt("", "push_mode=shared: directory the rollout services can read")
    weights_token_file: str = opt(
        "", f"file with the weight-update bearer token (default: env {WEIGHTS_TOKEN_ENV})"
    )
    rollout_tls_ca_file: str = opt("", "CA bundle for https:// rollout_urls/eval_url (empty = system CAs)")
    push_timeout_s: float = opt(300.0, "HTTP timeout of one weight push or load")
    push_dtype: str = opt(
        "auto", "dtype of pushed weights, the rollout's serving dtype (auto = compute_dtype)"
    )
    collective_addr: str = opt(
        "",
        "push_mode=collective: address the group's store binds and the rollouts dial (empty = the local "
        "address that routes to the first rollout)",
    )
    collective_port: int = opt(0, "push_mode=collective: the store's port (0 = any free port)")
    collective_backend: str = opt(
        "auto", "push_mode=collective: gloo, nccl, or auto (nccl when the trainer runs on CUDA, else gloo)"
    )
    collective_timeout_s: float = opt(
        120.0, "push_mode=collective: rendezvous and per-transfer timeout; a stalled replica fails the push"
    )
    collective_bucket_mb: int = opt(
        64, "push_mode=collective: small tensors travel packed in buckets of this size"
    )

    # --- checkpoint
    checkpoint_dir: str = opt("runs/trainer", "checkpoints and the commit log live here")
    checkpoint_every: int = opt(
        1, "checkpoint every N batches; entries are acked only after their checkpoint"
    )
    checkpoint_async: bool = opt(True, "write checkpoints in the background while training continues")
    keep_checkpoints: int = opt(2, "how many checkpoints to keep")
    resume: bool = opt(False, "continue from the latest checkpoint in checkpoint_dir")

    # --- metrics
    log_dir: str = opt("", "metrics.jsonl and TensorBoard events (empty = <checkpoint_dir>/logs)")
    tensorboard: bool = opt(True, "also write TensorBoard events")
    diagnostics_every: int = opt(1, "entropy / support-mass / gap diagnostics every N batches (0 = never)")
    grad_variance_every: int = opt(0, "gradient-variance estimate every N batches (0 = never)")
    grad_variance_micro: int = opt(4, "micro-batches M for the gradient-variance estimate")
    progress: bool = opt(True, "show a rich progress bar")

    # --- eval
    eval_every: int = opt(0, "evaluate every N batches through the rollout service (0 = never)")
    eval_file: str = opt("", "held-out prompts (JSONL/Parquet with `prompt` or `messages`, and `answer`)")
    eval_url: str = opt("", "rollout service for eval (empty = the first of rollout_urls)")
    eval_n: int = opt(1, "samples per prompt (avg@n)")
    eval_greedy: bool = opt(True, "greedy decoding for pass@1 (top_p -> 0); off = sample at eval_top_p")
    eval_temperature: float = opt(1.0, "eval sampling temperature")
    eval_top_p: float = opt(0.9, "eval nucleus mass when sampling")
    eval_max_new_tokens: int = opt(256, "eval completion length")
    eval_max_prompts: int = opt(0, "evaluate only the first N prompts (0 = all)")
    eval_verifier: str = opt("exact_match", f"answer checker: one of {VERIFIERS}")
    eval_chat_template: bool = opt(False, "wrap `prompt` texts in the chat template")
    val_file: str = opt(
        "", "validation prompts, disjoint from eval_file, evaluated with it (val/...) to select checkpoints"
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: required (a hub id or a local path)")
        if not self.run or ":" in self.run:
            raise ConfigError(f"run: {self.run!r} must be non-empty without ':'")
        if not self.consumer:
            raise ConfigError("consumer: must be non-empty")
        if self.device not in DEVICES:
            raise ConfigError(f"device: {self.device!r} is not one of {DEVICES}")
        if self.dtype == "bfloat16":
            raise ConfigError(
                "dtype: bfloat16 master weights lose every AdamW update smaller than 1/256 of a weight "
                "(at lr 2e-6, most of them, and all of those near 1.0 such as norm weights): keep "
                'dtype = "float32" and set compute_dtype = "bfloat16" for bf16 matmuls'
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {DTYPES}")
        if self.compute_dtype not in DTYPES:
            raise ConfigError(f"compute_dtype: {self.compute_dtype!r} is not one of {DTYPES}")
        if self.push_dtype not in PUSH_DTYPES:
            raise ConfigError(f"push_dtype: {self.push_dtype!r} is not one of {PUSH_DTYPES}")
        if self.parallelism not in PARALLELISMS:
            raise ConfigError(f"parallelism: {self.parallelism!r} is not one of {PARALLELISMS}")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ConfigError(
                f"activation_checkpointing: {self.activation_checkpointing!r} is not one of {CHECKPOINTING}"
            )
        if self.parallelism == "fsdp" and self.grad_variance_every:
            raise ConfigError(
                "grad_variance_every: the gradient-variance estimate reads the whole LM head on rank 0; "
                "it needs parallelism = 'replicate' (set grad_variance_every = 0 with fsdp)"
            )
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective: {self.objective!r} is not one of {OBJECTIVES}")
        if self.support not in SUPPORTS:
            raise ConfigError(f"support: {self.support!r} is not one of {SUPPORTS}")
        if self.push_mode not in PUSH_MODES:
            raise ConfigError(f"push_mode: {self.push_mode!r} is not one of {PUSH_MODES}")
        if self.collective_backend not in COLLECTIVE_BACKENDS:
            raise ConfigError(
                f"collective_backend: {self.collective_backend!r} is not one of {COLLECTIVE_BACKENDS}"
            )
        if not 0 <= self.collective_port <= 65535:
            raise ConfigError(f"collective_port: {self.collective_port} is outside [0, 65535]")
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"collective_timeout_s: {self.collective_timeout_s} <= 0")
        if not 1 <= self.collective_bucket_mb <= 16384:
            raise ConfigError(f"collective_bucket_mb: {self.collective_bucket_mb} is outside [1, 16384]")
        if self.eval_verifier not in VERIFIERS:
            raise ConfigError(f"eval_verifier: {self.eval_verifier!r} is not one of {VERIFIERS}")
        for name in (
            "batch_size",
            "mini_batch_size",
            "top_k",
            "chunk_size",
            "max_seq_len",
            "grad_variance_micro",
            "keep_checkpoints",
            "eval_n",
            "eval_max_new_tokens",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} < 1")
        for name in (
            "max_policy_lag",
            "push_every",
            "max_batches",
            "eval_every",
            "diagnostics_every",
            "grad_variance_every",
            "read_block_ms",
            "claim_orphans_idle_ms",
            "eval_max_prompts",
            "max_tokens_per_micro_batch",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: {getattr(self, name)} < 0")
        if self.mini_batch_size > self.batch_size:
            raise ConfigError(f"mini_batch_size: {self.mini_batch_size} > batch_size {self.batch_size}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma: {self.gamma} is outside [0, 1]")
        if self.clip_low < 0 or self.clip_high < 0 or self.clip_low >= 1:
            raise ConfigError(
                f"clip_low/clip_high: ({self.clip_low}, {self.clip_high}) need 0 <= low < 1, high >= 0"
            )
        if self.lr <= 0:
            raise ConfigError(f"lr: {self.lr} <= 0")
        if self.lr_warmup_batches < 0 or not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ConfigError(f"lr_warmup_batches/lr_min_ratio: {self.lr_warmup_batches}/{self.lr_min_ratio}")
        if self.lr_decay not in ("constant", "cosine"):
            raise ConfigError(f"lr_decay: {self.lr_decay!r} is not one of ('constant', 'cosine')")
        if self.lr_decay == "cosine" and not self.max_batches:
            raise ConfigError("lr_decay: cosine needs max_batches (the end of the schedule)")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip: {self.grad_clip} < 0")
        if self.idle_timeout_s < 0:
            raise ConfigError(f"idle_timeout_s: {self.idle_timeout_s} < 0")
        if self.push_mode == "shared" and self.rollout_urls and not self.shared_weights_dir:
            raise ConfigError("shared_weights_dir: required with push_mode='shared' and rollout_urls")
        if self.objective == "full_kl" and self.support != "teacher_topk":
            raise ConfigError(
                f"support: full_kl reads the teacher's ids as given; use teacher_topk, not {self.support!r}"
            )
        specs = parse_aliases(self.token_aliases)
        if self.objective == "full_kl" and any(isinstance(sp.teacher, tuple) for sp in specs):
            raise ConfigError("token_aliases: multi-token spellings are not supported with objective full_kl")
        if self.recompute_old_logprobs not in SWITCHES:
            raise ConfigError(
                f"recompute_old_logprobs: {self.recompute_old_logprobs!r} is not one of {SWITCHES}"
            )
        if self.task_schedule not in SCHEDULES:
            raise ConfigError(f"task_schedule: {self.task_schedule!r} is not one of {SCHEDULES}")
        # Not a field: the tasks are the file's [tasks.*] tables, read once here (one source of truth).
        self.tasks = load_tasks(self.tasks_file)
        for t in self.tasks:
            if t.eval_file and t.resolved_eval_verifier not in VERIFIERS:
                raise ConfigError(
                    f"tasks.{t.name}.eval_verifier: {t.resolved_eval_verifier!r} not in {VERIFIERS}"
                )
        if self.eval_every and not self.eval_file and not self.tasks:
            raise ConfigError(f"eval_file: required with eval_every={self.eval_every}")
        if self.eval_every and self.tasks and not any(t.eval_file or t.eval_episodes for t in self.tasks):
            raise ConfigError(f"eval_every={self.eval_every}: no task has eval_file or eval_episodes")
        if self.eval_every and not (self.eval_url or self.rollout_urls):
            raise ConfigError("eval_url: eval needs a rollout service (eval_url or rollout_urls)")
        if self.weights_token_file and not Path(self.weights_token_file).is_file():
            raise ConfigError(f"weights_token_file: {self.weights_token_file!r} is not a file")
        if not 0.0 < self.eval_top_p <= 1.0 or self.eval_temperature <= 0:
            raise ConfigError(
                f"eval_top_p/eval_temperature: ({self.eval_top_p}, {self.eval_temperature}) invalid"
            )

    @property
    def recompute_old(self) -> bool:
        """Whether the PPO old policy is the trainer's own model before the batch's first update."""
        if self.recompute_old_logprobs == "auto":
            return self.objective in SAMPLED_TOKEN_OBJECTIVES
        return self.recompute_old_logprobs == "on"

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps per batch: ceil(batch_size / mini_batch_size), whatever the batch's exact size."""
        return -(-self.batch_size // self.mini_batch_size)

    @property
    def metrics_dir(self) -> Path:
        return Path(self.log_dir) if self.log_dir else Path(self.checkpoint_dir) / "logs"

    def resolve_token(self) -> str | None:
        """The weight-update token: the first line of `weights_token_file`, else $OPD_WEIGHTS_TOKEN."""
        if self.weights_token_file:
            return Path(self.weights_token_file).read_text().strip() or None
        return os.environ.get(WEIGHTS_TOKEN_ENV) or None


def tasks_overlay(layers: Layers) -> dict[str, Any]:
    """`opd train --config F`: the tasks are F's own [tasks.*] tables unless [trainer] names another file."""
    if layers.path is not None and "tasks_file" not in layers.toml:
        return {"tasks_file": str(layers.path)}
    return {}


def load_config(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> TrainerConfig:
    return load(TrainerConfig, argv, tasks_overlay, env=env, prog="opd train")
