"""collate(pack=True): the padding-free layout (every sequence in one row, position ids restarting at 0,
no attention mask) against the padded one. The per-sequence tensors are identical, and through a tiny Llama
the loss, the metrics and every parameter gradient of compute_objective agree within float32 rounding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from experiments.synthetic import synthetic_records
from experiments.tiny_models import build_char_tokenizer, tiny_llama_config
from trainer import heads
from trainer.config import TrainerConfig
from trainer.data import _ROW_FIELDS, MiniBatch, collate, sequences_of
from trainer.objective import compute_objective, lm_head_gradient_variance

TOK = build_char_tokenizer()
SPECIAL = sorted(set(TOK.all_special_ids))
MAX_SEQ_LEN = 14  # cuts the longest completions (prompt 3 or 7 + completion up to 12)
PER_SEQUENCE = [
    "positions_B_T",  # compared separately: it indexes a different row layout
    "valid_B_T",
    "token_mask_B_T",
    "sampled_ids_B_T",
    "behaviour_logprobs_B_T",
    "teacher_logprobs_B_T",
    "support_ids_B_T_K",
    "support_teacher_logprobs_B_T_K",
    "support_mask_B_T_K",
    "policy_versions_B",
]


def _model(seed: int, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(TOK), tokenizer=TOK))
    model.set_attn_implementation(attn)
    return model


@pytest.fixture(scope="module")
def seqs():
    """Sequences of different prompt lengths (3 and 7) and completion lengths (2 to 12, some cut)."""
    student, teacher = _model(1), _model(2)
    kw = dict(group_size=3, top_k=8, behaviour_top_k=8, special_ids=SPECIAL, eos_id=TOK.eos_token_id)
    recs = synthetic_records(
        student, teacher, n_records=2, prompt_len=3, completion_len=(2, 12), seed=4, **kw
    )
    recs += synthetic_records(
        student, teacher, n_records=1, prompt_len=7, completion_len=(2, 12), seed=5, **kw
    )
    out = sequences_of(recs)
    lengths = [len(s.prompt_ids) + len(s.sample) for s in out]
    assert len(set(lengths)) > 3 and max(lengths) > MAX_SEQ_LEN  # varied, and some are cut
    return out


def _cfg(objective: str) -> TrainerConfig:
    return TrainerConfig(
        model="tiny", objective=objective, top_k=8, batch_size=4, mini_batch_size=2, chunk_size=5
    )


def _collate(seqs, pack: bool) -> MiniBatch:
    masked = torch.tensor(SPECIAL)
    return collate(
        seqs, support="teacher_topk", top_k=8, max_seq_len=MAX_SEQ_LEN, masked_ids=masked, pack=pack
    )


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_layout_from_the_definition(seqs):
    """One row: each sequence's prompt + cut completion back to back, position ids 0.. per sequence, no mask;
    positions_B_T point at the hidden state just before each completion token; the rest is the padded
    batch's."""
    padded, packed = _collate(seqs, pack=False), _collate(seqs, pack=True)
    assert packed.packed and not padded.packed
    assert packed.attention_mask_B_S is None and padded.position_ids_B_S is None
    want_ids, want_pos = [], []
    for s in seqs:
        P = len(s.prompt_ids)
        L = min(len(s.sample), MAX_SEQ_LEN - P)
        want_ids += [*s.prompt_ids.tolist(), *s.sample.completion_ids[:L].tolist()]
        want_pos += list(range(P + L))
    assert packed.input_ids_B_S.tolist() == [want_ids]
    assert packed.position_ids_B_S is not None and packed.position_ids_B_S.tolist() == [want_pos]
    assert packed.hidden_rows_B.tolist() == [0] * len(seqs)
    assert padded.hidden_rows_B.tolist() == list(range(len(seqs)))
    for name in PER_SEQUENCE[1:]:
        assert torch.equal(getattr(packed, name), getattr(padded, name)), name
    for mb in (padded, packed):
        ids_B_S = mb.input_ids_B_S[mb.hidden_rows_B[:, None], mb.positions_B_T + 1]
        assert torch.equal(ids_B_S[mb.valid_B_T], mb.sampled_ids_B_T[mb.valid_B_T])
    assert (packed.positions_B_T[~packed.valid_B_T] == 0).all()


