"""Synthetic but valid experience records, computed from real student and teacher models.

For tests, benchmarks and smoke runs of the trainer without a rollout service or a teacher service:
completions are random non-special tokens (ending in `eos_id` when given), and every log-probability in the
record is the real one under the given models, as the rollout service and the teacher would have sent it:

    behaviour_logprobs        student log pi(y_t | c_t), full vocabulary, temperature 1
    behaviour_top_ids/_lp     the student's top-`behaviour_top_k`
    teacher_topk_ids/_lp      the teacher's top-`top_k`, by descending log q
    teacher_target_logprobs   teacher log q(y_t | c_t)
    teacher_candidate_*       teacher log q at the student's top ids (the student-top-K support)
"""

from __future__ import annotations

import numpy as np
import redis
import torch
from torch import nn

from services.common import redis_keys
from services.common.experience import ExperienceRecord, SampleRecord, encode


@torch.no_grad()
def _completion_logprobs(
    model: nn.Module, prompt: np.ndarray, completions: list[np.ndarray]
) -> list[torch.Tensor]:
    """Per completion, [L, V] full-vocabulary log-probabilities at its positions (one right-padded forward)."""
    P = len(prompt)
    S = P + max(len(c) for c in completions)
    ids = torch.zeros(len(completions), S, dtype=torch.long)
    mask = torch.zeros(len(completions), S, dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, : P + len(c)] = torch.from_numpy(np.concatenate([prompt, c]))
        mask[i, : P + len(c)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (G, S, V)
    return [torch.log_softmax(logits[i, P - 1 : P - 1 + len(c)], dim=-1) for i, c in enumerate(completions)]


def synthetic_records(
    student: nn.Module,
    teacher: nn.Module,
    *,
    n_records: int,
    group_size: int,
    prompt_len: int = 6,
    completion_len: tuple[int, int] = (4, 12),
    top_k: int = 8,
    behaviour_top_k: int = 8,
    special_ids: list[int] | None = None,
    eos_id: int | None = None,
    policy_versions: list[int] | None = None,
    seed: int = 0,
    run_tag: str = "synth",
) -> list[ExperienceRecord]:
    """`n_records` records of `group_size` samples each; record i has version `policy_versions[i]` (default 0)."""
    vocab = int(student.get_output_embeddings().weight.shape[0])
    specials = set(special_ids or [])
    allowed = np.array([i for i in range(vocab) if i not in specials], dtype=np.int64)
    rng = np.random.default_rng(seed)
    records = []
    for r in range(n_records):
        prompt = rng.choice(allowed, size=prompt_len)
        completions = []
        for _ in range(group_size):
            completion = rng.choice(allowed, size=int(rng.integers(completion_len[0], completion_len[1] + 1)))
            if eos_id is not None:
                completion[-1] = eos_id
            completions.append(completion)
        student_lps = _completion_logprobs(student, prompt, completions)  # each (L, V)
        teacher_lps = _completion_logprobs(teacher, prompt, completions)
        samples = []
        for completion, lp_s, lp_t in zip(completions, student_lps, teacher_lps, strict=True):
            y = torch.from_numpy(completion)[:, None]
            t_top = lp_t.topk(top_k, dim=-1)
            s_top = lp_s.topk(behaviour_top_k, dim=-1)
            samples.append(
                SampleRecord(
                    completion_ids=completion.astype(np.int32),
                    behaviour_logprobs=lp_s.gather(1, y)[:, 0].numpy(),
                    teacher_topk_ids=t_top.indices.numpy().astype(np.int32),
                    teacher_topk_logprobs=t_top.values.numpy(),
                    teacher_target_logprobs=lp_t.gather(1, y)[:, 0].numpy(),
                    finish_reason="stop" if eos_id is not None else "length",
                    teacher_model_id="synthetic-teacher",
                    teacher_candidate_ids=s_top.indices.numpy().astype(np.int32),
                    teacher_candidate_logprobs=lp_t.gather(1, s_top.indices).numpy(),
                    behaviour_top_ids=s_top.indices.numpy().astype(np.int32),
                    behaviour_top_logprobs=s_top.values.numpy(),
                )
            )
        records.append(
            ExperienceRecord(
                record_id=f"{run_tag}-{r}",
                policy_version=policy_versions[r] if policy_versions else 0,
                prompt_ids=prompt.astype(np.int32),
                samples=samples,
            )
        )
    return records


def write_records(
    client: redis.Redis, run: str, records: list[ExperienceRecord], task: str = ""
) -> list[str]:
    """XADD each record (encoded) to `opd:<run>:experience` (or the task's stream), as a rollout worker
    would; returns entry ids."""
    stream = redis_keys.experience_stream(run, task)
    pipe = client.pipeline(transaction=False)
    for rec in records:
        pipe.xadd(stream, {redis_keys.RECORD_FIELD: encode(rec)})
    return [i.decode() if isinstance(i, bytes) else str(i) for i in pipe.execute()]
