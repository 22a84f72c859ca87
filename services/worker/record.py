"""One experience record from one prompt: the rollout service's samples and the teacher's scores, assembled
into an `ExperienceRecord` (services/common/experience.py); pure functions, no I/O."""

from __future__ import annotations

import hashlib

import numpy as np
from opd_teacher_client import ScoredRows

from services.common.experience import ExperienceRecord, SampleRecord
from services.common.prompts import Prompt
from services.rollout.protocol import GenerateResponse, Sample


def request_seed(base: int, row: int, epoch: int) -> int:
    """Sampling seed of one prompt: the same (base, row, epoch) always gives the same samples."""
    digest = hashlib.blake2b(f"{base}:{row}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def scorable(response: GenerateResponse) -> list[Sample]:
    """Samples that can be scored: the teacher needs at least one completion position."""
    return [s for s in response.samples if s.token_ids]


def build_record(
    record_id: str,
    prompt: Prompt,
    response: GenerateResponse,
    scored: list[ScoredRows],  # one per scorable sample
    teacher_model_id: str,
    task: str = "",
    rewards: list[float] | None = None,
    with_candidates: bool = False,
    candidate_ids: list[np.ndarray | None] | None = None,
) -> ExperienceRecord:
    """Assemble one experience record from a generate response (one prompt) and the teacher's scores.

    Per sample of completion length L: behaviour logprobs [L] from the rollout service; teacher top-K
    ids/logprobs [L, K] and target logprobs [L]; with `with_candidates` the behaviour top ids [L, C] are
    the teacher's candidates and their teacher logprobs [L, C] are stored beside them. `candidate_ids`
    (one [L, C] per sample, e.g. with alias ids) replaces the behaviour top ids as the stored candidates.

    The record's policy_version is the oldest version that sampled any of its tokens (the samples' first
    token versions): the rollout service swaps weights without draining, so one sample can span versions,
    and the trainer's staleness rule must judge a record by its oldest token.
    """
    samples = scorable(response)
    if len(scored) != len(samples):
        raise ValueError(f"{len(scored)} teacher results for {len(samples)} samples")
    if rewards is not None and len(rewards) != len(samples):
        raise ValueError(f"{len(rewards)} rewards for {len(samples)} samples")
    out = []
    for i, (s, rows) in enumerate(zip(samples, scored, strict=True)):
        n = len(s.token_ids)
        if rows.topk_ids.shape[0] != n or rows.target_logprobs.shape != (n,):
            raise ValueError(f"sample {i}: teacher returned {rows.topk_ids.shape[0]} rows for {n} tokens")
        behaviour_top_ids = behaviour_top_logprobs = None
        if s.top_ids is not None:
            behaviour_top_ids = np.asarray(s.top_ids, dtype=np.int32).reshape(n, -1)  # [L, C]
            behaviour_top_logprobs = np.asarray(s.top_logprobs, dtype=np.float32).reshape(n, -1)  # [L, C]
        cand_ids = cand_lp = None
        if candidate_ids is not None and candidate_ids[i] is not None:
            if rows.candidate_logprobs is None:
                raise ValueError(f"sample {i}: candidates were asked but the teacher scored none")
            cand_ids = np.asarray(candidate_ids[i], dtype=np.int32)
            cand_lp = np.asarray(rows.candidate_logprobs, dtype=np.float32)  # [L, C]
            if cand_lp.shape != cand_ids.shape:
                raise ValueError(
                    f"sample {i}: candidate logprobs {cand_lp.shape} for candidates {cand_ids.shape}"
                )
        elif with_candidates:
            if behaviour_top_ids is None or rows.candidate_logprobs is None:
                raise ValueError(
                    f"sample {i}: student_topk support needs behaviour top ids and candidate scores"
                )
            cand_ids = behaviour_top_ids
            cand_lp = np.asarray(rows.candidate_logprobs, dtype=np.float32)  # [L, C]
            if cand_lp.shape != cand_ids.shape:
                raise ValueError(
                    f"sample {i}: candidate logprobs {cand_lp.shape} for candidates {cand_ids.shape}"
                )
        out.append(
            SampleRecord(
                completion_ids=np.asarray(s.token_ids, dtype=np.int32),
                behaviour_logprobs=np.asarray(s.logprobs, dtype=np.float32),
                teacher_topk_ids=np.asarray(rows.topk_ids, dtype=np.int32),
                teacher_topk_logprobs=np.asarray(rows.topk_logprobs, dtype=np.float32),
                teacher_target_logprobs=np.asarray(rows.target_logprobs, dtype=np.float32),
                finish_reason=s.finish_reason,
                teacher_model_id=teacher_model_id,
                teacher_candidate_ids=cand_ids,
                teacher_candidate_logprobs=cand_lp,
                behaviour_top_ids=behaviour_top_ids,
                behaviour_top_logprobs=behaviour_top_logprobs,
                reward=None if rewards is None else float(rewards[i]),
            )
        )
    return ExperienceRecord(
        record_id=record_id,
        policy_version=min((s.first_token_version for s in samples), default=response.policy_version),
        prompt_ids=np.asarray(response.prompt_ids[0], dtype=np.int32),
        samples=out,
        task=task,
        prompt_text=prompt.text,
        answer=prompt.answer,
    )


class BadPromptError(ValueError):
    """The services' answer for this prompt cannot make a record (e.g. every completion is empty)."""
