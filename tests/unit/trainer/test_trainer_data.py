"""trainer.data: staleness, collation (positions, padding, truncation, masks) and the support variants,
checked element by element against loops over the records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.experience import ExperienceRecord, SampleRecord, decode, encode
from trainer.data import RecordError, check_record, collate, is_stale, sequences_of, split_even

V = 20
SPECIAL = [0, 1]


def _sample(rng, L, K=6, C=5, env=()):
    ids = rng.integers(2, V, size=L).astype(np.int32)
    t_ids = np.stack([rng.permutation(V)[:K] for _ in range(L)]).astype(np.int32)
    b_ids = np.stack([rng.permutation(V)[:C] for _ in range(L)]).astype(np.int32)
    # the teacher's candidates: the behaviour ids, shuffled per row (the lookup must not rely on order)
    perm = np.stack([rng.permutation(C) for _ in range(L)])
    cand = np.take_along_axis(b_ids, perm, 1)
    return SampleRecord(
        completion_ids=ids,
        behaviour_logprobs=-rng.random(L).astype(np.float32),
        teacher_topk_ids=t_ids,
        teacher_topk_logprobs=-np.sort(rng.random((L, K)), axis=1).astype(np.float32),
        teacher_target_logprobs=-rng.random(L).astype(np.float32),
        teacher_candidate_ids=cand,
        teacher_candidate_logprobs=-rng.random((L, C)).astype(np.float32),
        behaviour_top_ids=b_ids,
        behaviour_top_logprobs=-rng.random((L, C)).astype(np.float32),
        env_positions=np.array(env, dtype=np.int32),
    )


def _records(seed=0):
    rng = np.random.default_rng(seed)
    r1 = ExperienceRecord("a", 3, rng.integers(2, V, 4).astype(np.int32), [_sample(rng, 5), _sample(rng, 2)])
    r2 = ExperienceRecord("b", 4, rng.integers(2, V, 7).astype(np.int32), [_sample(rng, 6, env=(1, 2))])
    r1.samples[0].completion_ids[3] = 1  # a special token in the middle
    r1.samples[0].teacher_topk_ids[2, 0] = 0  # a special id in a support
    return [decode(encode(r)) for r in (r1, r2)]


def test_is_stale_boundary():
    assert not is_stale(5, 5, 0)
    assert is_stale(4, 5, 0)
    assert not is_stale(3, 5, 2)
    assert is_stale(2, 5, 2)
    assert not is_stale(9, 5, 0)  # newer than the trainer (a restarted trainer catching up) is fine


def test_split_even():
    assert split_even(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_even(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert split_even(128 + 4, 2) == [(0, 66), (66, 132)]


def test_collate_layout_matches_the_records():
    recs = _records()
    seqs = sequences_of(recs)
    assert [s.record_id for s in seqs] == ["a", "a", "b"]
    mb = collate(seqs, support="teacher_topk", top_k=4, max_seq_len=100)
    B, T = mb.valid_B_T.shape
    assert (B, T) == (3, 6) and mb.input_ids_B_S.shape == (3, 7 + 6)
    for b, sq in enumerate(seqs):
        P, L, s = len(sq.prompt_ids), len(sq.sample), sq.sample
        assert mb.input_ids_B_S[b, : P + L].tolist() == sq.prompt_ids.tolist() + s.completion_ids.tolist()
        assert mb.attention_mask_B_S[b].tolist() == [1] * (P + L) + [0] * (mb.input_ids_B_S.shape[1] - P - L)
        for t in range(T):
            assert bool(mb.valid_B_T[b, t]) == (t < L)
            if t >= L:
                assert not mb.token_mask_B_T[b, t] and not mb.support_mask_B_T_K[b, t].any()
                continue
            # the hidden state at P - 1 + t predicts completion token t
            assert mb.input_ids_B_S[b, mb.positions_B_T[b, t] + 1] == s.completion_ids[t]
            assert mb.sampled_ids_B_T[b, t] == s.completion_ids[t]
            assert mb.behaviour_logprobs_B_T[b, t] == s.behaviour_logprobs[t]
            assert mb.teacher_logprobs_B_T[b, t] == s.teacher_target_logprobs[t]
            assert mb.token_mask_B_T[b, t] == (t not in s.env_positions)
            assert mb.support_ids_B_T_K[b, t].tolist() == s.teacher_topk_ids[t, :4].tolist()
            assert np.allclose(
                mb.support_teacher_logprobs_B_T_K[b, t].numpy(), s.teacher_topk_logprobs[t, :4]
            )
            assert mb.support_mask_B_T_K[b, t].all()
    assert mb.policy_versions_B.tolist() == [3, 3, 4]


def test_collate_cuts_completions_at_max_seq_len():
    recs = _records()
    mb = collate(sequences_of(recs), support="teacher_topk", top_k=4, max_seq_len=9)
    # prompts of 4 and 7 tokens leave 5 and 2 completion positions
    assert mb.valid_B_T.sum(1).tolist() == [5, 2, 2]
    assert mb.input_ids_B_S.shape[1] == 9


def test_special_token_masking_drops_positions_and_support_ids():
    recs = _records()
    masked = torch.tensor(SPECIAL)
    on = collate(sequences_of(recs), support="teacher_topk", top_k=4, max_seq_len=100, masked_ids=masked)
    off = collate(sequences_of(recs), support="teacher_topk", top_k=4, max_seq_len=100)
    assert off.token_mask_B_T[0, 3] and not on.token_mask_B_T[0, 3]  # sampled token 1 is special
    assert off.support_mask_B_T_K[0, 2, 0] and not on.support_mask_B_T_K[0, 2, 0]  # support id 0 dropped
    ids_on = on.support_ids_B_T_K[on.support_mask_B_T_K]
    assert not torch.isin(ids_on, masked).any()
    assert not torch.isin(on.sampled_ids_B_T[on.token_mask_B_T], masked).any()


def test_student_topk_support_looks_up_the_teacher_candidates():
    recs = _records()
    mb = collate(sequences_of(recs), support="student_topk", top_k=3, max_seq_len=100)
    for b, sq in enumerate(sequences_of(recs)):
        s = sq.sample
        for t in range(len(s)):
            for k in range(3):
                vid = s.behaviour_top_ids[t, k]
                j = list(s.teacher_candidate_ids[t]).index(vid)
                assert mb.support_ids_B_T_K[b, t, k] == vid
                assert mb.support_teacher_logprobs_B_T_K[b, t, k] == s.teacher_candidate_logprobs[t, j]


def test_teacher_topk_plus_sampled_adds_the_sampled_token_once():
    recs = _records()
    s0 = recs[0].samples[0]
    s0.teacher_topk_ids[1, 2] = s0.completion_ids[1]  # sampled token already in the top-K at t = 1
    mb = collate(sequences_of(recs), support="teacher_topk_plus_sampled", top_k=4, max_seq_len=100)
    assert mb.support_ids_B_T_K.shape[-1] == 5
    assert mb.support_ids_B_T_K[0, 0, 4] == s0.completion_ids[0]
    assert mb.support_mask_B_T_K[0, 0, 4] and not mb.support_mask_B_T_K[0, 1, 4]
    assert mb.support_teacher_logprobs_B_T_K[0, 0, 4] == s0.teacher_target_logprobs[0]
    assert not mb.support_mask_B_T_K[~mb.valid_B_T].any()  # padding positions stay masked


def test_check_record_reasons():
    recs = _records()
    ok = dict(support="teacher_topk", top_k=4, vocab_size=V, max_seq_len=100)
    check_record(recs[0], **ok)
    with pytest.raises(RecordError, match="top-k has 6 ids, the trainer needs top_k=8"):
        check_record(recs[0], **{**ok, "top_k": 8})
    with pytest.raises(RecordError, match="ids outside \\[0, 10\\)"):
        check_record(recs[0], **{**ok, "vocab_size": 10})
    with pytest.raises(RecordError, match="no room"):
        check_record(recs[1], **{**ok, "max_seq_len": 7})
    with pytest.raises(RecordError, match="needs 6 behaviour top ids"):
        check_record(recs[0], **{**ok, "support": "student_topk", "top_k": 6})
    with pytest.raises(RecordError, match="full_kl needs every row"):
        check_record(recs[0], **{**ok, "top_k": 6}, full_vocab=True)
    recs[1].samples[0].teacher_candidate_ids[0, :] = 0
    with pytest.raises(RecordError, match="no teacher candidate logprob"):
        check_record(recs[1], **{**ok, "support": "student_topk", "top_k": 3})
    recs[0].samples[1].behaviour_logprobs[0] = np.nan
    with pytest.raises(RecordError, match="behaviour_logprobs not finite"):
        check_record(recs[0], **ok)


def test_check_record_rejects_what_would_poison_the_weights():
    ok = dict(support="teacher_topk", top_k=4, vocab_size=V, max_seq_len=100)
    recs = _records()
    recs[0].samples[0].teacher_topk_logprobs[0, 1] = -np.inf  # q = 0 inside the support: KL = inf
    with pytest.raises(RecordError, match="teacher top-k logprobs not finite"):
        check_record(recs[0], **ok)
    # full_kl with fewer teacher ids than the vocabulary: a clear reason, not a numpy broadcast error
    with pytest.raises(RecordError, match="full_kl needs every row"):
        check_record(_records()[0], **{**ok, "top_k": V}, full_vocab=True)
    recs = _records()
    recs[1].samples[0].teacher_candidate_logprobs[:] = np.inf
    with pytest.raises(RecordError, match="candidate logprobs not finite"):
        check_record(recs[1], **{**ok, "support": "student_topk", "top_k": 3})
