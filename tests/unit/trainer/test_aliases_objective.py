"""Single-token aliases in the trainer: loss and gradient through collate + head_objective equal a reference
that rewrites the full-vocabulary teacher distribution by hand (push-forward q'(s) = q(s) + q(a), q'(a) = 0:
a leaves every support and a sampled a earns no reward; only full_kl reads the floor FOREIGN_LOGPROB) and
computes each objective from its definition."""

import math

import numpy as np
import pytest
import torch

from services.common.experience import SampleRecord
from services.common.token_aliases import FOREIGN_LOGPROB, parse_aliases, resolve_aliases
from trainer.aliases import TrainerAliases, merge_topk
from trainer.config import TrainerConfig
from trainer.data import RecordError, TrainSequence, check_record, collate
from trainer.objective import head_objective

V, D = 8, 6
# student 1 <- teacher 2; student 5 <- teacher 6 and 7 (two teacher spellings merged into one student id)
ALIASES = [[1, 2], [5, 6], [5, 7]]
TEACHER_OF = {2: 1, 6: 5, 7: 5}
SAMPLED = [1, 2, 1, 3, 6, 0, 5]  # s, the foreign a, s, other, a foreign id of group 2, other, s of group 2
BEHAVIOUR_TOP = [  # the student's own top ids per row (student_topk support), with s and a among them
    [1, 2, 0, 3, 4, 5, 6, 7],
    [2, 0, 1, 4, 3, 7, 6, 5],
    [3, 4, 0, 1, 2, 5, 6, 7],
    [6, 5, 7, 0, 1, 2, 3, 4],
    [0, 3, 4, 6, 1, 2, 5, 7],
    [5, 6, 7, 1, 2, 0, 3, 4],
    [7, 0, 5, 3, 1, 2, 4, 6],
]
L = len(SAMPLED)


def table(raw=ALIASES) -> TrainerAliases:
    return TrainerAliases(resolve_aliases(parse_aliases(raw), student_vocab=V, teacher_vocab=V))


