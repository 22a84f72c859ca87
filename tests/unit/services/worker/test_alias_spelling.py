"""Multi-token aliases: the worker's spell-out and fold, checked against a tiny teacher run directly, one
prefix at a time, on the rewritten sequence (teacher forcing by hand)."""

import numpy as np
import pytest
import torch
from opd_teacher_client import ScoredRows
from transformers import LlamaForCausalLM

from experiments.tiny_models import build_char_tokenizer, tiny_llama_config
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
    folded = fold_rows(rows, sp)
    assert folded.topk_ids.shape == (len(COMPLETION), k) and folded.target_logprobs.shape == (
        len(COMPLETION),
    )

    for t, tok in enumerate(COMPLETION):
        prefix = sp.token_ids[: sp.score_from + int(sp.first_row_L[t])]
        first = next_logprobs(teacher, prefix)  # the teacher's distribution at this student position
        if tok == S:
            # teacher-forced product over the spelling, one prefix at a time
            spelled = sum(
                next_logprobs(teacher, prefix + list(SPELL[:j]))[SPELL[j]] for j in range(len(SPELL))
            )
            assert folded.target_logprobs[t] == pytest.approx(spelled.item(), abs=1e-4)
        else:
            assert folded.target_logprobs[t] == pytest.approx(first[tok].item(), abs=1e-4)
        # the row is the teacher's own next-token row at this prefix, as written, spelled position or not
        ids = folded.topk_ids[t]
        np.testing.assert_array_equal(ids, torch.topk(first.float(), k).indices.numpy())
        np.testing.assert_allclose(folded.topk_logprobs[t], first[ids].numpy(), atol=1e-4)
        np.testing.assert_allclose(folded.candidate_logprobs[t], first[[S, SPELL[0], 0]].numpy(), atol=1e-4)


def test_rows_depend_on_the_prefix_only_not_on_the_sampled_token(teacher):
    """Two completions share a prefix and differ at position 1 (the alias there, a plain token in the
    other): the folded rows at position 1 are the same, so the target of that prefix does not depend on
    what the student sampled (no mixture of a resolved and a plain target in the expected gradient)."""
    k = 6
    a, b = [VOCAB["3"], S, VOCAB["4"]], [VOCAB["3"], VOCAB["7"], VOCAB["4"]]
    folded = []
    for comp in (a, b):
        sp = spell_out(PROMPT, comp, SPELLINGS)
        cand = np.tile(np.array([S, SPELL[0]], np.int32), (len(comp), 1))
        rows = scored_rows(teacher, sp.token_ids, sp.score_from, k, cand[np.repeat(np.arange(3), sp.span_L)])
        folded.append(fold_rows(rows, sp))
    for t in (0, 1):
        for name in ("topk_ids", "topk_logprobs", "candidate_logprobs"):
            np.testing.assert_allclose(getattr(folded[0], name)[t], getattr(folded[1], name)[t], atol=1e-6)
    assert folded[0].target_logprobs[1] != folded[1].target_logprobs[1]  # each sampled token its own value


def test_no_spelling_in_the_sequence_leaves_rows_unchanged(teacher):
    completion = [VOCAB[c] for c in "345"]
    sp = spell_out([VOCAB["1"], VOCAB["="]], completion, SPELLINGS)
    cand = np.zeros((3, 1), np.int32)
    rows = scored_rows(teacher, sp.token_ids, sp.score_from, 4, cand)
    folded = fold_rows(rows, sp)
    for name in ("topk_ids", "topk_logprobs", "target_logprobs", "candidate_logprobs"):
        np.testing.assert_array_equal(getattr(folded, name), getattr(rows, name))
