"""Teacher scoring backends: token sequences in, per-position top-K log-probabilities out. No gRPC here.

Row semantics (the contract of `opd.teacher.v1`): for a sequence x_0 .. x_{n-1} and score_from = s the
result has rows t = s .. n-1; row t is the teacher's distribution over x_t given x_<t, i.e. the logits
computed at position t - 1. Log-probabilities are log_softmax(logits / temperature) over the full
vocabulary, in float32.

Backends (each satisfies the `Scorer` protocol):
  HFScorer    transformers AutoModelForCausalLM on any torch device. One right-padded forward of the
              decoder per batch; sequences that share their first score_from tokens (the G samples of a
              group) run that prompt once and their completions from its KV cache. The LM head runs only
              on the scored rows, in row chunks, so the [T, V] log-softmax of the whole batch never exists
              at once: the log-prob buffers are O(row_chunk x V) (services/teacher/memory.py).
  VLLMScorer  the vLLM engine with prompt_logprobs=K (normalised over the full vocabulary; prompt rows
              skip sampling processors, so temperature cannot be applied: temperature != 1 and
              candidates are unsupported there). Chunked prefill bounds the prompt-logprob rows of one
              engine step by max_num_batched_tokens; prefix caching serves a group's shared prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import torch

from services.common.devices import resolve_device
from services.common.hf_models import load_causal_lm
from services.common.vocab import vocab_sha256
from services.teacher import memory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.config.model import ModelDType
    from vllm.inputs import TokensPrompt
    from vllm.logprobs import FlatLogprobs

    from services.teacher.config import TeacherConfig

log = logging.getLogger(__name__)


@dataclass
class ScoreItem:
    """One sequence to score; n = len(token_ids), rows = n - score_from."""

    token_ids: np.ndarray  # int32 [n]
    score_from: int  # in [1, n)
    top_k: int
    temperature: float = 1.0
    candidates: np.ndarray | None = None  # int32 [rows, C], or [C]: the same ids on every row

    @property
    def rows(self) -> int:
        return len(self.token_ids) - self.score_from


@dataclass
class ScoreResult:
    topk_ids: np.ndarray  # int32 [rows, k], each row by descending log-probability
    topk_logprobs: np.ndarray  # float32 [rows, k]
    target_logprobs: np.ndarray  # float32 [rows], log q(x_t | x_<t)
    candidate_logprobs: np.ndarray | None = None  # float32 [rows, C]
    # Tokens before score_from that this item ran through the model: score_from unless a shared prompt was
    # computed once for several items (then one item carries it and the others 0). None: score_from.
    prompt_tokens_computed: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    vocab_size: int  # ids are valid in [0, vocab_size): the width of the model's logits
    tokenizer_sha256: str
    special_token_ids: tuple[int, ...]
    backend: str
    supports_candidates: bool
    supports_temperature: bool
    pads_batches: bool = True  # cost of a batch = rows x longest (True) or sum of lengths


class Unsupported(Exception):
    """The backend cannot serve this feature (maps to UNIMPLEMENTED)."""


class Scorer(Protocol):
    """A scoring backend as the server, batcher and servicer use it (HFScorer, VLLMScorer, test fakes).

    `score` gets a batch within the caller's token budget and returns one ScoreResult per item, in order,
    each with the row semantics above; it raises Unsupported for a feature the backend lacks (see `info`).
    It is called from one thread at a time. `close` releases the model; no `score` may follow.
    """

    @property
    def info(self) -> ModelInfo: ...

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]: ...

    def close(self) -> None: ...


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


class HFScorer:
    """transformers backend. `score` is not thread-safe: one caller (the batcher's worker thread)."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        row_chunk: int = 0,
        model_id: str = "",
        prefix_reuse: bool = True,
    ):
        self.device = resolve_device(device)
        self.model = load_causal_lm(model, dtype=resolve_dtype(dtype, self.device))
        # transformers wraps `PreTrainedModel.to` in a decorator whose stub drops the bound self.
        self.model.to(self.device).eval()  # type: ignore[arg-type]
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        vocab_size = int(self.head.weight.shape[0])
        # Gemma-style models squash logits after the head: c * tanh(logits / c).
        self.softcap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        # About 256 MiB of float32 logits per chunk unless configured.
        self.row_chunk = row_chunk or max(1, (1 << 26) // vocab_size)
        tokenizer = _load_tokenizer(model)
        self.info = ModelInfo(
            model_id=model_id or model,
            vocab_size=vocab_size,
            tokenizer_sha256=vocab_sha256(tokenizer),
            special_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
            backend="hf",
            supports_candidates=True,
            supports_temperature=True,
            pads_batches=True,
        )
        self._closed = False
        self._check_head_path()
        self.prefix_reuse = prefix_reuse and self._check_prefix_reuse()

    def logprob_buffer(self, max_batch_tokens: int) -> memory.LogprobBuffer:
        """The largest log-prob buffers of one forward: one LM-head chunk (at most max_batch_tokens rows)."""
        rows, limit = (self.row_chunk, "row_chunk")
        if max_batch_tokens < rows:
            rows, limit = (max_batch_tokens, "max_batch_tokens")
        return memory.LogprobBuffer(rows, self.info.vocab_size, memory.HF_BYTES_PER_ENTRY, limit)

    def available_memory(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return memory.available_cuda_torch(index), f"free memory of cuda:{index} after loading the model"
        return memory.available_ram(), "available RAM after loading the model"

    def _logits(self, hidden_R_H: torch.Tensor) -> torch.Tensor:
        """float32 [R, V]. Peak: the head's output while it is cast (dtype + 4 bytes an entry)."""
        logits_R_V = self.head(hidden_R_H).float()
        if self.softcap:
            logits_R_V.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits_R_V

    @torch.inference_mode()
    def _check_head_path(self) -> None:
        """Fail at startup, not with wrong numbers, if the model transforms logits in a way we skip."""
        ids_1_T = torch.arange(min(8, self.info.vocab_size), device=self.device)[None]
        full_T_V = self.model(input_ids=ids_1_T).logits[0].float()
        ours_T_V = self._logits(self.decoder(input_ids=ids_1_T).last_hidden_state[0])
        tol = 1e-3 if self.model.dtype == torch.float32 else 5e-2
        err = (full_T_V - ours_T_V).abs().max().item()
        if err > tol * max(1.0, full_T_V.abs().max().item()):
            raise RuntimeError(
                f"hf scorer: decoder + LM head differ from the model's logits by {err:.3g}; "
                "this architecture post-processes logits in a way the scorer does not know"
            )

    @torch.inference_mode()
    def _check_prefix_reuse(self) -> bool:
        """Scoring from a shared prompt's KV cache must give what full forwards give; if this architecture's
        decoder cannot continue from a cache (or differs), every sequence takes the padded path."""
        V = self.info.vocab_size
        prompt = np.arange(5) % V
        items = [
            ScoreItem(np.r_[prompt, np.arange(c) * 7 % V].astype(np.int32), 5, top_k=min(4, V))
            for c in (3, 1, 2)
        ]
        try:
            shared = self._score(items, reuse=True)
        except Exception as e:  # an architecture that takes no past_key_values
            log.warning("hf scorer: prefix reuse disabled, the decoder cannot continue from a cache: %s", e)
            return False
        full = self._score(items, reuse=False)
        tol = 1e-3 if self.model.dtype == torch.float32 else 5e-2
        pairs = [(a.target_logprobs, b.target_logprobs) for a, b in zip(shared, full, strict=True)] + [
            (a.topk_logprobs, b.topk_logprobs) for a, b in zip(shared, full, strict=True)
        ]
        err = max(float(np.abs(x - y).max()) for x, y in pairs)
        scale = max(1.0, max(float(np.abs(y).max()) for _, y in pairs))
        if err > tol * scale:
            log.warning("hf scorer: prefix reuse disabled, scores from a cache differ by %.3g", err)
            return False
        return True

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """One right-padded forward over `items` (the caller keeps it within its token budget), except that
        sequences sharing their first score_from tokens run that prompt once (`prefix_reuse`)."""
        return self._score(items, reuse=self.prefix_reuse)

    @torch.inference_mode()
    def _score(self, items: Sequence[ScoreItem], reuse: bool) -> list[ScoreResult]:
        groups = shared_prompt_groups(items) if reuse else []
        in_group = {i for g in groups for i in g}
        rest = [i for i in range(len(items)) if i not in in_group]
        # Row t of item b is predicted by the hidden state at position t - 1: per item [rows, H].
        hidden: list[torch.Tensor] = [torch.empty(0)] * len(items)
        computed = [it.score_from for it in items]
        if rest:
            for i, h in zip(rest, self._hidden_padded([items[i] for i in rest]), strict=True):
                hidden[i] = h
        for g in groups:
            for i, h in zip(g, self._hidden_shared_prompt([items[i] for i in g]), strict=True):
                hidden[i] = h
            for i in g[1:]:
                computed[i] = 0
        hidden_R_H = torch.cat(hidden)
        del hidden

        offsets = np.cumsum([0] + [it.rows for it in items])  # [B + 1]
        R = int(offsets[-1])
        tgt_R = np.concatenate([it.token_ids[it.score_from :] for it in items]).astype(np.int64)
        temp_R = np.concatenate([np.full(it.rows, it.temperature, dtype=np.float32) for it in items])
        k_max = max(it.top_k for it in items)
        cand_R_C = self._candidate_matrix(items, R)

        tgt_R_t = torch.from_numpy(tgt_R).to(self.device)
        temp_R_t = torch.from_numpy(temp_R).to(self.device)
        scaled = bool((temp_R != 1.0).any())
        cand_t = None if cand_R_C is None else torch.from_numpy(cand_R_C).to(self.device)

        topk_ids_R_K = np.empty((R, k_max), dtype=np.int32)
        topk_lp_R_K = np.empty((R, k_max), dtype=np.float32)
        target_lp_R = np.empty(R, dtype=np.float32)
        cand_lp_R_C = np.empty((R, 0 if cand_R_C is None else cand_R_C.shape[1]), dtype=np.float32)
        for a in range(0, R, self.row_chunk):
            z = min(R, a + self.row_chunk)
            # In place from here on: the chunk's float32 logits plus one temporary of the same size (the
            # exp of the log-sum-exp) are the peak, memory.HF_BYTES_PER_ENTRY bytes an entry.
            logits_c_V = self._logits(hidden_R_H[a:z])
            if scaled:
                logits_c_V.div_(temp_R_t[a:z, None])
            max_c = logits_c_V.amax(dim=-1, keepdim=True)
            logits_c_V.sub_(max_c)  # shifted: <= 0, the same order and the same log-softmax
            lse_c = torch.exp(logits_c_V).sum(dim=-1).log_()
            top_vals_c_K, top_ids_c_K = torch.topk(logits_c_V, k_max, dim=-1, sorted=True)
            topk_ids_R_K[a:z] = top_ids_c_K.to(torch.int32).cpu().numpy()
            topk_lp_R_K[a:z] = (top_vals_c_K - lse_c[:, None]).cpu().numpy()
            target_lp_R[a:z] = (logits_c_V.gather(1, tgt_R_t[a:z, None])[:, 0] - lse_c).cpu().numpy()
            if cand_t is not None:
                cand_lp_R_C[a:z] = (logits_c_V.gather(1, cand_t[a:z]) - lse_c[:, None]).cpu().numpy()
            del logits_c_V

        results = []
        for b, it in enumerate(items):
            r0, r1 = int(offsets[b]), int(offsets[b + 1])
            cand = None
            if it.candidates is not None:
                cand = cand_lp_R_C[r0:r1, : it.candidates.shape[-1]].copy()
            results.append(
                ScoreResult(
                    topk_ids_R_K[r0:r1, : it.top_k].copy(),
                    topk_lp_R_K[r0:r1, : it.top_k].copy(),
                    target_lp_R[r0:r1].copy(),
                    cand,
                    computed[b],
                )
            )
        return results

    def _hidden_padded(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        """One right-padded forward over whole sequences: per item the hidden states of its rows."""
        B = len(items)
        lengths = [len(it.token_ids) for it in items]
        L = max(lengths)
        ids_B_L = np.zeros((B, L), dtype=np.int64)
        mask_B_L = np.zeros((B, L), dtype=np.int64)
        for b, it in enumerate(items):
            ids_B_L[b, : lengths[b]] = it.token_ids
            mask_B_L[b, : lengths[b]] = 1
        hidden_B_L_H = self.decoder(
            input_ids=torch.from_numpy(ids_B_L).to(self.device),
            attention_mask=torch.from_numpy(mask_B_L).to(self.device),
            use_cache=False,
        ).last_hidden_state
        return [hidden_B_L_H[b, it.score_from - 1 : lengths[b] - 1] for b, it in enumerate(items)]

    def _hidden_shared_prompt(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        """Items whose first s = score_from tokens are equal: the prompt runs once (batch 1, its KV cache
        kept), then the G completions run as one right-padded batch on the cache repeated G times."""
        from transformers import DynamicCache

        s = items[0].score_from
        prompt_1_S = torch.from_numpy(items[0].token_ids[:s].astype(np.int64))[None].to(self.device)
        out = self.decoder(
            input_ids=prompt_1_S, past_key_values=DynamicCache(config=self.model.config), use_cache=True
        )
        last_1_H = out.last_hidden_state[0, -1:]  # predicts row s of every item
        # Row t > s is predicted at position t - 1 >= s: completion tokens s .. n-2 (the last is not needed).
        tails = [it.token_ids[s:-1] for it in items]
        C = max(len(t) for t in tails)
        if C == 0:
            return [last_1_H for _ in items]
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(items))
        ids_G_C = np.zeros((len(items), C), dtype=np.int64)
        mask_G_SC = np.zeros((len(items), s + C), dtype=np.int64)
        mask_G_SC[:, :s] = 1
        for g, t in enumerate(tails):
            ids_G_C[g, : len(t)] = t
            mask_G_SC[g, s : s + len(t)] = 1
        hidden_G_C_H = self.decoder(
            input_ids=torch.from_numpy(ids_G_C).to(self.device),
            attention_mask=torch.from_numpy(mask_G_SC).to(self.device),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        return [torch.cat([last_1_H, hidden_G_C_H[g, : len(t)]]) for g, t in enumerate(tails)]

    @staticmethod
    def _candidate_matrix(items: Sequence[ScoreItem], R: int) -> np.ndarray | None:
        """int64 [R, C_max]: every item's candidates broadcast to its rows, right-padded with id 0."""
        widths = [it.candidates.shape[-1] for it in items if it.candidates is not None]
        if not widths:
            return None
        out_R_C = np.zeros((R, max(widths)), dtype=np.int64)
        r = 0
        for it in items:
            if it.candidates is not None:
                c = it.candidates.shape[-1]
                out_R_C[r : r + it.rows, :c] = np.broadcast_to(it.candidates, (it.rows, c))
            r += it.rows
        return out_R_C

    def close(self) -> None:
        """Drop the model so its memory can be freed; idempotent."""
        if not self._closed:
            del self.model, self.decoder, self.head
            self._closed = True


class VLLMScorer:
    """vLLM backend: one `LLM.generate` per batch with prompt_logprobs = top_k and max_tokens = 1.

    Memory: vLLM computes prompt log-probabilities per engine step, for the prompt rows scheduled in that
    step (`GPUModelRunner._get_prompt_logprobs_dict`), so chunked prefill with `max_num_batched_tokens`
    bounds their [rows, V] buffers whatever the sequence length; the teacher still sees the whole prefix
    through the KV cache. See services/teacher/memory.py.

    Shared prompts: vLLM skips prefix-cache reads for requests with prompt_logprobs
    (`SamplingParams.skip_reading_prefix_cache` defaults to True for them) because the rows of cached
    positions are never computed: they are left uninitialised in the output, not omitted. The rows we
    return start at score_from, so reading the cache is safe while the hit stays below score_from
    (`RequestOutput.num_cached_tokens`); a request whose hit reaches it is scored again without the cache.
    The hit is only recorded at a request's first scheduling, so reads are enabled only for a batch whose
    KV blocks all fit at once (no preemption, no second lookup).

    The engine spawns worker processes: construct it in a process whose main module is guarded by
    `if __name__ == "__main__"` (the `opd` CLI is).
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_top_k: int = 64,
        max_sequence_tokens: int = 8192,
        max_num_batched_tokens: int = 4096,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        model_id: str = "",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        prefix_reuse: bool = True,
    ):
        from vllm import LLM, SamplingParams

        self._SamplingParams = SamplingParams
        llm = LLM(
            model=model,
            # TeacherConfig checked dtype against DTYPES, a subset of vLLM's ModelDType.
            dtype=cast("ModelDType", dtype),
            # +1: generate() must emit one token after the longest accepted prompt.
            max_model_len=max_sequence_tokens + 1,
            # Tokens (and so prompt-logprob rows) per engine step; longer prompts are prefilled in chunks.
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=True,
            max_num_seqs=min(256, max_num_batched_tokens),
            enable_prefix_caching=prefix_reuse,
            max_logprobs=max_top_k,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
        )
        self.llm = llm
        self._closed = False
        config = llm.llm_engine.vllm_config
        self.tensor_parallel_size = tensor_parallel_size
        self.pipeline_parallel_size = pipeline_parallel_size
        self.step_tokens = int(config.scheduler_config.max_num_batched_tokens)
        self.logit_bytes = cast(torch.dtype, config.model_config.dtype).itemsize  # resolved by now
        # Model runner V2 (the default on CUDA with Triton) scores prompt rows in chunks of 1024 without a
        # float32 [rows, V] copy; V1 (CPU, or VLLM_USE_V2_MODEL_RUNNER=0) scores a step's rows at once.
        self.v2_runner = bool(config.use_v2_model_runner)
        cache = config.cache_config
        self.prefix_reuse = bool(prefix_reuse and cache.enable_prefix_caching)
        self.block_size = int(cache.block_size)
        self.kv_blocks = int(cache.num_gpu_blocks or 0)
        tokenizer = _load_tokenizer(model)
        self.info = ModelInfo(
            model_id=model_id or model,
            vocab_size=int(llm.llm_engine.model_config.get_vocab_size()),
            tokenizer_sha256=vocab_sha256(tokenizer),
            special_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
            backend="vllm",
            supports_candidates=False,
            supports_temperature=False,
            pads_batches=False,
        )

    def logprob_buffer(self) -> memory.LogprobBuffer:
        """The largest prompt-logprob buffers of one engine step."""
        return memory.vllm_logprob_buffer(
            self.step_tokens,
            self.info.vocab_size,
            self.logit_bytes,
            self.tensor_parallel_size,
            self.v2_runner,
        )

    def available_memory(self) -> tuple[int, str]:
        from vllm.platforms import current_platform

        if current_platform.is_cuda():
            gpus = self.tensor_parallel_size * self.pipeline_parallel_size
            return (
                memory.available_cuda_nvml(gpus),
                f"least free memory of the engine's {gpus} GPU(s) after its weights and KV cache",
            )
        return memory.available_ram(), "available RAM after the engine's weights and KV cache"

    def _reads_prefix_cache(self, items: Sequence[ScoreItem]) -> bool:
        """Prefix-cache reads only for a batch whose KV blocks fit at once: nothing is preempted, so each
        request looks the cache up once and num_cached_tokens tells its whole hit."""
        if not self.prefix_reuse:
            return False
        blocks = sum(-(-(len(it.token_ids) + 1) // self.block_size) for it in items)
        return blocks <= self.kv_blocks

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        for it in items:
            if it.candidates is not None:
                raise Unsupported("candidates are not supported by the vllm backend")
            if it.temperature != 1.0:
                raise Unsupported("temperature != 1 is not supported by the vllm backend")
        read = self._reads_prefix_cache(items)
        results: list[ScoreResult | None] = [None] * len(items)
        redo = []
        for i, (it, out) in enumerate(zip(items, self._generate(items, read), strict=True)):
            cached = int(out.num_cached_tokens or 0) if read else 0
            if cached >= it.score_from:  # rows from score_from on were not all computed
                redo.append(i)
                continue
            results[i] = self._convert(it, cast("FlatLogprobs", out.prompt_logprobs), it.score_from - cached)
        if redo:
            again = [items[i] for i in redo]
            for i, it, out in zip(redo, again, self._generate(again, False), strict=True):
                results[i] = self._convert(it, cast("FlatLogprobs", out.prompt_logprobs), it.score_from)
        return cast(list[ScoreResult], results)

    def _generate(self, items: Sequence[ScoreItem], read_cache: bool) -> list:
        # flat_logprobs: per position, K + 1 entries in flat lists: the target first, then the top-K by rank.
        params = [
            self._SamplingParams(
                max_tokens=1,
                prompt_logprobs=it.top_k,
                flat_logprobs=True,
                detokenize=False,
                skip_reading_prefix_cache=not read_cache,
            )
            for it in items
        ]
        prompts: list[TokensPrompt] = [{"prompt_token_ids": it.token_ids.tolist()} for it in items]
        return self.llm.generate(prompts, params, use_tqdm=False)

    @staticmethod
    def _convert(it: ScoreItem, flat: FlatLogprobs, prompt_tokens_computed: int) -> ScoreResult:
        n, s, k = len(it.token_ids), it.score_from, it.top_k
        # Entry p is position p (entry 0, the first token, is empty), except after a prefix-cache hit of c
        # tokens on the V2 model runner, which returns only the computed positions: entry p is p + c.
        shift = n - len(flat.start_indices)
        if not 0 <= shift < s:
            raise RuntimeError(
                f"vllm returned prompt logprobs for {len(flat.start_indices)} of {n} positions"
            )
        start, end = flat.start_indices[s - shift], flat.end_indices[n - 1 - shift]
        if end - start != it.rows * (k + 1):
            raise RuntimeError(f"vllm returned {end - start} prompt logprobs for {it.rows} rows x {k + 1}")
        ids_R_K1 = np.asarray(flat.token_ids[start:end], dtype=np.int32).reshape(it.rows, k + 1)
        lp_R_K1 = np.asarray(flat.logprobs[start:end], dtype=np.float32).reshape(it.rows, k + 1)
        return ScoreResult(
            ids_R_K1[:, 1:].copy(), lp_R_K1[:, 1:].copy(), lp_R_K1[:, 0].copy(), None, prompt_tokens_computed
        )

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit; idempotent."""
        if not self._closed:
            self.llm.llm_engine.engine_core.shutdown()
            del self.llm
            self._closed = True


def shared_prompt_groups(items: Sequence[ScoreItem]) -> list[list[int]]:
    """Indices of items that share score_from and their first score_from tokens, groups of two or more,
    each in item order."""
    groups: dict[tuple[int, bytes], list[int]] = {}
    for i, it in enumerate(items):
        key = (it.score_from, np.ascontiguousarray(it.token_ids[: it.score_from], dtype=np.int32).tobytes())
        groups.setdefault(key, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def build_scorer(cfg: TeacherConfig) -> Scorer:
    """The scorer a `TeacherConfig` asks for (loads the model: slow), once its log-prob buffers are known
    to fit (`check_memory`); a ConfigError otherwise, naming the limit to lower."""
    scorer: HFScorer | VLLMScorer
    if cfg.backend == "hf":
        scorer = HFScorer(
            cfg.model,
            cfg.device,
            cfg.dtype,
            cfg.row_chunk,
            cfg.served_model_id,
            prefix_reuse=cfg.prefix_reuse,
        )
    else:
        scorer = VLLMScorer(
            cfg.model,
            cfg.dtype,
            cfg.max_top_k,
            cfg.max_sequence_tokens,
            cfg.vllm_step_tokens,
            cfg.vllm_gpu_memory_utilization,
            cfg.vllm_enforce_eager,
            cfg.served_model_id,
            tensor_parallel_size=cfg.tensor_parallel_size,
            pipeline_parallel_size=cfg.pipeline_parallel_size,
            prefix_reuse=cfg.prefix_reuse,
        )
    try:
        check_memory(cfg, scorer)
    except BaseException:
        scorer.close()
        raise
    return scorer


def check_memory(cfg: TeacherConfig, scorer: HFScorer | VLLMScorer) -> None:
    """Refuse (ConfigError) a configuration whose worst-case log-prob buffers of one forward do not fit in
    the memory left after loading, or in `logprob_memory_budget_gib` when that is set."""
    buffer = (
        scorer.logprob_buffer(cfg.max_batch_tokens)
        if isinstance(scorer, HFScorer)
        else scorer.logprob_buffer()
    )
    if cfg.logprob_memory_budget_gib > 0:
        available, source = int(cfg.logprob_memory_budget_gib * memory.GiB), "logprob_memory_budget_gib"
    else:
        try:
            available, source = scorer.available_memory()
        except Exception as e:  # e.g. no NVML; the check is a guard, not a reason to refuse service
            log.warning(
                "teacher: could not measure free memory (%s); log-prob buffers up to %.2f GiB per forward are "
                "unchecked (set logprob_memory_budget_gib to check them)",
                e,
                buffer.bytes / memory.GiB,
            )
            return
    memory.check_logprob_buffer(buffer, available, source)
