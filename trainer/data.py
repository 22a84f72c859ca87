"""Experience records -> padded or packed training tensors, the staleness rule, and the support of each variant.

A record (one stream entry) holds the G samples of one prompt; a *sequence* is one of those samples with its
prompt. `collate` lays a list of B sequences out as a `MiniBatch`, in one of two layouts of the model input:

    padded (default)  one row per sequence, right-padded to the longest; an attention mask marks the padding
    packed            every sequence back to back in ONE row, no padding; position ids restart at 0 at each
                      sequence and there is no attention mask, which is how Hugging Face models take packed
                      input (below)

The model-input fields have one row per sequence (padded) or one row in all (packed); every other field has
one row per sequence in both layouts:

    input_ids_B_S        prompt + completion of each sequence (S = longest prompt + completion, or the sum)
    attention_mask_B_S   1 on real tokens (padded); None (packed)
    position_ids_B_S     None (padded: the model's default 0..S-1); 0..P+L-1 within each sequence (packed)
    hidden_rows_B        the row of input_ids_B_S (and of the hidden states) that holds sequence b
    positions_B_T        index into that row of the hidden state that predicts completion token t
                         (sequence start + P - 1 + t; the start is 0 when padded); 0 where not valid
    valid_B_T            a completion token exists at t (T = longest completion)
    token_mask_B_T       it counts in the loss: valid, not an environment position, not a masked special token
    student_step_B_T     a step of the student (valid, not an environment position): advances gamma's discount
    reward_mask_B_T      the teacher's log q'(y_t) is defined (False where y_t is a teacher-side alias id, to
                         which the merged teacher gives no mass: that position's reward is 0)
    old_logprobs_B_T     the PPO old policy's log pi(y_t): the rollout's (behaviour_logprobs_B_T) as collated,
                         replaced by the trainer's own before the batch's first update when configured
    support_*_B_T_K      the support S_t: ids, the teacher's log q at them, and which slots count

Packing (padding-free) spends no compute on padding, which matters when completion lengths vary widely. With
`attention_mask=None` and position ids that restart at 0, transformers 5.x (masking_utils,
`find_packed_sequence_indices`) builds a block-diagonal causal mask for the sdpa, eager and flex attention
implementations, and the flash-attention implementations derive the varlen sequence boundaries from the same
position ids (modeling_flash_attention_utils, `_is_packed_sequence`, which needs a batch of one row). An
attention implementation outside those would let sequences attend to each other: compute_objective's packed
result equals the padded one only under them (tests/unit/trainer/test_packing.py checks sdpa and eager).

`micro_batches` splits one rank's shard into groups under a token budget, for gradient accumulation.

Support variants (DESIGN.md section 1):
    teacher_topk               the first K of the teacher's top-K ids (sorted by descending log q)
    student_topk               the behaviour policy's top-K ids; log q at them from the teacher's candidates
    teacher_topk_plus_sampled  teacher top-K plus the sampled token, deduplicated (K + 1 slots)
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from services.common.experience import ExperienceRecord, SampleRecord
from trainer import losses

if TYPE_CHECKING:
    from trainer.aliases import TrainerAliases


class RecordError(ValueError):
    """A well-formed record this trainer cannot use (too few ids for K, ids outside the vocabulary, ...)."""


def is_stale(record_version: int, current_version: int, max_policy_lag: int) -> bool:
    """A record is stale when the policy that produced it is more than `max_policy_lag` versions old."""
    return record_version < current_version - max_policy_lag


@dataclass(frozen=True)
class TrainSequence:
    """One sample of a record, with the record's prompt."""

    prompt_ids: np.ndarray  # int32 [P]
    sample: SampleRecord
    policy_version: int
    record_id: str


