"""The worker's side of special-token aliases (docs/aliases.md): what the teacher is asked, and how its
answer is mapped back to the student's positions. One Score call per prompt, as without aliases.

Single-token aliases s <- a: every row asks the teacher for the log-probabilities of all alias ids (both
sides) as candidates, next to the behaviour top-k when the support is student_topk. The record stores them;
the trainer merges them (trainer/aliases.py).

Multi-token aliases s <- a_1 .. a_n: the teacher scores a rewritten sequence in which every s (prompt and
completion) is replaced by its spelling; the rows are then folded back onto the student positions:

    target   log q'(s) = sum_j log q(a_j | ctx, a_<j)                 (teacher-forced, exact)
    rows     top-K and candidates: the teacher's row at the first teacher token of each student position,
             as the teacher wrote it (its next-token distribution given the prefix in its own spelling)

A row is a function of the prefix only, whatever the student sampled there: the teacher's mass for s
(the whole spelling) would need the spelling teacher-forced at every prefix, so no row resolves it, not
even where the student wrote s (the trainer drops s from the rows; docs/aliases.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from opd_teacher_client import ScoredRows
from prometheus_client import CollectorRegistry, Counter

from services.common.config import ConfigError
from services.common.token_aliases import AliasMap, parse_aliases, resolve_aliases

log = logging.getLogger(__name__)


@dataclass
class Spelled:
    """A prompt + completion with every multi-token-aliased student id replaced by its teacher spelling."""

    token_ids: list[int]  # the teacher's sequence
    score_from: int  # length of the rewritten prompt
    first_row_L: np.ndarray  # int64 [L]: teacher row (from score_from) of each student completion position
    span_L: np.ndarray  # int64 [L]: teacher tokens standing for it (n for a spelled alias, else 1)

    @property
    def rows(self) -> int:
        return len(self.token_ids) - self.score_from


def spell_out(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], spellings: dict[int, tuple[int, ...]]
) -> Spelled:
    """Replace each student id that has a spelling by the spelling (prompt and completion)."""
    prompt: list[int] = []
    for tok in prompt_ids:
        prompt.extend(spellings.get(int(tok), (int(tok),)))
    seq, first, span = list(prompt), [], []
    for tok in completion_ids:
        piece = spellings.get(int(tok), (int(tok),))
        first.append(len(seq) - len(prompt))
        span.append(len(piece))
        seq.extend(piece)
    return Spelled(seq, len(prompt), np.asarray(first, np.int64), np.asarray(span, np.int64))


def fold_rows(rows: ScoredRows, spelled: Spelled) -> ScoredRows:
    """The teacher's rows of a `spell_out` sequence -> one row per student completion position (docstring
    of this module): each student position's target is the sum of its teacher tokens' targets (the whole
    spelling, teacher-forced), its top-K and candidate rows those of its first teacher token."""
    r_L, n_L = spelled.first_row_L, spelled.span_L
    csum = np.concatenate([[0.0], np.cumsum(rows.target_logprobs.astype(np.float64))])
    target_L = (csum[r_L + n_L] - csum[r_L]).astype(np.float32)
    cand_LC = None if rows.candidate_logprobs is None else rows.candidate_logprobs[r_L]
    return ScoredRows(rows.topk_ids[r_L], rows.topk_logprobs[r_L], target_L, cand_LC)


class WorkerAliases:
    """Resolved aliases plus what the worker does with them; built once at start."""

    def __init__(self, amap: AliasMap, registry: CollectorRegistry | None = None):
        self.amap = amap
        self.alias_ids = amap.candidate_ids  # int32 [A], asked on every row
        self.spellings = amap.spellings
        self.fired = Counter(
            "opd_worker_alias_fired",
            "completion positions where the student wrote an aliased token",
            ["alias"],
            registry=registry,
        )

    @classmethod
    def from_config(
        cls, raw: Any, student_tokenizer: Any, teacher_tokenizer_path: str | None, registry=None
    ) -> WorkerAliases | None:
        specs = parse_aliases(raw)
        if not specs:
            return None
        teacher_tok = None
        if teacher_tokenizer_path:
            from transformers import AutoTokenizer

            teacher_tok = AutoTokenizer.from_pretrained(teacher_tokenizer_path)
        return cls(resolve_aliases(specs, student_tokenizer, teacher_tok), registry)

    def check_teacher(self, info: Any, behaviour_k: int) -> None:
        """Refuse a teacher that cannot serve these aliases (at start, not at the first prompt)."""
        ids = {i for a in self.amap.aliases for i in (a.student_id, *a.teacher_ids)}
        if ids and max(ids) >= info.vocab_size:
            raise ConfigError(
                f"token_aliases: id {max(ids)} is outside the teacher's vocabulary of {info.vocab_size}"
            )
        if self.alias_ids.size:
            if not info.supports_candidates:
                raise ConfigError(
                    f"token_aliases: single-token aliases need the teacher to score candidate ids; backend "
                    f"{info.backend!r} does not (serve the teacher with backend 'hf')"
                )
            per_row = behaviour_k + self.alias_ids.size
            if per_row > info.max_candidates:
                raise ConfigError(
                    f"token_aliases: {per_row} candidates per row > the teacher's max_candidates "
                    f"{info.max_candidates}"
                )

    def candidates(self, behaviour_LC: np.ndarray | None, length: int) -> np.ndarray | None:
        """int32 [L, C]: the behaviour top ids (if any) then the alias ids, on every student row."""
        parts = [] if behaviour_LC is None else [np.asarray(behaviour_LC, np.int32)]
        if self.alias_ids.size:
            parts.append(np.broadcast_to(self.alias_ids, (length, self.alias_ids.size)))
        return np.concatenate(parts, axis=1) if parts else None

    def count(self, completions: list[list[int]]) -> None:
        """Count the positions where the student wrote an aliased token (Prometheus)."""
        for a in self.amap.aliases:
            n = sum(c.count(a.student_id) for c in completions)
            if n:
                self.fired.labels(a.name).inc(n)

    def score(
        self,
        score_fn: Any,  # TeacherClient.score with top_k/request_id bound: (seqs, score_from, candidates)
        prompt_ids: list[int],
        completions: list[list[int]],
        candidates: list[np.ndarray | None],
    ) -> list[ScoredRows]:
        """One teacher call for all samples, rows folded back to the student positions."""
        if not self.spellings:
            return score_fn(
                [prompt_ids + c for c in completions], [len(prompt_ids)] * len(completions), candidates
            )
        spelled = [spell_out(prompt_ids, c, self.spellings) for c in completions]
        teacher_cands = [
            None if c is None else np.ascontiguousarray(_rows_for(c, sp))
            for c, sp in zip(candidates, spelled, strict=True)
        ]
        scored = score_fn([sp.token_ids for sp in spelled], [sp.score_from for sp in spelled], teacher_cands)
        return [fold_rows(rows, sp) for rows, sp in zip(scored, spelled, strict=True)]


def _rows_for(cands_LC: np.ndarray, sp: Spelled) -> np.ndarray:
    """Student-row candidates -> teacher rows: each teacher row asks what its student row asks."""
    student_of_row = np.repeat(np.arange(len(sp.span_L)), sp.span_L)  # [R]
    return cands_LC[student_of_row]
