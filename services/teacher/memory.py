"""The startup check on the log-prob buffers of one forward: [rows, V] tensors no memory profiler counts.

Scoring turns hidden states into full-vocabulary log-probabilities before it keeps the top-K of each row.
Those [rows, V] tensors are the largest transient of a forward at a large vocabulary (V = 152K for Qwen2.5:
4096 rows take 2.5 GB in float32 alone), and neither backend's own memory accounting sees them:

  hf    the LM head runs on `row_chunk` scored rows at a time. Per chunk: the head's output in the model
        dtype while it is cast to float32 (dtype + 4 bytes an entry), then the float32 logits plus one
        float32 temporary of the log-sum-exp (8 bytes): HF_BYTES_PER_ENTRY = 8 at float32 or bfloat16.
        rows = min(row_chunk, max_batch_tokens).
  vllm  model runner V1 (the CPU's, or CUDA's with VLLM_USE_V2_MODEL_RUNNER=0):
        `GPUModelRunner._get_prompt_logprobs_dict` (vllm/v1/worker/gpu_model_runner.py), once per engine
        step and request: `compute_logits` on the request's scheduled prompt rows (model dtype; with tensor
        parallelism the vocabulary shards are all-gathered into a second full copy),
        `Sampler.compute_logprobs` (float32 log_softmax, 4 bytes) and `Sampler.gather_logprobs` (top-K, plus
        the rank of the target from a [rows, V] boolean comparison, 1 byte). Rows in one step sum to at most
        max_num_batched_tokens (chunked prefill splits longer prompts over steps); vLLM's profiling run
        (`profile_run` -> `_dummy_sampler_run`) computes logits for max_num_seqs rows only, so the rest is
        not in its budget: bytes per entry = dtype (x 2 with TP) + 4 + 1, rows = max_num_batched_tokens.
        Model runner V2 (the default on CUDA with Triton): `PromptLogprobsWorker.compute_prompt_logprobs`
        -> `compute_prompt_logprobs_with_chunking` (vllm/v1/worker/gpu/sample/prompt_logprob.py) runs the
        head on 1024 rows at a time (CHUNK_SIZE) and takes the log-softmax in a Triton kernel without a
        float32 copy: bytes per entry = dtype (x 2 with TP), rows = min(1024, max_num_batched_tokens).

worst case = rows x V x bytes per entry, against the memory left once the model (and vLLM's KV cache) is
loaded, or a configured budget. A configuration that does not fit is refused with a ConfigError naming the
limit to lower, instead of an out-of-memory error on the first long request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.config import ConfigError

log = logging.getLogger(__name__)
GiB = 1 << 30
HF_BYTES_PER_ENTRY = 8
# vllm/v1/worker/gpu/sample/prompt_logprob.py CHUNK_SIZE: model runner V2 scores prompt rows 1024 at a time.
VLLM_V2_PROMPT_CHUNK = 1024


def vllm_bytes_per_entry(logit_bytes: int, tensor_parallel_size: int, v2_runner: bool = False) -> int:
    """V1: logits in the model dtype (a second copy when TP gathers the vocabulary shards), float32
    log-softmax, a boolean [rows, V] for the target's rank. V2: the logits only (its Triton kernel takes
    the log-sum-exp per row without a float32 copy)."""
    logits = logit_bytes * (2 if tensor_parallel_size > 1 else 1)
    return logits if v2_runner else logits + 4 + 1


@dataclass(frozen=True)
class LogprobBuffer:
    """The worst-case log-prob buffers of one forward, and the config field that bounds their rows."""

    rows: int
    vocab_size: int
    bytes_per_entry: int
    limit: str  # the config field to lower, e.g. "row_chunk" or "vllm_max_num_batched_tokens"

    @property
    def bytes(self) -> int:
        return self.rows * self.vocab_size * self.bytes_per_entry


def vllm_logprob_buffer(
    step_tokens: int, vocab_size: int, logit_bytes: int, tensor_parallel_size: int, v2_runner: bool
) -> LogprobBuffer:
    """The prompt-logprob buffers of one vLLM engine step of `step_tokens` (max_num_batched_tokens)."""
    rows = min(step_tokens, VLLM_V2_PROMPT_CHUNK) if v2_runner else step_tokens
    return LogprobBuffer(
        rows,
        vocab_size,
        vllm_bytes_per_entry(logit_bytes, tensor_parallel_size, v2_runner),
        "vllm_max_num_batched_tokens",
    )


def check_logprob_buffer(buffer: LogprobBuffer, available: int, source: str) -> None:
    """Raise ConfigError if `buffer` does not fit in `available` bytes (`source` says where that number
    comes from)."""
    if buffer.bytes <= available:
        log.info(
            "teacher: log-prob buffers up to %.2f GiB per forward (%d rows x %d x %d B), %.2f GiB available (%s)",
            buffer.bytes / GiB,
            buffer.rows,
            buffer.vocab_size,
            buffer.bytes_per_entry,
            available / GiB,
            source,
        )
        return
    fit = max(0, available // (buffer.vocab_size * buffer.bytes_per_entry))
    raise ConfigError(
        f"{buffer.limit}={buffer.rows}: the log-prob buffers of one forward need up to {buffer.rows} rows x "
        f"{buffer.vocab_size} vocab x {buffer.bytes_per_entry} B = {buffer.bytes / GiB:.2f} GiB, but only "
        f"{available / GiB:.2f} GiB are available ({source}); set {buffer.limit} to at most {fit}"
        + (" (or free memory / raise logprob_memory_budget_gib)" if fit < 1 else "")
    )


def available_ram() -> int:
    """Bytes of RAM the kernel considers available (MemAvailable), or free pages where there is no
    /proc/meminfo."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_cuda_torch(device_index: int) -> int:
    """Free memory of a CUDA device this process uses through torch: the driver's free memory plus what
    torch's caching allocator holds unused."""
    import torch

    free, _total = torch.cuda.mem_get_info(device_index)
    return int(free + torch.cuda.memory_reserved(device_index) - torch.cuda.memory_allocated(device_index))


def available_cuda_nvml(count: int) -> int:
    """Smallest free memory among the first `count` visible GPUs, read through NVML so that this process
    creates no CUDA context of its own (vLLM's engine runs in other processes)."""
    from vllm.third_party import pynvml

    visible = _visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
    pynvml.nvmlInit()
    try:
        frees = []
        for i in range(count):
            ident = visible[i] if visible is not None else str(i)
            handle = (
                pynvml.nvmlDeviceGetHandleByIndex(int(ident))
                if ident.isdigit()
                else pynvml.nvmlDeviceGetHandleByUUID(ident.encode())
            )
            frees.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).free))
        return min(frees)
    finally:
        pynvml.nvmlShutdown()


def _visible_devices(value: str | None) -> Sequence[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
