"""hf backend: a batched top-p sampling loop over a transformers causal LM with a KV cache, any device.

Rows (prompt i, sample j) are decoded together: prompts are left-padded (attention mask + explicit
position ids), prefilled once per distinct prompt, then the KV cache is expanded to the n samples. Each
row has its own CPU `torch.Generator` seeded from (request seed, i, j), so a request's samples depend on
its seed only, not on batching. Finished rows are dropped from the batch as they stop.

All model work (generation and weight installs) runs on one executor thread: besides the engine's
readers-writer lock, this FIFO guarantees that an install never overlaps a generation step.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from services.common.devices import resolve_device
from services.rollout.config import RolloutConfig
from services.rollout.engine import (
    GenerateParams,
    RolloutEngine,
    StagedWeights,
    WeightSchema,
    default_eos_ids,
    row_seed,
    state_sha256,
)
from services.rollout.protocol import FinishReason, Sample

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def top_p_sample(
    logits_B_V: torch.Tensor, temperature: float, top_p: float, u_B: torch.Tensor
) -> torch.Tensor:
    """Sample one id per row from softmax(logits / temperature) restricted to the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose mass is >= top_p: tokens in descending
    order are kept while the mass strictly before them is < top_p (the top token is always kept), then
    renormalised. `u_B` are uniforms in [0, 1) (one per row): the sample is the inverse CDF at u, so the
    caller's generators fully determine it. Ties keep the lower id first (argmax convention).
    Returns ids_B (int64).
    """
    probs_B_V = torch.softmax(logits_B_V.float() / temperature, dim=-1)
    sorted_B_V, order_B_V = probs_B_V.sort(dim=-1, descending=True, stable=True)
    sorted_B_V = sorted_B_V.double()  # cumulative sums over large vocabularies: keep the rounding small
    if top_p < 1.0:
        mass_before_B_V = sorted_B_V.cumsum(-1) - sorted_B_V
        keep_B_V = mass_before_B_V < top_p
        keep_B_V[:, 0] = True
        sorted_B_V = sorted_B_V * keep_B_V
    cdf_B_V = sorted_B_V.cumsum(-1)
    target_B = u_B.to(cdf_B_V) * cdf_B_V[:, -1]
    idx_B = (cdf_B_V <= target_B[:, None]).sum(-1)  # first position whose cdf exceeds the target
    last_B = (sorted_B_V > 0).sum(-1) - 1  # guards u * total rounding up to total
    idx_B = torch.minimum(idx_B, last_B)
    return order_B_V.gather(1, idx_B[:, None])[:, 0]


def owned_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy with its own writable memory, by a single-threaded memcpy (numpy). torch's parallel
    copy stalls for ~10x longer when the CPU is oversubscribed (other services on the same cores)."""
    if t.numel() == 0:
        return torch.empty_like(t)
    # a byte view works for every dtype, bf16 included (numpy has none)
    flat_bytes = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return torch.from_numpy(flat_bytes.copy()).view(t.dtype).reshape(t.shape)


@dataclass
class RowOutput:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)