def sequences_of(records: Seq[ExperienceRecord]) -> list[TrainSequence]:
    """Flatten records into sequences, in record order then sample order."""
    return [
        TrainSequence(rec.prompt_ids, s, rec.policy_version, rec.record_id)
        for rec in records
        for s in rec.samples
    ]


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) bounds of `parts` contiguous near-equal pieces of range(n) (the first ones larger)."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _candidate_lookup(
    support_ids_L_K: np.ndarray, cand_ids_L_C: np.ndarray, cand_lp_L_C: np.ndarray
) -> np.ndarray:
    """Teacher log q at each support id, found among the candidates of the same row; NaN where absent."""
    match_L_K_C = support_ids_L_K[:, :, None] == cand_ids_L_C[:, None, :]
    found_L_K = match_L_K_C.any(-1)
    idx_L_K = match_L_K_C.argmax(-1)
    out = np.take_along_axis(cand_lp_L_C, idx_L_K, axis=1)
    return np.where(found_L_K, out, np.nan).astype(np.float32)


def check_record(
    rec: ExperienceRecord,
    *,
    support: str,
    top_k: int,
    vocab_size: int,
    max_seq_len: int,
    full_vocab: bool = False,
    aliases: TrainerAliases | None = None,
) -> None:
    """Raise RecordError (the reason names the sample and field) if `rec` cannot be trained on as configured.

    `decode` already checked shapes; this checks what depends on the trainer: enough support ids, ids inside
    the student's vocabulary, finite log-probabilities, a prompt that leaves room for a completion.
    `full_vocab` (objective full_kl) also requires each row's teacher ids to be the whole vocabulary with
    finite log-probabilities. `aliases` (token_aliases) requires the teacher's logprobs of the alias ids.
    """
    P = len(rec.prompt_ids)
    if P == 0:
        raise RecordError("empty prompt")
    if P >= max_seq_len:
        raise RecordError(f"prompt of {P} tokens leaves no room under max_seq_len={max_seq_len}")
    if rec.prompt_ids.min() < 0 or rec.prompt_ids.max() >= vocab_size:
        raise RecordError(f"prompt ids outside [0, {vocab_size})")
    for i, s in enumerate(rec.samples):
        where = f"sample {i}"
        if s.completion_ids.min() < 0 or s.completion_ids.max() >= vocab_size:
            raise RecordError(f"{where}: completion ids outside [0, {vocab_size})")
        for name in ("behaviour_logprobs", "teacher_target_logprobs"):
            if not np.isfinite(getattr(s, name)).all():
                raise RecordError(f"{where}: {name} not finite")
        # log_softmax rounding can leave a log-probability a hair above 0; more than that is not one
        # A -inf (q = 0) inside the support makes KL(pi^ || q^) infinite and the gradient NaN: not trainable.
        if not np.isfinite(s.teacher_topk_logprobs).all() or (s.teacher_topk_logprobs > 1e-4).any():
            raise RecordError(f"{where}: teacher top-k logprobs not finite or > 0")
        if full_vocab:
            ids = s.teacher_topk_ids[:, :top_k]
            if (
                top_k != vocab_size
                or ids.shape[1] != vocab_size
                or not (np.sort(ids, axis=1) == np.arange(vocab_size)).all()
            ):
                raise RecordError(
                    f"{where}: full_kl needs every row's teacher ids to cover the {vocab_size} ids"
                )
            if not np.isfinite(s.teacher_topk_logprobs[:, :top_k]).all():
                raise RecordError(f"{where}: full_kl needs finite teacher logprobs")
        if aliases is not None and (why := aliases.check_sample(s)):
            raise RecordError(f"{where}: {why}")
        if support == "student_topk":
            if s.behaviour_top_ids is None or s.behaviour_top_ids.shape[1] < top_k:
                have = 0 if s.behaviour_top_ids is None else s.behaviour_top_ids.shape[1]
                raise RecordError(f"{where}: student_topk needs {top_k} behaviour top ids, record has {have}")
            if s.teacher_candidate_ids is None or s.teacher_candidate_logprobs is None:
                raise RecordError(f"{where}: student_topk needs the teacher's candidate logprobs")
            ids = s.behaviour_top_ids[:, :top_k]
            if ids.min() < 0 or ids.max() >= vocab_size:
                raise RecordError(f"{where}: behaviour top ids outside [0, {vocab_size})")
            lp = _candidate_lookup(ids, s.teacher_candidate_ids, s.teacher_candidate_logprobs)
            if np.isnan(lp).any():
                raise RecordError(f"{where}: a behaviour top id has no teacher candidate logprob")
            if not np.isfinite(lp).all() or (lp > 1e-4).any():
                raise RecordError(f"{where}: teacher candidate logprobs not finite or > 0")
        else:
            k = s.teacher_topk_ids.shape[1]
            if k < top_k:
                raise RecordError(f"{where}: teacher top-k has {k} ids, the trainer needs top_k={top_k}")
            ids = s.teacher_topk_ids[:, :top_k]
            if ids.min() < 0 or ids.max() >= vocab_size:
                raise RecordError(f"{where}: teacher top-k ids outside [0, {vocab_size})")


