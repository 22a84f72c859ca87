"""Multi-token aliases: the worker's spell-out and fold, checked against a tiny teacher run directly, one
prefix at a time, on the rewritten sequence (teacher forcing by hand)."""

import numpy as np
import pytest
import torch
from opd_teacher_client import ScoredRows
from transformers import LlamaForCausalLM

from experiments.tiny_models import build_char_tokenizer, tiny_llama_config
from services.common.token_aliases import FOREIGN_LOGPROB
from services.worker.aliasing import fold_rows, spell_out

TOK = build_char_tokenizer()
VOCAB = TOK.get_vocab()
S = VOCAB["Z"]  # the student's one-id marker
SPELL = (VOCAB["a"], VOCAB["b"], VOCAB["c"])  # the teacher's spelling of it
SPELLINGS = {S: SPELL}
PROMPT = [VOCAB[c] for c in "1Z+2="]
COMPLETION = [VOCAB[c] for c in "3Z4"] + [S]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(TOK), hidden_size=32, num_layers=1)).eval()


@torch.no_grad()
def next_logprobs(model, prefix: list[int]) -> torch.Tensor:
    """[V] log q(. | prefix) from one forward over exactly this prefix."""
    return torch.log_softmax(model(torch.tensor([prefix])).logits[0, -1].double(), -1)


@torch.no_grad()
def scored_rows(model, seq: list[int], score_from: int, k: int, cand_R_C: np.ndarray) -> ScoredRows:
    """What the teacher service returns for `seq` (rows score_from .. n-1), from one batched forward."""
    lq = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)[score_from - 1 : -1]  # [R, V]
    top = torch.topk(lq, k, dim=-1)
    tgt = lq.gather(1, torch.tensor(seq[score_from:])[:, None])[:, 0]
    return ScoredRows(
        top.indices.numpy().astype(np.int32),
        top.values.numpy(),
        tgt.numpy(),
        lq.gather(1, torch.from_numpy(cand_R_C).long()).numpy(),
    )


def test_spell_out_maps_every_student_position():
    sp = spell_out(PROMPT, COMPLETION, SPELLINGS)
    assert sp.token_ids[: sp.score_from] == [VOCAB["1"], *SPELL, VOCAB["+"], VOCAB["2"], VOCAB["="]]
    assert sp.token_ids[sp.score_from :] == [VOCAB["3"], *SPELL, VOCAB["4"], *SPELL]
    assert sp.first_row_L.tolist() == [0, 1, 4, 5] and sp.span_L.tolist() == [1, 3, 1, 3]
    assert sp.rows == 8


@pytest.mark.parametrize("k", [len(TOK), 4])
def test_fold_matches_the_teacher_on_the_rewritten_sequence(teacher, k):
    sp = spell_out(PROMPT, COMPLETION, SPELLINGS)
    cand_L_C = np.tile(np.array([S, SPELL[0], 0], np.int32), (len(COMPLETION), 1))
    student_of_row = np.repeat(np.arange(len(COMPLETION)), sp.span_L)
    rows = scored_rows(teacher, sp.token_ids, sp.score_from, k, cand_L_C[student_of_row])
    folded = fold_rows(rows, sp, COMPLETION, SPELLINGS, cand_L_C)
    assert folded.topk_ids.shape == (len(COMPLETION), k) and folded.target_logprobs.shape == (
        len(COMPLETION),
    )

    for t, tok in enumerate(COMPLETION):
        prefix = sp.token_ids[: sp.score_from + int(sp.first_row_L[t])]
        first = next_logprobs(teacher, prefix)  # the teacher's distribution at this student position
        expected = first.clone()
        if tok == S:
            # teacher-forced product over the spelling, one prefix at a time
            spelled = sum(
                next_logprobs(teacher, prefix + list(SPELL[:j]))[SPELL[j]] for j in range(len(SPELL))
            )
            expected[S] = torch.logaddexp(first[S], spelled)
            expected[SPELL[0]] = max(torch.log(first[SPELL[0]].exp() - spelled.exp()).item(), FOREIGN_LOGPROB)
            assert folded.target_logprobs[t] == pytest.approx(spelled.item(), abs=1e-4)
        else:
            assert folded.target_logprobs[t] == pytest.approx(first[tok].item(), abs=1e-4)
        # the folded top-K holds the k best of the rewritten row, each with its rewritten value
        ids = folded.topk_ids[t]
        np.testing.assert_allclose(folded.topk_logprobs[t], expected[ids].numpy(), atol=1e-4)
        assert (np.diff(folded.topk_logprobs[t]) <= 1e-6).all()
        if k == len(TOK):
            assert sorted(ids.tolist()) == list(range(len(TOK)))
        if tok == S:
            assert S in ids.tolist() or expected[S] < expected[ids].min()
        np.testing.assert_allclose(
            folded.candidate_logprobs[t], expected[[S, SPELL[0], 0]].numpy(), atol=1e-4
        )


def test_no_spelling_in_the_sequence_leaves_rows_unchanged(teacher):
    completion = [VOCAB[c] for c in "345"]
    sp = spell_out([VOCAB["1"], VOCAB["="]], completion, SPELLINGS)
    cand = np.zeros((3, 1), np.int32)
    rows = scored_rows(teacher, sp.token_ids, sp.score_from, 4, cand)
    folded = fold_rows(rows, sp, completion, SPELLINGS, cand)
    for name in ("topk_ids", "topk_logprobs", "target_logprobs", "candidate_logprobs"):
        np.testing.assert_array_equal(getattr(folded, name), getattr(rows, name))
