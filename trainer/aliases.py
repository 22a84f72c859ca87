"""Special-token aliases in the trainer: the teacher's scores of a sample, rewritten to the merged teacher
distribution, and the per-batch alias metrics (docs/aliases.md).

For single-token aliases s <- a_1 .. a_m (student id s, teacher ids a_i; the ids share one space) the
teacher distribution the student is trained towards is the push-forward

    q'(s)   = q(s) + sum_i q(a_i)        (log-add-exp of the teacher's log-probabilities)
    q'(a_i) = 0                          (no mass: a_i leaves every support, and its reward is 0)
    q'(v)   = q(v)                       every other id

and every place the trainer reads the teacher uses q':

    target      log q'(y_t) for the sampled token (sampled-token OPD, the sampled slot of a support); where
                y_t is some a_i, log q'(y_t) = -inf is not a usable reward: the position's reward is 0 and
                its sampled slot is masked (`rewrite_sample`'s target_ok)
    teacher top-K   each a_i is reported as s, duplicates merged into one slot holding log q'(s); the freed
                slot is masked; the row is re-sorted and cut to K (so with more than K ids in the record the
                (K+1)-th teacher id moves up)
    student top-K   log q'(v) at the behaviour top-k ids; a behaviour top id a_i is masked
    full KL     the row covers the vocabulary: s holds log q'(s), each a_i FOREIGN_LOGPROB (the one place
                the floor remains: the full-vocabulary reference has no support mask)

No loss or gradient of the LSM and sampled-token objectives depends on the value of FOREIGN_LOGPROB.

q(s) and q(a_i) on every row come from the teacher's candidates, which the worker asks for every row
(services/worker/aliasing.py). Multi-token aliases were already folded by the worker (rows as the teacher
wrote them, the target of s teacher-forced); here their student ids leave the teacher's rows (`row_dropped`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from services.common.experience import SampleRecord
from services.common.token_aliases import FOREIGN_LOGPROB, AliasMap, parse_aliases, resolve_aliases


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer by hub id or path (lazy import: transformers is heavy)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def lookup_ids(ids_L_X: np.ndarray, cand_ids_L_C: np.ndarray, cand_lp_L_C: np.ndarray) -> np.ndarray:
    """float32 [L, X]: the candidate log-probability of each id on its row; NaN where it was not asked."""
    match_L_X_C = ids_L_X[:, :, None] == cand_ids_L_C[:, None, :]
    out = np.take_along_axis(cand_lp_L_C, match_L_X_C.argmax(-1), axis=1)
    return np.where(match_L_X_C.any(-1), out, np.nan).astype(np.float32)


def merged_group_logprobs(alias_lp_L_A: Tensor, member_cols: Sequence[Sequence[int]]) -> Tensor:
    """(L, G) log q'(s_g) = logsumexp of the teacher's log q over group g's members (s_g and its aliases)."""
    cols = [alias_lp_L_A[:, list(c)].float().logsumexp(dim=-1) for c in member_cols]
    return torch.stack(cols, dim=-1) if cols else alias_lp_L_A.new_zeros(alias_lp_L_A.shape[0], 0)


def merged_values(
    ids_L_X: Tensor,  # (L, X) int, student ids
    raw_L_X: Tensor,  # (L, X) the teacher's own log q at those ids
    merged_L_G: Tensor,  # (L, G) log q'(s_g)
    students: Tensor,  # (G,) int64, s_g
    foreign: Tensor,  # (F,) int64, the teacher-side alias ids
) -> Tensor:  # (L, X) log q' at the ids
    out_L_X = raw_L_X.float()
    for g in range(students.shape[0]):
        out_L_X = torch.where(ids_L_X == students[g], merged_L_G[:, g : g + 1], out_L_X)
    return torch.where(torch.isin(ids_L_X, foreign), FOREIGN_LOGPROB, out_L_X)