@pytest.mark.parametrize("pack", [False, True])
def test_rows_equal_collating_the_subset(seqs, pack):
    """rows(start, end) is the MiniBatch of those sequences alone, in either layout (padding aside)."""
    mb = _collate(seqs, pack)
    for start, end in [(0, 2), (2, 5), (5, len(seqs)), (3, 3 + 1)]:
        sub, want = mb.rows(start, end), _collate(seqs[start:end], pack)
        assert sub.packed == pack and sub.num_sequences == end - start
        assert torch.equal(sub.hidden_rows_B, want.hidden_rows_B)
        for name in PER_SEQUENCE:
            a, b = getattr(sub, name), getattr(want, name)
            assert torch.equal(a[..., : b.shape[1], :] if a.dim() == 3 else a[..., : b.shape[-1]], b), name
        for name in _ROW_FIELDS - {"hidden_rows_B"}:
            a, b = getattr(sub, name), getattr(want, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert torch.equal(a[:, : b.shape[1]], b), name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("objective", ["lsm", "sampled_token"])
def test_packed_objective_equals_padded(seqs, objective, attn):
    """Loss, metrics and all parameter gradients agree: packing changes the layout, not the computation
    (each sequence attends only to itself, and RoPE sees its own positions)."""
    model, cfg = _model(7, attn), _cfg(objective)
    padded, packed = _collate(seqs, pack=False), _collate(seqs, pack=True)
    assert packed.input_ids_B_S.numel() < padded.input_ids_B_S.numel()
    loss_pad, m_pad = compute_objective(model, padded, cfg, with_diagnostics=True)
    loss_pack, m_pack = compute_objective(model, packed, cfg, with_diagnostics=True)
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-5, atol=1e-6)
    assert m_pack.keys() == m_pad.keys()
    for key in m_pad:
        assert m_pack[key] == pytest.approx(m_pad[key], rel=1e-4, abs=1e-6), key
    g_pad, g_pack = _grads(model, loss_pad), _grads(model, loss_pack)
    assert g_pack.keys() == g_pad.keys() == {n for n, _ in model.named_parameters()}
    for name in g_pad:
        torch.testing.assert_close(g_pack[name], g_pad[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_needs_no_attention_mask(seqs):
    """transformers detects packing from the position ids only when attention_mask is None: then the second
    sequence's hidden states are those it has alone; with an all-ones mask it would attend to the first."""
    model = _model(7)
    packed = _collate(seqs, pack=True)
    ids, pos = packed.input_ids_B_S, packed.position_ids_B_S
    first = int(packed.positions_B_T[0, packed.valid_B_T[0]].max()) + 2  # tokens of the first sequence
    with torch.no_grad():
        alone = heads.final_hidden(model, _collate(seqs[1:2], pack=False).input_ids_B_S)
        right = heads.final_hidden(model, ids, None, pos)[:, first : first + alone.shape[1]]
        leaky = heads.final_hidden(model, ids, torch.ones_like(ids), pos)[:, first : first + alone.shape[1]]
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_gradient_variance_is_layout_independent(seqs):
    model, cfg = _model(7), _cfg("lsm")
    m_pad = lm_head_gradient_variance(model, _collate(seqs, pack=False), cfg, micro_batches=3)
    m_pack = lm_head_gradient_variance(model, _collate(seqs, pack=True), cfg, micro_batches=3)
    assert m_pack.keys() == m_pad.keys()
    for key in m_pad:
        assert m_pack[key] == pytest.approx(m_pad[key], rel=1e-4), key
    assert np.isfinite(list(m_pad.values())).all()


@pytest.mark.parametrize("pack", [False, True])
def test_to_moves_every_tensor_and_keeps_the_layouts_nones(seqs, pack):
    mb = _collate(seqs[:3], pack)
    moved = mb.to("meta")
    for f in dataclasses.fields(mb):
        a, b = getattr(mb, f.name), getattr(moved, f.name)
        assert (a is None) == (b is None), f.name
        if a is not None:
            assert b.device.type == "meta" and b.shape == a.shape and b.dtype == a.dtype, f.name
    assert moved.packed == pack