def teacher_logprobs() -> torch.Tensor:
    """[L, V] full teacher log q with the edge cases on purpose (K = 4 of 8):
    row 0 s and a both top; row 1 a top, s last; row 2 s top, a last; row 3 neither in the top-K;
    row 4 two ids of group 2 top; rows 5-6 random."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(L, V, generator=g, dtype=torch.float64)
    z[0, 1], z[0, 2] = 4.0, 3.5
    z[1, 2], z[1, 1] = 5.0, -6.0
    z[2, 1], z[2, 2] = 5.0, -6.0
    z[3, [1, 2, 5, 6, 7]] = -5.0
    z[4, 6], z[4, 7] = 4.0, 3.0
    return torch.log_softmax(z, -1).float()


def merged_reference(lq_L_V: torch.Tensor) -> torch.Tensor:
    """The definition: q'(s) = sum of q over s and its teacher ids, q'(a) = 0 (-> FOREIGN_LOGPROB)."""
    q = lq_L_V.double().exp()
    out = q.clone()
    for a, s in TEACHER_OF.items():
        out[:, s] += q[:, a]
        out[:, a] = 0.0
    return torch.where(out > 0, out.log(), torch.tensor(FOREIGN_LOGPROB, dtype=torch.float64))


def make_sample(
    lq_L_V: torch.Tensor, k_rec: int, old_L: torch.Tensor, alias_ids=(1, 2, 5, 6, 7)
) -> SampleRecord:
    lq = lq_L_V.numpy()
    top = np.argsort(-lq, axis=1, kind="stable")[:, :k_rec].astype(np.int32)
    y = np.array(SAMPLED, dtype=np.int32)
    beh = np.array(BEHAVIOUR_TOP, dtype=np.int32)
    cand = np.concatenate([beh, np.broadcast_to(np.array(alias_ids, np.int32), (L, len(alias_ids)))], 1)
    return SampleRecord(
        completion_ids=y,
        behaviour_logprobs=old_L.numpy().astype(np.float32),
        teacher_topk_ids=top,
        teacher_topk_logprobs=np.take_along_axis(lq, top, 1).astype(np.float32),
        teacher_target_logprobs=lq[np.arange(L), y].astype(np.float32),
        finish_reason="stop",
        teacher_candidate_ids=cand,
        teacher_candidate_logprobs=np.take_along_axis(lq, cand, 1).astype(np.float32),
        behaviour_top_ids=beh,
        behaviour_top_logprobs=np.zeros(beh.shape, np.float32),
    )


def reference_support(lq_L_V, merged_L_V, t: int, support: str, k: int, k_rec: int) -> list[int]:
    if support == "student_topk":  # q'(a) = 0: a teacher-side alias id is not in the support
        return [v for v in BEHAVIOUR_TOP[t][:k] if v not in TEACHER_OF]
    recorded = torch.argsort(-lq_L_V[t], stable=True)[:k_rec].tolist()
    ids: list[int] = []
    for v in recorded:  # the alias id is reported as the student id, duplicates merged
        u = TEACHER_OF.get(v, v)
        if u not in ids:
            ids.append(u)
    ids = sorted(ids, key=lambda u: -merged_L_V[t, u].item())[:k]
    if support == "teacher_topk_plus_sampled" and SAMPLED[t] not in ids and SAMPLED[t] not in TEACHER_OF:
        ids.append(SAMPLED[t])
    return ids


def reference_loss(objective, support, k, k_rec, h, w, lq_L_V, old_L, clip=0.2):
    merged = merged_reference(lq_L_V)
    logits = h.double() @ w.double().T  # (L, V)
    total = 0.0
    for t in range(L):
        if objective == "full_kl":
            log_p = torch.log_softmax(logits[t], -1)
            total = total + (log_p.exp() * (log_p - merged[t])).sum()
        elif objective == "sampled_token":
            lp = torch.log_softmax(logits[t], -1)[SAMPLED[t]]
            # a sampled teacher-side alias id: log q' = -inf is no usable reward; it earns 0
            adv = 0.0 if SAMPLED[t] in TEACHER_OF else merged[t, SAMPLED[t]] - old_L[t].double()
            ratio = (lp - old_L[t].double()).exp()
            total = total - torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
        else:
            ids = reference_support(lq_L_V, merged, t, support, k, k_rec)
            log_p = torch.log_softmax(logits[t, ids], -1)
            log_q = torch.log_softmax(merged[t, ids], -1)
            total = total + (log_p.exp() * (log_p - log_q)).sum()
    return total / L


CASES = [
    ("sampled_token", "teacher_topk", 4, 4),
    ("lsm", "teacher_topk", 4, 4),
    ("lsm", "teacher_topk", 4, 6),  # the record holds more ids than K: a merge lets the next one in
    ("lsm", "teacher_topk", V, V),  # K = V
    ("lsm", "student_topk", 4, 4),
    ("lsm", "teacher_topk_plus_sampled", 4, 4),
    ("full_kl", "teacher_topk", V, V),
]


@pytest.mark.parametrize(("objective", "support", "k", "k_rec"), CASES)
def test_loss_and_gradient_match_the_hand_merged_reference(objective, support, k, k_rec):
    torch.manual_seed(1)
    lq = teacher_logprobs()
    h = torch.randn(L, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    with torch.no_grad():
        old = torch.log_softmax(h @ w.T, -1)[torch.arange(L), SAMPLED] + 0.05 * torch.randn(L)
    sample = make_sample(lq, k_rec, old)
    cfg = TrainerConfig(model="x", objective=objective, support=support, top_k=k, special_token_masking=False)
    seq = TrainSequence(np.array([0, 4], np.int32), sample, 0, "r")
    aliases = table()
    check_record(
        _record(seq),
        support=support,
        top_k=k,
        vocab_size=V,
        max_seq_len=64,
        full_vocab=objective == "full_kl",
        aliases=aliases,
    )
    mb = collate([seq], support=support, top_k=k, max_seq_len=64, aliases=aliases)
    loss, _ = head_objective(h, w, None, mb, cfg)
    loss.backward()

    h_ref = h.detach().clone().requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    ref = reference_loss(objective, support, k, k_rec, h_ref, w_ref, lq, old)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("objective", "support", "k", "k_rec"),
    [c for c in CASES if c[0] != "full_kl"] + [("gamma", "teacher_topk", 4, 4)],
)
def test_nothing_depends_on_the_floor_value(monkeypatch, objective, support, k, k_rec):
    """Loss and gradients with FOREIGN_LOGPROB = -30 and with -3 are identical: the floor reaches no loss."""
    torch.manual_seed(3)
    lq = teacher_logprobs()
    h0, w0 = torch.randn(L, D), torch.randn(V, D)
    sample = make_sample(lq, k_rec, torch.log_softmax(h0 @ w0.T, -1)[torch.arange(L), SAMPLED] - 0.1)
    seq = TrainSequence(np.array([0, 4], np.int32), sample, 0, "r")
    cfg = TrainerConfig(
        model="x", objective=objective, support=support, top_k=k, gamma=1.0, special_token_masking=False
    )
    results = []
    for floor in (FOREIGN_LOGPROB, -3.0):
        monkeypatch.setattr("trainer.aliases.FOREIGN_LOGPROB", floor)
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        mb = collate([seq], support=support, top_k=k, max_seq_len=64, aliases=table())
        loss, metrics = head_objective(h, w, None, mb, cfg)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad, metrics))
    (l1, gh1, gw1, m1), (l2, gh2, gw2, m2) = results
    assert torch.equal(l1, l2) and torch.equal(gh1, gh2) and torch.equal(gw1, gw2)
    assert m1 == m2
    assert gw1.abs().sum() > 0


def _record(seq):
    from services.common.experience import ExperienceRecord

    return ExperienceRecord("r", 0, seq.prompt_ids, [seq.sample])


def test_aliases_change_the_loss_where_they_fire():
    """Guard for the reference test: without aliases the same record gives a different loss."""
    torch.manual_seed(1)
    lq = teacher_logprobs()
    h, w = torch.randn(L, D), torch.randn(V, D)
    sample = make_sample(lq, 4, torch.zeros(L))
    cfg = TrainerConfig(model="x", objective="lsm", top_k=4, special_token_masking=False)
    seq = TrainSequence(np.array([0, 4], np.int32), sample, 0, "r")
    with_alias, _ = head_objective(
        h, w, None, collate([seq], support="teacher_topk", top_k=4, max_seq_len=64, aliases=table()), cfg
    )
    without, _ = head_objective(
        h, w, None, collate([seq], support="teacher_topk", top_k=4, max_seq_len=64), cfg
    )
    assert abs(with_alias.item() - without.item()) > 1e-3


def test_identity_alias_changes_nothing():
    torch.manual_seed(2)
    lq = teacher_logprobs()
    h, w = torch.randn(L, D), torch.randn(V, D)
    sample = make_sample(lq, 4, torch.zeros(L))
    seq = TrainSequence(np.array([0, 4], np.int32), sample, 0, "r")
    for objective in ("lsm", "sampled_token"):
        cfg = TrainerConfig(model="x", objective=objective, top_k=4, special_token_masking=False)
        mb_a = collate(
            [seq], support="teacher_topk", top_k=4, max_seq_len=64, aliases=table(ALIASES + [[3, 3]])
        )
        mb_b = collate([seq], support="teacher_topk", top_k=4, max_seq_len=64, aliases=table())
        assert (
            head_objective(h, w, None, mb_a, cfg)[0].item() == head_objective(h, w, None, mb_b, cfg)[0].item()
        )
    only_identity = table([[3, 3]])
    assert not only_identity.active and only_identity.alias_ids.size == 0


def test_merge_topk_edge_cases():
    aliases = table([[1, 2]])
    # rows: both present (a first), only a, only s, neither
    ids = torch.tensor([[2, 1, 0, 3], [2, 0, 3, 4], [1, 0, 3, 4], [0, 3, 4, 5]])
    lp = torch.log(
        torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.1, 0.1], [0.5, 0.2, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]])
    )
    q_s = torch.log(torch.tensor([0.3, 0.01, 0.5, 0.001]))
    q_a = torch.log(torch.tensor([0.4, 0.5, 0.001, 0.002]))
    merged = torch.logaddexp(q_s, q_a)[:, None]
    out_ids, out_lp, keep = merge_topk(ids, lp, merged, aliases.students, aliases.members, aliases.foreign, 4)
    # both present: one slot for s with q(s) + q(a), the alias slot masked (kept last, FOREIGN)
    assert out_ids[0].tolist() == [1, 0, 3, 2] and keep[0].tolist() == [True, True, True, False]
    assert out_lp[0, 0].item() == pytest.approx(math.log(0.7), abs=1e-6)
    assert out_lp[0, 3].item() == FOREIGN_LOGPROB
    # only a: reported as s, with the merged value (q(s) comes from the candidates)
    assert out_ids[1].tolist() == [1, 0, 3, 4] and keep[1].all()
    assert out_lp[1, 0].item() == pytest.approx(math.log(0.51), abs=1e-6)
    # only s: s gets the merged value even though a is absent from the top-K
    assert out_ids[2].tolist() == [1, 0, 3, 4] and out_lp[2, 0].item() == pytest.approx(
        math.log(0.501), abs=1e-6
    )
    # neither: untouched
    assert out_ids[3].tolist() == [0, 3, 4, 5] and torch.equal(out_lp[3], lp[3]) and keep[3].all()


def test_k_equals_v_row_still_covers_every_id():
    aliases = table()
    lq = teacher_logprobs()
    top = torch.argsort(-lq, -1)
    merged = torch.stack([lq[:, [1, 2]].logsumexp(-1), lq[:, [5, 6, 7]].logsumexp(-1)], -1)
    ids, lp, keep = merge_topk(
        top, lq.gather(1, top), merged, aliases.students, aliases.members, aliases.foreign, V
    )
    assert (ids.sort(-1).values == torch.arange(V)).all()
    assert (keep.sum(-1) == V - 3).all()  # 2, 6, 7 are masked
    full = torch.empty_like(lp).scatter_(1, ids, lp)
    torch.testing.assert_close(full.double(), merged_reference(lq), rtol=1e-5, atol=1e-5)


def test_record_without_alias_candidates_is_rejected():
    lq = teacher_logprobs()
    sample = make_sample(lq, 4, torch.zeros(L))
    cand = np.broadcast_to(np.array([1, 2, 5, 6], np.int32), (L, 4))  # 7 missing
    sample.teacher_candidate_ids = cand
    sample.teacher_candidate_logprobs = np.take_along_axis(lq.numpy(), cand, 1)
    seq = TrainSequence(np.array([0, 4], np.int32), sample, 0, "r")
    with pytest.raises(RecordError, match="alias id"):
        check_record(
            _record(seq), support="teacher_topk", top_k=4, vocab_size=V, max_seq_len=64, aliases=table()
        )
    sample.teacher_candidate_ids = sample.teacher_candidate_logprobs = None
    with pytest.raises(RecordError, match="candidate logprobs of the alias ids"):
        check_record(
            _record(seq), support="teacher_topk", top_k=4, vocab_size=V, max_seq_len=64, aliases=table()
        )


def test_batch_metrics_count_alias_firings_and_endings():
    lq = teacher_logprobs()
    s1 = make_sample(lq, 4, torch.zeros(L))
    s2 = make_sample(lq, 4, torch.zeros(L))
    s2.completion_ids = s2.completion_ids.copy()
    s2.completion_ids[-1] = 3  # ends with "eos" id 3 below
    s2.finish_reason = "length"
    aliases = TrainerAliases(table().amap, eos_id=3, other_special_ids=[2])
    m = aliases.batch_metrics([s1, s2], k=4)
    assert m["alias/1/fired"] == 2 + 2  # id 1 sampled twice in each sample
    assert m["alias/5/fired"] == 1  # the last token of s1 only
    top = np.argsort(-lq.numpy(), 1)[:, :4]
    assert m["alias/1/relabelled"] == 2 * int((top == 2).any(1).sum())
    assert m["response/ends_own_eos"] == 0.5
    assert m["response/other_special"] == 1.0  # both hold id 2
    assert m["response/length_cap"] == 0.5