def merge_topk(
    ids_L_K: Tensor,  # (L, Kr) int64, the teacher's top ids as recorded (descending)
    lp_L_K: Tensor,  # (L, Kr) their log q
    merged_L_G: Tensor,  # (L, G)
    students: Tensor,  # (G,) int64
    members: Sequence[Tensor],  # per group: (M_g,) int64 ids merged into s_g (s_g included)
    foreign: Tensor,  # (F,) int64
    k: int,
) -> tuple[Tensor, Tensor, Tensor]:  # ids (L, k), log q' (L, k), keep (L, k) bool
    """The teacher's top-K of the merged distribution, as far as the recorded ids allow.

    In each group the slot of s_g keeps (relabelled from the first alias slot when s_g itself is absent) and
    holds log q'(s_g); the other slots of the group are masked (their ids stay, with FOREIGN_LOGPROB, so a
    full-vocabulary row still covers every id). Rows are re-sorted (kept slots by descending log q', masked
    ones last) and cut to k.
    """
    ids_L_K = ids_L_K.long().clone()
    keep_L_K = torch.ones_like(ids_L_K, dtype=torch.bool)
    for g in range(students.shape[0]):
        in_group_L_K = torch.isin(ids_L_K, members[g])
        own_L_K = ids_L_K == students[g]
        first_L_K = in_group_L_K & (in_group_L_K.cumsum(-1) == 1)
        keeper_L_K = torch.where(own_L_K.any(-1, keepdim=True), own_L_K, first_L_K)
        ids_L_K = torch.where(keeper_L_K, students[g], ids_L_K)
        keep_L_K &= ~(in_group_L_K & ~keeper_L_K)
    lp_L_K = merged_values(ids_L_K, lp_L_K, merged_L_G, students, foreign)
    order_L_K = torch.where(keep_L_K, lp_L_K, -torch.inf).argsort(dim=-1, descending=True, stable=True)[:, :k]
    return (
        ids_L_K.gather(1, order_L_K),
        lp_L_K.gather(1, order_L_K),
        keep_L_K.gather(1, order_L_K),
    )


@dataclass
class AliasStats:
    fired: int = 0  # positions whose sampled token is s
    relabelled: int = 0  # rows whose recorded top-K held a teacher-side alias id


