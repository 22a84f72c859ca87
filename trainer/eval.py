"""Evaluation through the rollout service: pass@1 and avg@n on a held-out prompt file.

    avg@n   mean over prompts of the fraction of n samples the verifier accepts (an unbiased pass@1 estimate)
    pass@n  fraction of prompts with at least one accepted sample
    pass@1  greedy decoding's accuracy when greedy, else avg@n

Greedy decoding goes through the ordinary sampling API: with top_p -> 0 the nucleus (the smallest set whose
mass reaches top_p) is the single most likely token. Completions are judged on their text up to the first
special token, exactly as the rollout worker does (services/common/verifiers.py `completion_text`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from services.common.prompts import Prompt, load_prompts
from services.common.verifiers import Verifier, completion_text
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


def evaluate(
    client: Any, tokenizer: Any, prompts: list[Prompt], verifier: Verifier, settings: EvalSettings
) -> dict[str, float]:
    """`eval/pass@1`, `eval/avg@n`, `eval/pass@n`, `eval/length`, `time/eval` over `prompts`."""
    t0 = time.perf_counter()
    completions = _generate(client, tokenizer, prompts, settings)
    scores: list[list[float]] = []
    lengths: list[int] = []
    for prompt, samples in zip(prompts, completions, strict=True):
        if not samples:
            raise RuntimeError(f"rollout returned no sample for eval prompt row {prompt.row}")
        scores.append([float(verifier(completion_text(tokenizer, ids), prompt.answer)) for ids in samples])
        lengths.extend(len(ids) for ids in samples)
    n = len(scores[0])
    avg = sum(sum(s) / len(s) for s in scores) / len(scores)
    return {
        "eval/pass@1": avg,  # greedy: n = 1, so avg is the greedy accuracy
        f"eval/avg@{n}": avg,
        f"eval/pass@{n}": sum(1.0 for s in scores if max(s) > 0) / len(scores),
        "eval/length": sum(lengths) / len(lengths),
        "time/eval": time.perf_counter() - t0,
    }


def load_eval_prompts(path: str, tokenizer: Any, max_prompts: int = 0) -> list[Prompt]:
    prompts = load_prompts(path, tokenizer=tokenizer)
    return prompts[:max_prompts] if max_prompts else prompts
