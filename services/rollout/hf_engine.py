"""hf backend: a batched top-p sampling loop over a transformers causal LM with a KV cache, any device.

Rows (prompt i, sample j) are decoded together: prompts are left-padded (attention mask + explicit
position ids), prefilled once per distinct prompt, then the KV cache is expanded to the n samples. Each
row has its own CPU `torch.Generator` seeded from (request seed, i, j), so a request's samples depend on
its seed only, not on batching. Finished rows are dropped from the batch as they stop.

Requests run one at a time on one executor thread. Weight installs do not wait for them: a `WeightsGate`
lets a model forward (prefill or one decoding step) and an install exclude each other, an install going
before the next step, so an install waits for one step at most. The step after an install re-prefills
every row's whole context (prompt + tokens so far) under the new weights instead of extending the KV
cache: the old weights' cache entries are dropped (as vLLM's `pause_generation(clear_cache=True)` does),
so every token is sampled from exactly log pi_v(. | c_t) of the version v it is labelled with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, PreTrainedModel

from services.common.devices import resolve_device
from services.common.hf_models import load_causal_lm
from services.rollout.config import RolloutConfig
from services.rollout.engine import (
    EngineUnavailable,
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


class WeightsGate:
    """Model forwards and weight installs exclude each other; a waiting install goes before the next forward.

    `step()` is held around each forward of the decode loop and yields the version of the weights bound
    for it; `install(version, rebind)` waits for the forward in progress (if any) to end, runs `rebind`
    (which replaces the live weights) and makes `version` the bound one. Idle, an install runs at once.
    """

    def __init__(self, version: int = 0) -> None:
        self._cond = threading.Condition()
        self._version = version
        self._stepping = 0
        self._installing = False
        self._installs_waiting = 0
        self._failure: str | None = None  # a rebind raised: the weights are a mix, no step may run

    @property
    def version(self) -> int:
        return self._version

    @contextlib.contextmanager
    def step(self) -> Iterator[int]:
        with self._cond:
            self._cond.wait_for(lambda: not self._installing and self._installs_waiting == 0)
            if self._failure is not None:
                raise EngineUnavailable(self._failure)
            self._stepping += 1
            version = self._version
        try:
            yield version
        finally:
            with self._cond:
                self._stepping -= 1
                self._cond.notify_all()

    def install(self, version: int, rebind: Callable[[], None]) -> None:
        with self._cond:
            self._installs_waiting += 1
            try:
                self._cond.wait_for(lambda: not self._installing and self._stepping == 0)
            finally:
                self._installs_waiting -= 1
            self._installing = True
        try:
            rebind()
        except BaseException as e:
            self._failure = f"weight install of version {version} failed: {e}"
            raise
        else:
            self._version = version
        finally:
            with self._cond:
                self._installing = False
                self._cond.notify_all()


@dataclass
class RowOutput:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the policy version that sampled each token
    finish_reason: FinishReason = "length"
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)


class GenerationCancelled(Exception):
    """The request's client went away (engine.generate set GenerateParams.cancel): stop decoding."""


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
    gate: WeightsGate | None = None,
    cancel: threading.Event | Sequence[threading.Event] | None = None,
) -> list[RowOutput]:
    """Decode one completion per row; row r continues prompts[row_prompt[r]] using generators[r].

    `cancel`: one event for every row, or one per row (rows of several requests decoded together): a row
    whose event is set leaves the batch at the next step (its output is partial); once every row is
    cancelled, GenerationCancelled is raised.

    Behaviour logprobs are log_softmax(logits) at temperature 1 over the full vocabulary (what an
    importance ratio needs), whatever temperature/top_p the sampling used. A stop token ends its row and
    is included in its token_ids. Every forward runs under `gate.step()` (weights may be installed between
    two forwards); a token is labelled with the version of the forward whose logits sampled it, and the
    first forward under a new version re-prefills the whole context instead of extending the cache.
    """
    gate = gate if gate is not None else WeightsGate()
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
    with gate.step() as version:
        out = model(
            input_ids=ids_U_L, attention_mask=mask_U_L, position_ids=pos_U_L, use_cache=True, logits_to_keep=1
        )
        cache_version = version  # the weights that computed the cache and logits_B_V
        # prefill each distinct prompt once, then give every sample row its own copy of the cache
        sel_B = torch.tensor(row_prompt, device=device)
        cache = out.past_key_values
        cache.batch_select_indices(sel_B)
        logits_B_V = out.logits[:, -1].float()[sel_B]
    mask_B_L = mask_U_L[sel_B]
    next_pos_B = pos_U_L[sel_B, -1] + 1

    rows = [RowOutput() for _ in row_prompt]
    stop = set(stop_token_ids)
    row_cancel = [cancel] * len(row_prompt) if isinstance(cancel, threading.Event) else cancel
    active = list(range(len(row_prompt)))  # original row index of each batch row
    for step in range(max_new_tokens):
        if row_cancel is not None and all(row_cancel[r].is_set() for r in active):
            raise GenerationCancelled(f"abandoned after {step} of {max_new_tokens} new tokens")
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
            row.versions.append(cache_version)
            if return_top_k:
                row.top_ids.append(top_ids[b])
                row.top_logprobs.append(top_lps[b])
            if tok_list[b] in stop:
                row.finish_reason = "stop"
            elif step < max_new_tokens - 1 and not (row_cancel is not None and row_cancel[r].is_set()):
                keep.append(b)
        if not keep:
            break
        if len(keep) < len(active):  # drop finished rows so the tail of long samples decodes cheaply
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask_B_L, next_pos_B, tok_B, sel_B = mask_B_L[idx], next_pos_B[idx], tok_B[idx], sel_B[idx]
            active = [active[b] for b in keep]
        mask_B_L = torch.cat([mask_B_L, mask_B_L.new_ones((len(active), 1))], dim=1)
        with gate.step() as version:
            if version == cache_version:
                out = model(
                    input_ids=tok_B[:, None],
                    attention_mask=mask_B_L,
                    position_ids=next_pos_B[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
            else:  # new weights since the last forward: recompute the whole context's cache under them
                del cache, out
                sampled_B_S = torch.tensor([rows[r].token_ids for r in active], device=device)
                ids_B_T = torch.cat([ids_U_L[sel_B], sampled_B_S], dim=1)
                pos_B_T = (mask_B_L.cumsum(-1) - 1).clamp(min=0)
                out = model(
                    input_ids=ids_B_T,
                    attention_mask=mask_B_L,
                    position_ids=pos_B_T,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache_version = version
            cache = out.past_key_values
            logits_B_V = out.logits[:, -1].float()
        next_pos_B = next_pos_B + 1
    return rows


def sample_groups(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    params: GenerateParams,
    max_batch_size: int,
    gate: WeightsGate | None = None,
) -> list[Sample]:
    """`params.n` samples of every prompt (one request): `sample_requests` of that request alone."""
    return sample_requests(model, [(prompt_ids, params)], max_batch_size, gate)[0]


def sample_requests(
    model: PreTrainedModel,
    requests: Sequence[tuple[list[list[int]], GenerateParams]],
    max_batch_size: int,
    gate: WeightsGate | None = None,
) -> list[list[Sample]]:
    """The samples of several requests decoded together, `max_batch_size` rows at a time, each distinct
    prompt of a batch prefilled once (the G requests of n = 1 of one group share one prefill). The requests
    must agree on what `sample_rows` takes once for all rows (`batch_key`). Row (request k, prompt i, sample
    j) draws from its own generator seeded with row_seed(seed_k, i, first_sample_index_k + j), so a sample
    does not depend on how the rows were batched. Without a gate every sample is version 0."""
    if len({batch_key(p) for _, p in requests}) > 1:
        raise ValueError("requests decoded together must share their sampling settings (batch_key)")
    p0 = requests[0][1]
    rows = [(k, i, j) for k, (ids, p) in enumerate(requests) for i in range(len(ids)) for j in range(p.n)]
    out: list[list[Sample]] = [[] for _ in requests]
    for start in range(0, len(rows), max_batch_size):
        chunk = rows[start : start + max_batch_size]
        slot: dict[tuple[int, ...], int] = {}
        for k, i, _ in chunk:
            slot.setdefault(tuple(requests[k][0][i]), len(slot))
        outputs = sample_rows(
            model,
            [list(p) for p in slot],
            [slot[tuple(requests[k][0][i])] for k, i, _ in chunk],
            [
                torch.Generator().manual_seed(
                    row_seed(requests[k][1].seed, i, requests[k][1].first_sample_index + j)
                )
                for k, i, j in chunk
            ],
            max_new_tokens=p0.max_new_tokens,
            temperature=p0.temperature,
            top_p=p0.top_p,
            stop_token_ids=p0.stop_token_ids,
            return_top_k=p0.return_top_k,
            gate=gate,
            cancel=[requests[k][1].cancel for k, _, _ in chunk],
        )
        for (k, i, _), row in zip(chunk, outputs, strict=True):
            out[k].append(
                Sample(
                    prompt_index=i,
                    token_ids=row.token_ids,
                    logprobs=row.logprobs,
                    finish_reason=row.finish_reason,
                    first_token_version=row.versions[0],
                    last_token_version=row.versions[-1],
                    top_ids=row.top_ids if p0.return_top_k else None,
                    top_logprobs=row.top_logprobs if p0.return_top_k else None,
                )
            )
    return out


def batch_key(params: GenerateParams) -> tuple:
    """What the rows of one decoding batch share: requests with equal keys can be decoded together."""
    return (
        params.max_new_tokens,
        params.temperature,
        params.top_p,
        tuple(params.stop_token_ids),
        params.return_top_k,
    )


@dataclass
class _Request:
    prompt_ids: list[list[int]]
    params: GenerateParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Sample]]

    def resolve(self, samples: list[Sample] | None, error: BaseException | None) -> None:
        def settle() -> None:
            if self.future.done():  # the handler was cancelled meanwhile
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(samples or [])

        self.loop.call_soon_threadsafe(settle)


class HFEngine(RolloutEngine):
    backend = "hf"

    def __init__(self, model: PreTrainedModel, max_batch_size: int, **kw) -> None:
        super().__init__(**kw)
        self.model = model
        self.max_batch_size = max_batch_size
        # name -> the live Parameter/buffer object itself (tied names map to the same object)
        self._targets = model.state_dict(keep_vars=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")  # generation
        self._waiting: list[_Request] = []  # requests not yet taken by the generation thread
        self._waiting_lock = threading.Lock()
        self.batch_sizes: list[int] = []  # requests per decoding batch, in order (recent ones; for tests)
        self._gate = WeightsGate(self.version)  # installs land between two forwards of a generation

    @classmethod
    async def create(cls, cfg: RolloutConfig) -> HFEngine:
        return await asyncio.to_thread(cls.load, cfg)

    @classmethod
    def load(cls, cfg: RolloutConfig) -> HFEngine:
        device = resolve_device(cfg.device)
        dtype = DTYPES.get(cfg.dtype, "auto")
        log.info("loading %s on %s (dtype %s)", cfg.model, device, cfg.dtype)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = load_causal_lm(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
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
        request = _Request(prompt_ids, params, loop, loop.create_future())
        with self._waiting_lock:
            self._waiting.append(request)
        self._pool.submit(self._decode_waiting)  # one turn per request: none waits unserved
        return await request.future

    def _decode_waiting(self) -> None:
        """A turn of the generation thread: the oldest waiting request and every other waiting one it can be
        decoded with (same `batch_key`: the pipelined worker's n = 1 requests) are decoded as one batch, so
        requests that arrive while a batch decodes share the next one instead of running one by one."""
        with self._waiting_lock:
            abandoned = [r for r in self._waiting if r.params.cancel.is_set()]
            waiting = [r for r in self._waiting if not r.params.cancel.is_set()]
            key = batch_key(waiting[0].params) if waiting else None
            batch = [r for r in waiting if batch_key(r.params) == key]
            self._waiting = [r for r in waiting if batch_key(r.params) != key]
        for r in abandoned:
            r.resolve(None, GenerationCancelled("abandoned before decoding started"))
        if not batch:
            return
        self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]
        try:
            results = sample_requests(
                self.model, [(r.prompt_ids, r.params) for r in batch], self.max_batch_size, self._gate
            )
        except BaseException as e:  # every request of the batch gets the error (an engine failure)
            for r in batch:
                r.resolve(None, e)
            return
        for r, samples in zip(batch, results, strict=True):
            r.resolve(samples, None)

    def _prepare(self, staged: StagedWeights) -> None:
        # fresh, writable tensors on the model's device, made before the update lock (the parsed tensors
        # alias read-only request bytes): the swap itself is then only pointer assignments
        device = self.model.device
        move = owned_copy if device.type == "cpu" else lambda t: t.to(device)
        staged.tensors = {name: move(staged.tensors[name]) for name in self.schema.specs}

    async def _install(self, staged: StagedWeights) -> None:
        # not on the generation thread, which may be busy for minutes: the gate waits for one forward
        await asyncio.to_thread(self._install_sync, staged)

    def _install_sync(self, staged: StagedWeights) -> None:
        self._gate.install(staged.version, lambda: self._rebind(staged))

    @torch.inference_mode()
    def _rebind(self, staged: StagedWeights) -> None:
        # validated (every spec present, right shape and dtype) and already on the device: rebinding the
        # data of each live parameter cannot fail halfway; tied aliases share the spec's Parameter object.
        # On an accelerator the previous forward's kernels may still be queued: they read the old tensors,
        # whose memory the caching allocator reuses only for work queued after them on the same stream.
        for name in self.schema.specs:
            self._targets[name].data = staged.tensors[name]

    async def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