@torch.inference_mode()
def sample_rows(
    model: PreTrainedModel,
    prompts: list[list[int]],
    row_prompt: list[int],
    generators: list[torch.Generator],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_token_ids: list[int],
    return_top_k: int = 0,
) -> list[RowOutput]:
    """Decode one completion per row; row r continues prompts[row_prompt[r]] using generators[r].

    Behaviour logprobs are log_softmax(logits) at temperature 1 over the full vocabulary (what an
    importance ratio needs), whatever temperature/top_p the sampling used. A stop token ends its row and
    is included in its token_ids.
    """
    device = model.device
    lengths = [len(p) for p in prompts]
    U, L = len(prompts), max(lengths)
    # left padding: every row's last prompt token sits at column L-1, so decoding appends in lockstep;
    # the pad id itself is irrelevant because the attention mask hides it
    ids_U_L = torch.zeros((U, L), dtype=torch.long)
    mask_U_L = torch.zeros((U, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids_U_L[i, L - len(p) :] = torch.tensor(p)
        mask_U_L[i, L - len(p) :] = 1
    ids_U_L, mask_U_L = ids_U_L.to(device), mask_U_L.to(device)
    pos_U_L = (mask_U_L.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
    out = model(
        input_ids=ids_U_L, attention_mask=mask_U_L, position_ids=pos_U_L, use_cache=True, logits_to_keep=1
    )
    # prefill each distinct prompt once, then give every sample row its own copy of the cache
    sel_B = torch.tensor(row_prompt, device=device)
    cache = out.past_key_values
    cache.batch_select_indices(sel_B)
    logits_B_V = out.logits[:, -1].float()[sel_B]
    mask_B_L = mask_U_L[sel_B]
    next_pos_B = pos_U_L[sel_B, -1] + 1

    rows = [RowOutput() for _ in row_prompt]
    stop = set(stop_token_ids)
    active = list(range(len(row_prompt)))  # original row index of each batch row
    for step in range(max_new_tokens):
        logp_B_V = torch.log_softmax(logits_B_V, dim=-1)
        u_B = torch.cat([torch.rand(1, generator=generators[r], dtype=torch.float64) for r in active])
        tok_B = top_p_sample(logits_B_V, temperature, top_p, u_B.to(device))
        lp_B = logp_B_V.gather(1, tok_B[:, None])[:, 0]
        tok_list, lp_list = tok_B.tolist(), lp_B.tolist()
        if return_top_k:
            top_lp_B_K, top_id_B_K = logp_B_V.topk(return_top_k, dim=-1)
            top_ids, top_lps = top_id_B_K.tolist(), top_lp_B_K.tolist()
        keep = []
        for b, r in enumerate(active):
            row = rows[r]
            row.token_ids.append(tok_list[b])
            row.logprobs.append(lp_list[b])
            if return_top_k:
                row.top_ids.append(top_ids[b])
                row.top_logprobs.append(top_lps[b])
            if tok_list[b] in stop:
                row.finish_reason = "stop"
            elif step < max_new_tokens - 1:
                keep.append(b)
        if not keep:
            break
        if len(keep) < len(active):  # drop finished rows so the tail of long samples decodes cheaply
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask_B_L, next_pos_B, tok_B = mask_B_L[idx], next_pos_B[idx], tok_B[idx]
            active = [active[b] for b in keep]
        mask_B_L = torch.cat([mask_B_L, mask_B_L.new_ones((len(active), 1))], dim=1)
        out = model(
            input_ids=tok_B[:, None],
            attention_mask=mask_B_L,
            position_ids=next_pos_B[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        logits_B_V = out.logits[:, -1].float()
        next_pos_B = next_pos_B + 1
    return rows


def sample_groups(
    model: PreTrainedModel, prompt_ids: list[list[int]], params: GenerateParams, max_batch_size: int
) -> list[Sample]:
    """`params.n` samples of every prompt, decoded `max_batch_size` rows at a time (each distinct prompt of
    a batch prefilled once). Row (i, j) draws from its own generator seeded with row_seed(seed, i, j), so a
    sample does not depend on how the rows were batched."""
    rows = [(i, j) for i in range(len(prompt_ids)) for j in range(params.n)]
    samples: list[Sample] = []
    for start in range(0, len(rows), max_batch_size):
        chunk = rows[start : start + max_batch_size]
        distinct = sorted({i for i, _ in chunk})
        slot = {i: s for s, i in enumerate(distinct)}
        outputs = sample_rows(
            model,
            [prompt_ids[i] for i in distinct],
            [slot[i] for i, _ in chunk],
            [torch.Generator().manual_seed(row_seed(params.seed, i, j)) for i, j in chunk],
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop_token_ids=params.stop_token_ids,
            return_top_k=params.return_top_k,
        )
        for (i, _), row in zip(chunk, outputs, strict=True):
            samples.append(
                Sample(
                    prompt_index=i,
                    token_ids=row.token_ids,
                    logprobs=row.logprobs,
                    finish_reason=row.finish_reason,
                    top_ids=row.top_ids if params.return_top_k else None,
                    top_logprobs=row.top_logprobs if params.return_top_k else None,
                )
            )
    return samples


class HFEngine(RolloutEngine):
    backend = "hf"

    def __init__(self, model: PreTrainedModel, max_batch_size: int, **kw) -> None:
        super().__init__(**kw)
        self.model = model
        self.max_batch_size = max_batch_size
        # name -> the live Parameter/buffer object itself (tied names map to the same object)
        self._targets = model.state_dict(keep_vars=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")

    @classmethod
    async def create(cls, cfg: RolloutConfig) -> HFEngine:
        return await asyncio.to_thread(cls.load, cfg)

    @classmethod
    def load(cls, cfg: RolloutConfig) -> HFEngine:
        device = resolve_device(cfg.device)
        dtype = DTYPES.get(cfg.dtype, "auto")
        log.info("loading %s on %s (dtype %s)", cfg.model, device, cfg.dtype)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        )
        # transformers wraps `PreTrainedModel.to` in a decorator whose stub drops the bound self.
        model = model.to(device).eval()  # type: ignore[arg-type]
        schema = WeightSchema.of_module(model)
        text_config = model.config.get_text_config()
        return cls(
            model,
            cfg.max_batch_size,
            tokenizer=tokenizer,
            schema=schema,
            sha256=state_sha256(model.state_dict(), schema.specs),
            version=cfg.initial_version,
            vocab_size=text_config.vocab_size,
            max_model_len=cfg.max_model_len or text_config.max_position_embeddings,
            eos_token_ids=default_eos_ids(model.generation_config, tokenizer),
            seed=cfg.seed,
        )

    async def _generate(self, prompt_ids: list[list[int]], params: GenerateParams) -> list[Sample]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._generate_sync, prompt_ids, params)

    def _generate_sync(self, prompt_ids: list[list[int]], params: GenerateParams) -> list[Sample]:
        return sample_groups(self.model, prompt_ids, params, self.max_batch_size)

    def _prepare(self, staged: StagedWeights) -> None:
        # fresh, writable tensors on the model's device, made before the write lock (the parsed tensors
        # alias read-only request bytes): the swap itself is then only pointer assignments
        device = self.model.device
        move = owned_copy if device.type == "cpu" else lambda t: t.to(device)
        staged.tensors = {name: move(staged.tensors[name]) for name in self.schema.specs}

    async def _install(self, staged: StagedWeights) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._install_sync, staged)

    @torch.inference_mode()
    def _install_sync(self, staged: StagedWeights) -> None:
        # validated (every spec present, right shape and dtype) and already on the device: rebinding the
        # data of each live parameter cannot fail halfway; tied aliases share the spec's Parameter object
        for name in self.schema.specs:
            self._targets[name].data = staged.tensors[name]

    async def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