class TrainerAliases:
    """Resolved aliases and the ids the ending metrics look at; built once at start (`from_config`)."""

    def __init__(self, amap: AliasMap, eos_id: int | None = None, other_special_ids: Sequence[int] = ()):
        self.amap = amap
        groups = amap.groups
        self.alias_ids = amap.candidate_ids  # int32 [A]
        col = {int(v): j for j, v in enumerate(self.alias_ids)}
        self.students = torch.tensor(list(groups), dtype=torch.int64)
        self.members = [torch.tensor(m, dtype=torch.int64) for m in groups.values()]
        self.member_cols = [[col[i] for i in m] for m in groups.values()]
        self.foreign = torch.from_numpy(amap.foreign_ids)
        # int64 [M]: student ids with a multi-token spelling; their teacher value q'(s) = q(spelling | c)
        # is known only where the student wrote s (teacher-forced), so no row holds them (docs/aliases.md)
        self.row_dropped = torch.tensor(sorted(amap.spellings), dtype=torch.int64)
        self.eos_id = eos_id
        self.other_special_ids = np.array(sorted(set(other_special_ids)), dtype=np.int64)

    @classmethod
    def from_config(cls, raw: Any, tokenizer: Any, teacher_tokenizer: Any = None) -> TrainerAliases:
        """`teacher_tokenizer` (a loaded tokenizer, its path, or None / "") resolves the teacher side of string
        aliases."""
        specs = parse_aliases(raw)
        if isinstance(teacher_tokenizer, str):
            teacher_tokenizer = load_tokenizer(teacher_tokenizer) if teacher_tokenizer and specs else None
        amap = resolve_aliases(specs, tokenizer, teacher_tokenizer) if specs else AliasMap()
        eos = tokenizer.eos_token_id
        plain = {eos, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
        return cls(amap, eos, [i for i in tokenizer.all_special_ids if i not in plain])

    @property
    def active(self) -> bool:
        """Whether records need rewriting (single-token aliases; multi-token ones are folded by the worker)."""
        return bool(self.amap.single)

    def check_sample(self, s: SampleRecord) -> str | None:
        """Why `s` cannot be rewritten (the worker did not ask for the alias candidates), or None."""
        if not self.active:
            return None
        if s.teacher_candidate_ids is None or s.teacher_candidate_logprobs is None:
            return "token_aliases need the teacher's candidate logprobs of the alias ids (worker token_aliases unset?)"
        lp = lookup_ids(
            np.broadcast_to(self.alias_ids, (len(s), self.alias_ids.size)),
            s.teacher_candidate_ids,
            s.teacher_candidate_logprobs,
        )
        if np.isnan(lp).any():
            return f"a row lacks the teacher's candidate logprob of an alias id {self.alias_ids.tolist()}"
        if not np.isfinite(lp).all() or (lp > 1e-4).any():
            return "alias candidate logprobs not finite or > 0"
        return None

    def rewrite_sample(
        self, s: SampleRecord, length: int, support: str, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Support ids [L, k], log q' [L, k], keep [L, k], the target log q'(y_t) [L] and target_ok [L] (False
        where y_t is a teacher-side alias id: q'(y_t) = 0, no reward) of one sample's first `length`
        positions (module docstring). Values at masked slots and at targets not ok are FOREIGN_LOGPROB and
        reach no loss. The record passed `check_sample`."""
        assert s.teacher_candidate_ids is not None and s.teacher_candidate_logprobs is not None
        L = length
        alias_lp = lookup_ids(
            np.broadcast_to(self.alias_ids, (L, self.alias_ids.size)),
            s.teacher_candidate_ids[:L],
            s.teacher_candidate_logprobs[:L],
        )
        merged_L_G = merged_group_logprobs(torch.from_numpy(alias_lp), self.member_cols)
        y_L1 = torch.from_numpy(s.completion_ids[:L].astype(np.int64))[:, None]
        target_L = merged_values(
            y_L1,
            torch.from_numpy(s.teacher_target_logprobs[:L])[:, None],
            merged_L_G,
            self.students,
            self.foreign,
        )[:, 0]
        target_ok_L = ~torch.isin(y_L1[:, 0], self.foreign)
        if support == "student_topk":
            assert s.behaviour_top_ids is not None  # check_record: student_topk records carry them
            ids = torch.from_numpy(s.behaviour_top_ids[:L, :k].astype(np.int64))
            raw = torch.from_numpy(
                lookup_ids(ids.numpy(), s.teacher_candidate_ids[:L], s.teacher_candidate_logprobs[:L])
            )
            lp = merged_values(ids, raw, merged_L_G, self.students, self.foreign)
            keep = ~torch.isin(ids, self.foreign)
        else:
            ids, lp, keep = merge_topk(
                torch.from_numpy(s.teacher_topk_ids[:L].astype(np.int64)),
                torch.from_numpy(s.teacher_topk_logprobs[:L]),
                merged_L_G,
                self.students,
                self.members,
                self.foreign,
                k,
            )
        return ids.numpy(), lp.numpy(), keep.numpy(), target_L.numpy(), target_ok_L.numpy()

    def batch_metrics(self, samples: Sequence[SampleRecord], k: int) -> dict[str, float]:
        """Per batch: how often each alias fired, and how the completions ended.

        alias/<name>/fired        completion positions whose sampled token is the alias's student id
        alias/<name>/relabelled   positions whose teacher top-K (first k ids) held the alias's teacher id
        response/ends_own_eos     share of samples whose last token is the student's end marker
        response/other_special    share of samples holding another special id (e.g. the teacher's marker)
        response/length_cap       share of samples cut by the length limit
        """
        out: dict[str, float] = {}
        for a in self.amap.aliases:
            out[f"alias/{a.name}/fired"] = float(
                sum(int((s.completion_ids == a.student_id).sum()) for s in samples)
            )
            if not a.is_multi and a.teacher_ids[0] != a.student_id:
                out[f"alias/{a.name}/relabelled"] = float(
                    sum(int((s.teacher_topk_ids[:, :k] == a.teacher_ids[0]).any(-1).sum()) for s in samples)
                )
        n = max(len(samples), 1)
        if self.eos_id is not None:
            out["response/ends_own_eos"] = sum(int(s.completion_ids[-1]) == self.eos_id for s in samples) / n
        out["response/other_special"] = (
            sum(bool(np.isin(s.completion_ids, self.other_special_ids).any()) for s in samples) / n
        )
        out["response/length_cap"] = sum(s.finish_reason == "length" for s in samples) / n
        return out