@dataclass
class MiniBatch:
    """B sequences in the padded or packed layout; see the module docstring for each field."""

    input_ids_B_S: Tensor  # int64, B rows when padded, 1 row when packed
    attention_mask_B_S: Tensor | None  # int64; None when packed
    position_ids_B_S: Tensor | None  # int64; None when padded
    hidden_rows_B: Tensor  # int64, the row of input_ids_B_S holding each sequence
    positions_B_T: Tensor  # int64, index into that row
    valid_B_T: Tensor  # bool
    token_mask_B_T: Tensor  # bool
    student_step_B_T: Tensor  # bool
    reward_mask_B_T: Tensor  # bool
    sampled_ids_B_T: Tensor  # int64, y_t
    behaviour_logprobs_B_T: Tensor  # float32, log pi_rollout(y_t), as sampled
    old_logprobs_B_T: Tensor  # float32, log pi_old(y_t) of the PPO ratio
    teacher_logprobs_B_T: Tensor  # float32, log q(y_t)
    support_ids_B_T_K: Tensor  # int64
    support_teacher_logprobs_B_T_K: Tensor  # float32
    support_mask_B_T_K: Tensor  # bool
    policy_versions_B: Tensor  # int64

    def to(self, device: torch.device | str) -> MiniBatch:
        """Every tensor on `device`; the fields the layout leaves None stay None."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in tensors.items() if v is not None})

    @property
    def packed(self) -> bool:
        """All sequences share one row (collate(pack=True))."""
        return self.position_ids_B_S is not None

    def rows(self, start: int, end: int) -> MiniBatch:
        """Sequences [start, end) (Python slice bounds) as a self-contained MiniBatch of the same layout.

        Padded: their rows, padding kept (it is masked). Packed: the stretch of the packed row that holds
        them (sequences are stored in order and each starts at position id 0), positions re-based to it.
        """
        start, end, _ = slice(start, end).indices(self.num_sequences)
        end = max(start, end)
        out = {
            f.name: getattr(self, f.name)[start:end]
            for f in fields(self)
            if f.name not in _ROW_FIELDS and f.name != "positions_B_T"
        }
        if self.position_ids_B_S is None:
            assert self.attention_mask_B_S is not None  # collate: the padded layout carries its mask
            return MiniBatch(
                input_ids_B_S=self.input_ids_B_S[start:end],
                attention_mask_B_S=self.attention_mask_B_S[start:end],
                position_ids_B_S=None,
                hidden_rows_B=self.hidden_rows_B[start:end] - start,
                positions_B_T=self.positions_B_T[start:end],
                **out,
            )
        starts_B = (self.position_ids_B_S[0] == 0).nonzero()[:, 0].tolist() + [self.input_ids_B_S.shape[1]]
        lo, hi = starts_B[start], starts_B[end]
        valid_B_T = self.valid_B_T[start:end]
        return MiniBatch(
            input_ids_B_S=self.input_ids_B_S[:, lo:hi],
            attention_mask_B_S=None,
            position_ids_B_S=self.position_ids_B_S[:, lo:hi],
            hidden_rows_B=self.hidden_rows_B[start:end],
            positions_B_T=torch.where(valid_B_T, self.positions_B_T[start:end] - lo, 0),
            **out,
        )

    @property
    def num_sequences(self) -> int:
        return int(self.valid_B_T.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.token_mask_B_T.sum())


# Fields shaped by the model-input layout (rows of input ids) rather than by sequence.
_ROW_FIELDS = frozenset({"input_ids_B_S", "attention_mask_B_S", "position_ids_B_S", "hidden_rows_B"})


def sequence_tokens(seq: TrainSequence, max_seq_len: int) -> int:
    """Tokens `seq` puts into the model: its prompt plus its completion cut to `max_seq_len` in all."""
    P = len(seq.prompt_ids)
    return P + min(len(seq.sample), max_seq_len - P)


def micro_batches(
    seqs: Seq[TrainSequence], max_tokens: int, *, max_seq_len: int, packed: bool
) -> list[list[TrainSequence]]:
    """Split one rank's shard into micro-batches whose model input costs at most `max_tokens` tokens.

    Cost of a micro-batch: rows * its longest sequence (padded) or its total length (packed), lengths as
    collate cuts them (`sequence_tokens`). A sequence over the budget on its own forms a micro-batch alone;
    `max_tokens = 0` means no limit (one micro-batch). Sequences are taken longest first (ties in input
    order) and each goes into the first micro-batch it fits: sorting keeps similar lengths together, so
    padded micro-batches waste little on padding, and first-fit fills packed ones close to the budget. The
    split is a pure function of the lengths, so every rank that splits the same shard gets the same groups.

    Since compute_objective's loss with a shared `denom_tokens` is a sum over tokens, the micro-batches'
    gradients add up to the shard's whatever the grouping.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if not seqs:
        return []
    if max_tokens == 0:
        return [list(seqs)]
    lengths = [sequence_tokens(s, max_seq_len) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -lengths[i])  # stable: ties keep input order
    groups: list[list[int]] = []
    for i in order:
        for g in groups:
            if _cost([lengths[j] for j in g] + [lengths[i]], packed) <= max_tokens:
                g.append(i)
                break
        else:
            groups.append([i])
    return [[seqs[i] for i in g] for g in groups]


