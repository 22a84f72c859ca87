"""vllm backend: `AsyncLLM` sampling with the same semantics as the hf loop, weight reloads in place.

- Behaviour logprobs: the engine runs with `logprobs_mode="raw_logprobs"`, i.e. log_softmax of the raw
  logits before temperature and top-p, which is the full temperature-1 distribution the hf backend
  returns. `logprobs=return_top_k` asks for the top-k as well (0 = the sampled token's only).
- Stopping: `ignore_eos=True` plus explicit `stop_token_ids` (default: the model's eos ids), so both
  backends stop on exactly the same ids; vLLM keeps the stop token in the output, like the hf loop.
- Top-p: vLLM keeps tokens whose mass before them (in descending order) is < p, the same nucleus.
- Weight swaps do not drain: `pause_generation(mode="keep", clear_cache=True)` freezes the requests in
  flight between two steps and drops every KV entry (prefix cache and the running requests' own, which
  are preempted: the old weights computed them); the worker extension in `vllm_ext.py` reloads the
  weights (`reload_weights` from safetensors files); vLLM's weight-version label is set to the new
  version; generation resumes, re-prefilling each frozen request's prompt and tokens so far under the
  new weights. vLLM labels every step's output with the label current then, and a finished completion
  carries its spans (`CompletionOutput.weight_versions`): they give each sample's first and last token
  versions. `clear_cache=False` would keep old-weight KV blocks in the prefix cache, where requests
  started after the swap would hit them; the cost of True is one re-prefill per request in flight.

The engine spawns processes: create it only in a process started with a `__main__` guard
(`python -m launcher.cli rollout serve --backend vllm`), never at import time of a test module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from services.rollout.config import RolloutConfig
from services.rollout.engine import (
    EngineUnavailable,
    GenerateParams,
    RequestError,
    RolloutEngine,
    StagedWeights,
    WeightSchema,
    default_eos_ids,
    row_seed,
    safetensors_files,
    state_sha256,
)
from services.rollout.protocol import Sample

if TYPE_CHECKING:
    from vllm.config.model import ModelDType
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

EXTENSION = "services.rollout.vllm_ext.WeightReloadExtension"
MAX_TOP_K = 256  # the protocol's return_top_k bound; vLLM must be told its maximum up front


class _LazyCheckpoint(Mapping[str, torch.Tensor]):
    """name -> tensor over safetensors files, read one tensor at a time (hashing a large checkpoint)."""

    def __init__(self, files: list[Path], dtype: torch.dtype) -> None:
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}  # noqa: SIM118
        self._dtype = dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name).to(self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def checkpoint_files(model: str) -> list[Path]:
    """The safetensors files vLLM loaded: a local directory, or the hub snapshot it downloaded."""
    if Path(model).exists():
        return safetensors_files(model)
    from huggingface_hub import snapshot_download

    return safetensors_files(
        snapshot_download(model, allow_patterns=["*.safetensors"], local_files_only=True)
    )


def schema_of(model: str, dtype: torch.dtype, trust_remote_code: bool) -> WeightSchema:
    """The HF state-dict schema of `model` at `dtype`, from a meta-device instance (no memory, no weights)."""
    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return WeightSchema.of_module(meta)


class VLLMEngine(RolloutEngine):
    backend = "vllm"

    def __init__(self, llm: AsyncLLM, **kw) -> None:
        super().__init__(**kw)
        self.llm = llm

    @classmethod
    async def create(cls, cfg: RolloutConfig) -> VLLMEngine:
        # engine creation blocks for a while (process spawn, profiling): keep the event loop answering
        engine = await asyncio.to_thread(cls.load, cfg)
        try:
            # every output is labelled with this (vLLM's default label is "default")
            await engine.llm.update_weight_version(str(engine.version))
        except BaseException:
            await engine.close()
            raise
        return engine

    @classmethod
    def load(cls, cfg: RolloutConfig) -> VLLMEngine:
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=cfg.model,
            # RolloutConfig checked dtype against DTYPES, a subset of vLLM's ModelDType.
            dtype=cast("ModelDType", cfg.dtype),
            seed=cfg.seed,
            # None: the model's maximum. vLLM annotates the field `int` but defaults it to None itself.
            max_model_len=cfg.max_model_len or None,  # type: ignore[arg-type]
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            max_num_seqs=cfg.max_batch_size,
            # vLLM's CPU worker cannot rewind a seeded request's generator after a partial (chunked)
            # prefill ("CPU Generator does not use offset": the rewind is CUDA-only), and a swap re-prefills
            # every request in flight at once, which chunks as soon as they exceed one step's token budget:
            # on CPU prefills are scheduled whole. None elsewhere: vLLM's default (chunked).
            enable_chunked_prefill=False if current_platform.is_cpu() else None,
            enforce_eager=cfg.vllm_enforce_eager,
            logprobs_mode="raw_logprobs",
            max_logprobs=MAX_TOP_K,
            worker_extension_cls=EXTENSION,
            trust_remote_code=cfg.trust_remote_code,
            disable_log_stats=True,
        )
        log.info("starting vLLM engine for %s", cfg.model)
        llm = AsyncLLM.from_engine_args(args)
        try:
            model_config = llm.model_config
            dtype = cast(torch.dtype, model_config.dtype)  # the engine resolved "auto" etc. to a torch.dtype
            schema = schema_of(cfg.model, dtype, cfg.trust_remote_code)
            sha = cls._initial_sha(cfg.model, schema, dtype)
            tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
            try:
                generation_config = GenerationConfig.from_pretrained(cfg.model)
            except OSError:  # no generation_config.json: the tokenizer's eos decides
                generation_config = None
            return cls(
                llm,
                tokenizer=tokenizer,
                schema=schema,
                sha256=sha,
                version=cfg.initial_version,
                vocab_size=model_config.get_vocab_size(),
                max_model_len=model_config.max_model_len,
                eos_token_ids=default_eos_ids(generation_config, tokenizer),
                seed=cfg.seed,
            )
        except BaseException:
            llm.shutdown()
            raise

    @staticmethod
    def _initial_sha(model: str, schema: WeightSchema, dtype: torch.dtype) -> str:
        """Hash of the served weights: the checkpoint's tensors at the served dtype (what vLLM loaded)."""
        files = checkpoint_files(model)
        ckpt = _LazyCheckpoint(files, dtype)
        missing = [n for n in schema.specs if n not in ckpt]
        if missing:
            # e.g. a checkpoint whose names a loader renames: hash what is stored instead
            log.warning(
                "checkpoint lacks %d schema names (e.g. %s); sha256 over its own", len(missing), missing[0]
            )
            return state_sha256(ckpt, list(ckpt))
        return state_sha256(ckpt, schema.specs)

    async def _generate(self, prompt_ids: list[list[int]], params: GenerateParams) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        request_id = uuid.uuid4().hex

        async def one(i: int, prompt: list[int]) -> list[Sample]:
            sp = SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                # vLLM seeds sample j of a request with seed + j; a per-prompt base keeps prompts apart
                seed=(row_seed(params.seed, i, 0) >> 2) + params.first_sample_index,
                max_tokens=params.max_new_tokens,
                stop_token_ids=params.stop_token_ids,
                ignore_eos=True,
                logprobs=params.return_top_k,
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            final = None
            try:
                async for out in self.llm.generate({"prompt_token_ids": prompt}, sp, f"{request_id}-{i}"):
                    final = out
            except ValueError as e:  # vLLM's checks of the prompt or the parameters
                raise RequestError(str(e)) from e
            if final is None or not final.finished:
                raise EngineUnavailable(f"prompt {i}: generation did not finish")
            return [
                self._sample(i, c, params.return_top_k) for c in sorted(final.outputs, key=lambda c: c.index)
            ]

        per_prompt = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompt_ids)))
        return [s for samples in per_prompt for s in samples]

    @staticmethod
    def _sample(prompt_index: int, c, top_k: int) -> Sample:
        if c.finish_reason not in ("stop", "length"):
            raise EngineUnavailable(f"prompt {prompt_index}: generation ended with {c.finish_reason!r}")
        if not c.weight_versions:  # we label every version (create, _install): a missing label is a bug
            raise EngineUnavailable(f"prompt {prompt_index}: vLLM returned no weight-version spans")
        token_ids = list(c.token_ids)
        logprobs, top_ids, top_lps = [], [], []
        for tok, position in zip(token_ids, c.logprobs, strict=True):
            logprobs.append(position[tok].logprob)
            if top_k:
                # the dict holds the top-k and the sampled token (which may rank lower): order by rank
                ranked = sorted(position.items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))[:top_k]
                top_ids.append([t for t, _ in ranked])
                top_lps.append([lp.logprob for _, lp in ranked])
        return Sample(
            prompt_index=prompt_index,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            first_token_version=int(c.weight_versions[0].version),
            last_token_version=int(c.weight_versions[-1].version),
            top_ids=top_ids if top_k else None,
            top_logprobs=top_lps if top_k else None,
        )

    def _prepare(self, staged: StagedWeights) -> None:
        if staged.body is not None:
            # the worker reads files: write the body (already valid safetensors) as is, before the lock
            fd, tmp = tempfile.mkstemp(suffix=".safetensors")
            with os.fdopen(fd, "wb") as fh:
                fh.write(staged.body)
            staged.temp_files.append(Path(tmp))
        elif not staged.files and staged.tensors:
            # received tensors (a streamed PUT, put_tensors): written once as a file, likewise
            from services.rollout.weights_stream import write_safetensors

            fd, tmp = tempfile.mkstemp(suffix=".safetensors")
            os.close(fd)
            staged.temp_files.append(Path(tmp))
            write_safetensors(tmp, staged.tensors)
        staged.tensors = {}  # validated and hashed: the worker reads the files, the server needs no copy

    async def _install(self, staged: StagedWeights) -> None:
        paths = [str(p) for p in (staged.temp_files or staged.files)]
        # freeze requests in flight between steps (no drain) and drop all KV (see the module docstring)
        await self.llm.pause_generation(mode="keep", clear_cache=True)
        try:
            await self.llm.collective_rpc("opd_reload_safetensors", args=(paths,))
            # while paused: every token sampled from here on is labelled with the new version
            await self.llm.update_weight_version(str(staged.version))
        finally:
            await self.llm.resume_generation()

    async def close(self) -> None:
        self.llm.shutdown()
