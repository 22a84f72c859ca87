"""Evaluation through the rollout service: pass@1 and avg@n on a held-out prompt file.

    avg@n   mean over prompts of the fraction of n samples accepted (an unbiased pass@1 estimate)
    pass@n  fraction of prompts with at least one accepted sample
    pass@1  greedy decoding's accuracy when greedy, else avg@n

A sample is accepted STRICTLY (the headline `eval/pass@1`, `eval/avg@n`, `eval/pass@n`) when the verifier
accepts its text and it ends with the student's own end marker (services/common/verifiers.py
`ends_with_own_marker`): what the student, served alone, would answer. The LENIENT scores
(`eval/pass@1_lenient`, ...) only ask the verifier, which judges the text up to the first special token of
either model (`completion_text`, as the rollout worker does), so an answer closed with the teacher's end
marker counts there. `eval/ends_own_eos` is the share of samples that end with their own marker.

Greedy decoding goes through the ordinary sampling API: with top_p -> 0 the nucleus (the smallest set whose
mass reaches top_p) is the single most likely token. `evaluate_splits` runs the same eval on the test file
(`eval/...`) and, when given, on validation prompts (`val/...`), the split checkpoint selection reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from services.common.prompts import Prompt, load_prompts
from services.common.verifiers import Verifier, own_end_ids, score_samples
from services.rollout.protocol import GREEDY_TOP_P, GenerateRequest


@dataclass
class EvalSettings:
    n: int = 1
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 256
    chat_template: bool = False
    seed: int = 0
    request_size: int = 64  # prompts per generate call
    end_ids: tuple[int, ...] = ()  # the student's end markers besides its tokenizer's eos (strict scores)


def _generate(client: Any, tokenizer: Any, prompts: list[Prompt], s: EvalSettings) -> list[list[list[int]]]:
    """Completion token ids [prompt][sample] for the prompts, in order."""
    n = 1 if s.greedy else s.n
    out: list[list[list[int]]] = []
    for start in range(0, len(prompts), s.request_size):
        chunk = prompts[start : start + s.request_size]
        kw: dict[str, Any] = dict(
            n=n,
            max_new_tokens=s.max_new_tokens,
            temperature=1.0 if s.greedy else s.temperature,
            top_p=GREEDY_TOP_P if s.greedy else s.top_p,
            seed=s.seed + start,
        )
        if all(p.token_ids is not None for p in chunk):
            req = GenerateRequest(prompts=[list(p.token_ids or ()) for p in chunk], **kw)
        elif all(p.token_ids is None for p in chunk):
            req = GenerateRequest(texts=[p.text for p in chunk], chat_template=s.chat_template, **kw)
        else:
            raise ValueError("eval file mixes `prompt` and `messages` rows; use one kind")
        resp = client.generate(req)
        per_prompt: list[list[list[int]]] = [[] for _ in chunk]
        for sample in resp.samples:
            per_prompt[sample.prompt_index].append(sample.token_ids)
        out.extend(per_prompt)
    return out


def _rates(scores: list[list[float]], prefix: str, suffix: str) -> dict[str, float]:
    n = len(scores[0])
    avg = sum(sum(s) / len(s) for s in scores) / len(scores)
    return {
        f"{prefix}/pass@1{suffix}": avg,  # greedy: n = 1, so avg is the greedy accuracy
        f"{prefix}/avg@{n}{suffix}": avg,
        f"{prefix}/pass@{n}{suffix}": sum(1.0 for s in scores if max(s) > 0) / len(scores),
    }


def evaluate(
    client: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    verifier: Verifier,
    settings: EvalSettings,
    prefix: str = "eval",
) -> dict[str, float]:
    """`<prefix>/pass@1` (strict), `/avg@n`, `/pass@n`, the same with `_lenient`, `/ends_own_eos`,
    `/length`, and `time/<prefix>` over `prompts`."""
    t0 = time.perf_counter()
    completions = _generate(client, tokenizer, prompts, settings)
    end_ids = own_end_ids(tokenizer, settings.end_ids)
    strict: list[list[float]] = []
    lenient: list[list[float]] = []
    own: list[bool] = []
    lengths: list[int] = []
    for prompt, samples in zip(prompts, completions, strict=True):
        if not samples:
            raise RuntimeError(f"rollout returned no sample for eval prompt row {prompt.row}")
        scored = score_samples(tokenizer, samples, prompt.answer, verifier, end_ids)
        lenient.append(scored.lenient)
        strict.append(scored.strict)
        own.extend(scored.own)
        lengths.extend(len(ids) for ids in samples)
    return {
        **_rates(strict, prefix, ""),
        **_rates(lenient, prefix, "_lenient"),
        f"{prefix}/ends_own_eos": sum(own) / len(own),
        f"{prefix}/length": sum(lengths) / len(lengths),
        f"time/{prefix}": time.perf_counter() - t0,
    }


def evaluate_splits(
    client: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    val_prompts: list[Prompt],
    verifier: Verifier,
    settings: EvalSettings,
) -> dict[str, float]:
    """`evaluate` on the test prompts (`eval/...`) and, when there are any, on the validation prompts
    (`val/...`). Checkpoint selection reads `val/pass@1` only (experiments/paper.py `select_checkpoint`);
    the test scores are reported for the selected checkpoint, never used to pick it."""
    out = evaluate(client, tokenizer, prompts, verifier, settings)
    if val_prompts:
        out.update(evaluate(client, tokenizer, val_prompts, verifier, settings, prefix="val"))
    return out


def load_eval_prompts(path: str, tokenizer: Any, max_prompts: int = 0) -> list[Prompt]:
    prompts = load_prompts(path, tokenizer=tokenizer)
    return prompts[:max_prompts] if max_prompts else prompts