def _cost(lengths: list[int], packed: bool) -> int:
    """Model-input tokens of sequences of these lengths, packed or padded to the longest."""
    return sum(lengths) if packed else len(lengths) * max(lengths)


def collate(
    seqs: Seq[TrainSequence],
    *,
    support: str,
    top_k: int,
    max_seq_len: int,
    masked_ids: Tensor | None = None,
    aliases: TrainerAliases | None = None,
    pack: bool = False,
    mask_positions: bool = True,
    mask_support: bool = True,
) -> MiniBatch:
    """Lay `seqs` out as a MiniBatch; completions longer than `max_seq_len - P` are cut.

    `pack` puts every sequence into one row with no padding (module docstring); the per-sequence [B, T] and
    [B, T, K] fields are the same in both layouts. `masked_ids` (int64 [M]) turns on special-token masking:
    with `mask_positions`, positions whose sampled token is in it leave the loss; with `mask_support`, those
    ids leave every support. `aliases` rewrites the teacher's scores to the merged distribution
    (trainer/aliases.py): a teacher-side alias id leaves the supports and its sampled positions get no
    reward, and a multi-token-aliased student id leaves the teacher's rows. Records are assumed to have
    passed `check_record`.
    """
    if not seqs:
        raise ValueError("collate: no sequences")
    B = len(seqs)
    P_B = [len(s.prompt_ids) for s in seqs]
    L_B = [sequence_tokens(s, max_seq_len) - p for s, p in zip(seqs, P_B, strict=True)]
    n_B = [p + n for p, n in zip(P_B, L_B, strict=True)]
    T = max(L_B)
    K = top_k
    # where sequence b lives in the model input: its row and the offset of its first token in that row
    if pack:
        rows_B, start_B = np.zeros(B, np.int64), np.cumsum([0, *n_B[:-1]]).astype(np.int64)
        R, S = 1, sum(n_B)
    else:
        rows_B, start_B = np.arange(B, dtype=np.int64), np.zeros(B, np.int64)
        R, S = B, max(n_B)

    input_ids = np.zeros((R, S), np.int64)
    attention = np.zeros((R, S), np.int64)
    position_ids = np.zeros((R, S), np.int64)
    positions = np.zeros((B, T), np.int64)
    valid = np.zeros((B, T), bool)
    env = np.zeros((B, T), bool)
    sampled = np.zeros((B, T), np.int64)
    behaviour = np.zeros((B, T), np.float32)
    teacher = np.zeros((B, T), np.float32)
    sup_ids = np.zeros((B, T, K), np.int64)
    sup_lp = np.zeros((B, T, K), np.float32)
    sup_keep = np.ones((B, T, K), bool)
    target_ok = np.ones((B, T), bool)
    for b, (seq, P, L) in enumerate(zip(seqs, P_B, L_B, strict=True)):
        s = seq.sample
        r, o = rows_B[b], start_B[b]
        input_ids[r, o : o + P] = seq.prompt_ids
        input_ids[r, o + P : o + P + L] = s.completion_ids[:L]
        attention[r, o : o + P + L] = 1
        position_ids[r, o : o + P + L] = np.arange(P + L)
        positions[b, :L] = o + np.arange(
            P - 1, P - 1 + L
        )  # hidden state at P-1+t predicts completion token t
        valid[b, :L] = True
        env_pos = s.env_positions[s.env_positions < L]
        env[b, env_pos] = True
        sampled[b, :L] = s.completion_ids[:L]
        behaviour[b, :L] = s.behaviour_logprobs[:L]
        teacher[b, :L] = s.teacher_target_logprobs[:L]
        if aliases is not None and aliases.active:
            sup_ids[b, :L], sup_lp[b, :L], sup_keep[b, :L], teacher[b, :L], target_ok[b, :L] = (
                aliases.rewrite_sample(s, L, support, K)
            )
        elif support == "student_topk":
            # check_record: student_topk records carry behaviour top ids and teacher candidates
            assert s.behaviour_top_ids is not None and s.teacher_candidate_ids is not None
            assert s.teacher_candidate_logprobs is not None
            ids = s.behaviour_top_ids[:L, :K]
            sup_ids[b, :L] = ids
            sup_lp[b, :L] = _candidate_lookup(
                ids, s.teacher_candidate_ids[:L], s.teacher_candidate_logprobs[:L]
            )
        else:
            sup_ids[b, :L] = s.teacher_topk_ids[:L, :K]
            sup_lp[b, :L] = s.teacher_topk_logprobs[:L, :K]

    valid_t = torch.from_numpy(valid)
    token_mask = valid_t & ~torch.from_numpy(env)
    sampled_t = torch.from_numpy(sampled)
    ids_t, lp_t = torch.from_numpy(sup_ids), torch.from_numpy(sup_lp)
    mask_t = valid_t[:, :, None].expand(B, T, K) & torch.from_numpy(sup_keep)
    if aliases is not None and aliases.row_dropped.numel():
        # A multi-token-aliased student id has no teacher value in a row (docs/aliases.md).
        mask_t &= ~torch.isin(ids_t, aliases.row_dropped)
    reward_ok = valid_t & torch.from_numpy(target_ok)
    if support == "teacher_topk_plus_sampled":
        ids_t, lp_t, mask_t = losses.add_sampled_token(
            ids_t, lp_t, mask_t, sampled_t, torch.from_numpy(teacher)
        )
        mask_t &= valid_t[:, :, None]
        mask_t[:, :, -1] &= reward_ok  # a sampled teacher-side alias id has no teacher mass
    if masked_ids is not None:
        token_mask, mask_t = losses.special_token_mask(
            sampled_t, token_mask, ids_t, mask_t, masked_ids, positions=mask_positions, support=mask_support
        )
    behaviour_t = torch.from_numpy(behaviour)
    return MiniBatch(
        input_ids_B_S=torch.from_numpy(input_ids),
        attention_mask_B_S=None if pack else torch.from_numpy(attention),
        position_ids_B_S=torch.from_numpy(position_ids) if pack else None,
        hidden_rows_B=torch.from_numpy(rows_B),
        positions_B_T=torch.from_numpy(positions),
        valid_B_T=valid_t,
        token_mask_B_T=token_mask,
        student_step_B_T=valid_t & ~torch.from_numpy(env),
        reward_mask_B_T=reward_ok,
        sampled_ids_B_T=sampled_t,
        behaviour_logprobs_B_T=behaviour_t,
        old_logprobs_B_T=behaviour_t.clone(),
        teacher_logprobs_B_T=torch.from_numpy(teacher),
        support_ids_B_T_K=ids_t.long(),
        support_teacher_logprobs_B_T_K=lp_t.float(),
        support_mask_B_T_K=mask_t,
        policy_versions_B=torch.tensor([s.policy_version for s in seqs], dtype=torch.int64),
    )
