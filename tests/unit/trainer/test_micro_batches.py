"""trainer.data.micro_batches: token budgets measured on the tensors collate actually builds, a partition of
the shard, the grouping rule on hand-worked examples, and (the reason it exists) gradient accumulation over
the micro-batches with the shard's token count as denominator reproducing the whole shard's gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from experiments.synthetic import synthetic_records
from experiments.tiny_models import build_char_tokenizer, tiny_llama_config
from services.common.experience import SampleRecord
from trainer.config import TrainerConfig
from trainer.data import TrainSequence, collate, micro_batches, sequence_tokens, sequences_of
from trainer.objective import compute_objective

TOK = build_char_tokenizer()
SPECIAL = sorted(set(TOK.all_special_ids))
MAX_SEQ_LEN = 14


def _seq(prompt_len: int, completion_len: int, tag: str = "") -> TrainSequence:
    """A sequence with the given lengths (valid content, K = 2), enough for collate and the budgets."""
    L = completion_len
    sample = SampleRecord(
        completion_ids=np.full(L, 9, np.int32),
        behaviour_logprobs=np.full(L, -1.0, np.float32),
        teacher_topk_ids=np.tile(np.array([[5, 6]], np.int32), (L, 1)),
        teacher_topk_logprobs=np.full((L, 2), -1.0, np.float32),
        teacher_target_logprobs=np.full(L, -1.0, np.float32),
    )
    return TrainSequence(np.full(prompt_len, 7, np.int32), sample, 0, tag)


def _random_seqs(n: int, seed: int) -> list[TrainSequence]:
    rng = np.random.default_rng(seed)
    return [_seq(int(rng.integers(1, 6)), int(rng.integers(1, 15)), str(i)) for i in range(n)]


def _input_tokens(group: list[TrainSequence], packed: bool) -> int:
    """What the micro-batch really costs: the size of collate's model input."""
    mb = collate(group, support="teacher_topk", top_k=2, max_seq_len=MAX_SEQ_LEN, pack=packed)
    return int(mb.input_ids_B_S.numel())


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("max_tokens", [1, 12, 30, 64, 1000])
def test_budget_respected_and_every_sequence_once(max_tokens, packed):
    seqs = _random_seqs(23, seed=max_tokens)
    groups = micro_batches(seqs, max_tokens, max_seq_len=MAX_SEQ_LEN, packed=packed)
    flat = [id(s) for g in groups for s in g]
    assert sorted(flat) == sorted(id(s) for s in seqs)  # a partition: each sequence exactly once
    assert all(groups)
    for g in groups:
        assert _input_tokens(g, packed) <= max_tokens or len(g) == 1
    over = [s for s in seqs if sequence_tokens(s, MAX_SEQ_LEN) > max_tokens]
    assert sum(1 for g in groups if _input_tokens(g, packed) > max_tokens) == len(over)
    assert micro_batches(seqs, max_tokens, max_seq_len=MAX_SEQ_LEN, packed=packed) == groups  # deterministic


def test_sequence_tokens_follow_collates_cut():
    assert sequence_tokens(_seq(4, 5), max_seq_len=14) == 9
    assert sequence_tokens(_seq(4, 20), max_seq_len=14) == 14  # completion cut to 10
    assert _input_tokens([_seq(4, 20)], packed=True) == 14


def test_grouping_longest_first_first_fit():
    """Hand-worked: lengths (prompt 1 + completion) 3, 10, 4, 9 and 10, 6, 5, 4."""
    a = [_seq(1, n - 1, str(n)) for n in (3, 10, 4, 9)]

    def tags(groups):
        return [[int(s.record_id) for s in g] for g in groups]

    # padded, budget 20: [10, 9] costs 2 * 10; 4 would make it 30, so [4, 3] (2 * 4)
    assert tags(micro_batches(a, 20, max_seq_len=MAX_SEQ_LEN, packed=False)) == [[10, 9], [4, 3]]
    # padded, budget 19: 10 and 9 cannot share (2 * 10); 4 joins 9 (2 * 9); 3 fits neither (2 * 10, 3 * 9)
    assert tags(micro_batches(a, 19, max_seq_len=MAX_SEQ_LEN, packed=False)) == [[10], [9, 4], [3]]
    b = [_seq(1, n - 1, str(n)) for n in (10, 6, 5, 4)]
    # packed, budget 15: 6 does not fit with 10 (16) but 5 does (15); 4 joins 6
    assert tags(micro_batches(b, 15, max_seq_len=MAX_SEQ_LEN, packed=True)) == [[10, 5], [6, 4]]


def test_zero_budget_is_one_micro_batch_and_bad_budgets_raise():
    seqs = _random_seqs(5, seed=1)
    assert micro_batches(seqs, 0, max_seq_len=MAX_SEQ_LEN, packed=False) == [seqs]
    assert micro_batches([], 10, max_seq_len=MAX_SEQ_LEN, packed=True) == []
    with pytest.raises(ValueError, match="max_tokens"):
        micro_batches(seqs, -1, max_seq_len=MAX_SEQ_LEN, packed=False)


# ------------------------------------------------------------------------ gradient accumulation


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(len(TOK), tokenizer=TOK))


@pytest.fixture(scope="module")
def shard():
    student, teacher = _model(1), _model(2)
    kw = dict(group_size=3, top_k=8, behaviour_top_k=8, special_ids=SPECIAL, eos_id=TOK.eos_token_id)
    recs = synthetic_records(
        student, teacher, n_records=2, prompt_len=3, completion_len=(2, 12), seed=4, **kw
    )
    recs += synthetic_records(
        student, teacher, n_records=1, prompt_len=6, completion_len=(2, 12), seed=5, **kw
    )
    return sequences_of(recs)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["lsm", "sampled_token"])
@pytest.mark.parametrize("packed", [False, True])
def test_accumulated_micro_batch_gradients_equal_the_shard_gradient(shard, packed, objective):
    model = _model(7)
    cfg = TrainerConfig(
        model="tiny", objective=objective, top_k=8, batch_size=4, mini_batch_size=2, chunk_size=5
    )

    def batch(seqs):
        masked = torch.tensor(SPECIAL)
        return collate(
            seqs, support="teacher_topk", top_k=8, max_seq_len=MAX_SEQ_LEN, masked_ids=masked, pack=packed
        )

    whole = batch(shard)
    total = float(whole.num_loss_tokens)
    loss_whole, _ = compute_objective(model, whole, cfg, denom_tokens=total)
    g_whole = _grads(model, loss_whole)

    groups = micro_batches(shard, 30, max_seq_len=MAX_SEQ_LEN, packed=packed)
    assert 3 <= len(groups) < len(shard)  # several micro-batches, some with several sequences
    value, acc = 0.0, {k: torch.zeros_like(v) for k, v in g_whole.items()}
    for group in groups:
        loss, _ = compute_objective(model, batch(group), cfg, denom_tokens=total)
        value += loss.item()
        for k, g in _grads(model, loss).items():
            acc[k] += g
    assert value == pytest.approx(loss_whole.item(), rel=1e-5)
    for name in g_whole:
        torch.testing.assert_close(acc[name], g_whole[name], rtol=1e-4, atol=1e-6, msg=name)
