"""Teacher scoring backends: token sequences in, per-position top-K log-probabilities out. No gRPC here.

Row semantics (the contract of `opd.teacher.v1`): for a sequence x_0 .. x_{n-1} and score_from = s the
result has rows t = s .. n-1; row t is the teacher's distribution over x_t given x_<t, i.e. the logits
computed at position t - 1. Log-probabilities are log_softmax(logits / temperature) over the full
vocabulary, in float32.

Backends (each satisfies the `Scorer` protocol):
  HFScorer    transformers AutoModelForCausalLM on any torch device. One right-padded forward of the
              decoder per batch; the LM head runs only on the scored rows, in row chunks, so the [T, V]
              log-softmax of the whole batch never exists at once.
  VLLMScorer  the vLLM engine with prompt_logprobs=K (normalised over the full vocabulary; prompt rows
              skip sampling processors, so temperature cannot be applied: temperature != 1 and
              candidates are unsupported there).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import torch

from services.common.devices import resolve_device

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


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary (token -> id, keys sorted, compact JSON, UTF-8): same ids, same hash."""
    blob = json.dumps(tokenizer.get_vocab(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


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
        self, model: str, device: str = "auto", dtype: str = "auto", row_chunk: int = 0, model_id: str = ""
    ):
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=resolve_dtype(dtype, self.device))
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
            tokenizer_sha256=tokenizer_sha256(tokenizer),
            special_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
            backend="hf",
            supports_candidates=True,
            supports_temperature=True,
            pads_batches=True,
        )
        self._closed = False
        self._check_head_path()

    def _logits(self, hidden_R_H: torch.Tensor) -> torch.Tensor:
        logits_R_V = self.head(hidden_R_H).float()
        if self.softcap:
            logits_R_V = torch.tanh(logits_R_V / self.softcap) * self.softcap
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
    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """One right-padded forward over `items` (the caller keeps it within its token budget)."""
        B = len(items)
        lengths = [len(it.token_ids) for it in items]
        L = max(lengths)
        ids_B_L = np.zeros((B, L), dtype=np.int64)
        mask_B_L = np.zeros((B, L), dtype=np.int64)
        for b, it in enumerate(items):
            ids_B_L[b, : lengths[b]] = it.token_ids
            mask_B_L[b, : lengths[b]] = 1
        ids_B_L_t = torch.from_numpy(ids_B_L).to(self.device)
        hidden_B_L_H = self.decoder(
            input_ids=ids_B_L_t, attention_mask=torch.from_numpy(mask_B_L).to(self.device), use_cache=False
        ).last_hidden_state
        H = hidden_B_L_H.shape[-1]

        # Row t of item b is predicted by the hidden state at position t - 1.
        offsets = np.cumsum([0] + [it.rows for it in items])  # [B + 1]
        R = int(offsets[-1])
        src_R = np.concatenate(
            [b * L + np.arange(it.score_from - 1, lengths[b] - 1) for b, it in enumerate(items)]
        )
        tgt_R = np.concatenate([it.token_ids[it.score_from :] for it in items]).astype(np.int64)
        temp_R = np.concatenate([np.full(it.rows, it.temperature, dtype=np.float32) for it in items])
        k_max = max(it.top_k for it in items)
        cand_R_C = self._candidate_matrix(items, R)

        hidden_R_H = hidden_B_L_H.reshape(B * L, H)[torch.from_numpy(src_R).to(self.device)]
        tgt_R_t = torch.from_numpy(tgt_R).to(self.device)
        temp_R_t = torch.from_numpy(temp_R).to(self.device)
        cand_t = None if cand_R_C is None else torch.from_numpy(cand_R_C).to(self.device)

        topk_ids_R_K = np.empty((R, k_max), dtype=np.int32)
        topk_lp_R_K = np.empty((R, k_max), dtype=np.float32)
        target_lp_R = np.empty(R, dtype=np.float32)
        cand_lp_R_C = np.empty((R, 0 if cand_R_C is None else cand_R_C.shape[1]), dtype=np.float32)
        for a in range(0, R, self.row_chunk):
            z = min(R, a + self.row_chunk)
            logits_c_V = self._logits(hidden_R_H[a:z]) / temp_R_t[a:z, None]
            lse_c = torch.logsumexp(logits_c_V, dim=-1)
            top_vals_c_K, top_ids_c_K = torch.topk(logits_c_V, k_max, dim=-1, sorted=True)
            topk_ids_R_K[a:z] = top_ids_c_K.to(torch.int32).cpu().numpy()
            topk_lp_R_K[a:z] = (top_vals_c_K - lse_c[:, None]).cpu().numpy()
            target_lp_R[a:z] = (logits_c_V.gather(1, tgt_R_t[a:z, None])[:, 0] - lse_c).cpu().numpy()
            if cand_t is not None:
                cand_lp_R_C[a:z] = (logits_c_V.gather(1, cand_t[a:z]) - lse_c[:, None]).cpu().numpy()

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
                )
            )
        return results

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

    The engine spawns worker processes: construct it in a process whose main module is guarded by
    `if __name__ == "__main__"` (the `opd` CLI is).
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_top_k: int = 64,
        max_sequence_tokens: int = 8192,
        max_batch_tokens: int = 16384,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        model_id: str = "",
    ):
        from vllm import LLM, SamplingParams

        self._SamplingParams = SamplingParams
        llm = LLM(
            model=model,
            # TeacherConfig checked dtype against DTYPES, a subset of vLLM's ModelDType.
            dtype=cast("ModelDType", dtype),
            # +1: generate() must emit one token after the longest accepted prompt.
            max_model_len=max_sequence_tokens + 1,
            max_num_batched_tokens=max(max_batch_tokens, max_sequence_tokens + 1),
            max_logprobs=max_top_k,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
        )
        self.llm = llm
        self._closed = False
        tokenizer = _load_tokenizer(model)
        self.info = ModelInfo(
            model_id=model_id or model,
            vocab_size=int(llm.llm_engine.model_config.get_vocab_size()),
            tokenizer_sha256=tokenizer_sha256(tokenizer),
            special_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
            backend="vllm",
            supports_candidates=False,
            supports_temperature=False,
            pads_batches=False,
        )

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        for it in items:
            if it.candidates is not None:
                raise Unsupported("candidates are not supported by the vllm backend")
            if it.temperature != 1.0:
                raise Unsupported("temperature != 1 is not supported by the vllm backend")
        # flat_logprobs: per position, K + 1 entries in flat lists: the target first, then the top-K by rank.
        params = [
            self._SamplingParams(max_tokens=1, prompt_logprobs=it.top_k, flat_logprobs=True, detokenize=False)
            for it in items
        ]
        prompts: list[TokensPrompt] = [{"prompt_token_ids": it.token_ids.tolist()} for it in items]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        # flat_logprobs=True: vLLM returns FlatLogprobs, not its per-position list of dicts.
        return [
            self._convert(it, cast("FlatLogprobs", out.prompt_logprobs))
            for it, out in zip(items, outputs, strict=True)
        ]

    @staticmethod
    def _convert(it: ScoreItem, flat: FlatLogprobs) -> ScoreResult:
        n, s, k = len(it.token_ids), it.score_from, it.top_k
        start, end = flat.start_indices[s], flat.end_indices[n - 1]
        if end - start != it.rows * (k + 1):
            raise RuntimeError(f"vllm returned {end - start} prompt logprobs for {it.rows} rows x {k + 1}")
        ids_R_K1 = np.asarray(flat.token_ids[start:end], dtype=np.int32).reshape(it.rows, k + 1)
        lp_R_K1 = np.asarray(flat.logprobs[start:end], dtype=np.float32).reshape(it.rows, k + 1)
        return ScoreResult(ids_R_K1[:, 1:].copy(), lp_R_K1[:, 1:].copy(), lp_R_K1[:, 0].copy(), None)

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit; idempotent."""
        if not self._closed:
            self.llm.llm_engine.engine_core.shutdown()
            del self.llm
            self._closed = True


def build_scorer(cfg: TeacherConfig) -> Scorer:
    """The scorer a `TeacherConfig` asks for (loads the model: slow)."""
    if cfg.backend == "hf":
        return HFScorer(cfg.model, cfg.device, cfg.dtype, cfg.row_chunk, cfg.served_model_id)
    return VLLMScorer(
        cfg.model,
        cfg.dtype,
        cfg.max_top_k,
        cfg.max_sequence_tokens,
        cfg.max_batch_tokens,
        cfg.vllm_gpu_memory_utilization,
        cfg.vllm_enforce_eager,
        cfg.served_model_id,
    )
