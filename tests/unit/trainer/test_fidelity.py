"""Issue #19 in the trainer: the split special-token masking and its default ids, multi-token aliased ids out
of the teacher's rows, and the PPO old policy recomputed by the trainer (ratio 1 at the first step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from experiments.synthetic import synthetic_records
from experiments.tiny_models import build_char_tokenizer, tiny_llama_config
from services.common.config import ConfigError
from services.common.experience import SampleRecord
from services.common.token_aliases import parse_aliases, resolve_aliases
from trainer import parallel
from trainer.aliases import TrainerAliases
from trainer.config import TrainerConfig
from trainer.data import TrainSequence, collate, sequences_of
from trainer.dist import DistContext
from trainer.train import masked_ids_of, train_batch

TOK = build_char_tokenizer()
TEACHER_TOK = build_char_tokenizer(eos_token="<|im_end|>")
CPU = DistContext(rank=0, world_size=1, device=torch.device("cpu"))


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(len(TOK), tokenizer=TOK))


# --- config and default masked ids


def test_masking_switches_and_backward_compatibility():
    cfg = TrainerConfig(model="m")
    assert (cfg.special_token_masking, cfg.mask_special_positions, cfg.mask_special_support) == (
        True,
        True,
        True,
    )
    # the old field still turns all masking off
    assert masked_ids_of(TrainerConfig(model="m", special_token_masking=False), TOK, TEACHER_TOK) is None
    assert (
        masked_ids_of(
            TrainerConfig(model="m", mask_special_positions=False, mask_special_support=False),
            TOK,
            TEACHER_TOK,
        )
        is None
    )


def test_default_masked_ids_are_the_disagreement_and_the_list_overrides():
    ends = sorted([TOK.convert_tokens_to_ids("</s>"), TOK.convert_tokens_to_ids("<|im_end|>")])
    cfg = TrainerConfig(model="m")
    assert masked_ids_of(cfg, TOK, TEACHER_TOK).tolist() == ends
    assert (
        masked_ids_of(cfg, TOK, None).tolist() == []
    )  # no teacher tokenizer: the student's, no disagreement
    assert masked_ids_of(TrainerConfig(model="m", masked_token_ids=[7, 9]), TOK, TEACHER_TOK).tolist() == [
        7,
        9,
    ]


def test_recompute_old_logprobs_defaults_per_objective():
    assert TrainerConfig(model="m", objective="sampled_token").recompute_old
    assert TrainerConfig(model="m", objective="gamma").recompute_old
    assert not TrainerConfig(model="m", objective="lsm").recompute_old
    assert not TrainerConfig(model="m", objective="sampled_token", recompute_old_logprobs="off").recompute_old
    with pytest.raises(ConfigError, match="recompute_old_logprobs"):
        TrainerConfig(model="m", recompute_old_logprobs="yes")


# --- collate: the two parts of masking


def _records(seed=0):
    student, teacher = _model(1), _model(2)
    specials = sorted(set(TOK.all_special_ids))
    return synthetic_records(
        student,
        teacher,
        n_records=2,
        group_size=2,
        top_k=8,
        behaviour_top_k=8,
        special_ids=specials,
        eos_id=TOK.eos_token_id,
        seed=seed,
    )


@pytest.mark.parametrize(("positions", "support"), [(True, False), (False, True), (True, True)])
def test_collate_applies_each_part_alone(positions, support):
    seqs = sequences_of(_records())
    eos = TOK.eos_token_id
    for s in seqs:  # the end marker also in some supports
        s.sample.teacher_topk_ids[0, 0] = eos
    masked = torch.tensor([eos])
    kw = dict(support="teacher_topk", top_k=8, max_seq_len=100)
    off = collate(seqs, **kw)
    on = collate(seqs, **kw, masked_ids=masked, mask_positions=positions, mask_support=support)
    at_eos = off.valid_B_T & (off.sampled_ids_B_T == eos)
    assert at_eos.any()
    assert (on.token_mask_B_T[at_eos] != positions).all()
    slot_eos = off.support_mask_B_T_K & (off.support_ids_B_T_K == eos)
    assert slot_eos.any()
    assert (on.support_mask_B_T_K[slot_eos] != support).all()
    # nothing else changes
    assert torch.equal(on.token_mask_B_T[~at_eos], off.token_mask_B_T[~at_eos])
    assert torch.equal(on.support_mask_B_T_K[~slot_eos], off.support_mask_B_T_K[~slot_eos])


# --- multi-token aliases: a prefix's teacher row does not depend on the sampled token


def test_multi_token_aliased_id_leaves_every_teacher_row_but_keeps_its_sampled_slot():
    V, S = 10, 4  # student id 4 spelled by the teacher as [5, 6]
    aliases = TrainerAliases(resolve_aliases(parse_aliases([[S, [5, 6]]]), student_vocab=V, teacher_vocab=V))
    rng = np.random.default_rng(0)
    lq = np.log(rng.dirichlet(np.ones(V), size=3)).astype(np.float32)
    top = np.argsort(-lq, 1)[:, :V].astype(np.int32)

    def sample(completion):
        y = np.array(completion, np.int32)
        target = lq[np.arange(3), y]
        target[y == S] = -1.5  # the worker's teacher-forced spelling
        return SampleRecord(
            completion_ids=y,
            behaviour_logprobs=np.full(3, -1.0, np.float32),
            teacher_topk_ids=top,
            teacher_topk_logprobs=np.take_along_axis(lq, top, 1),
            teacher_target_logprobs=target.astype(np.float32),
            finish_reason="stop",
            behaviour_top_ids=top,
            behaviour_top_logprobs=np.zeros(top.shape, np.float32),
            teacher_candidate_ids=top,
            teacher_candidate_logprobs=np.take_along_axis(lq, top, 1),
        )

    seqs = [TrainSequence(np.array([1], np.int32), sample(c), 0, "r") for c in ([0, S, 2], [0, 3, 2])]
    for support in ("teacher_topk", "student_topk", "teacher_topk_plus_sampled"):
        mb = collate(seqs, support=support, top_k=V, max_seq_len=16, aliases=aliases)
        K = V
        # the same prefix (position 1 of both) gets the same row, whatever was sampled there
        assert torch.equal(mb.support_ids_B_T_K[0, 1, :K], mb.support_ids_B_T_K[1, 1, :K])
        assert torch.equal(mb.support_mask_B_T_K[0, 1, :K], mb.support_mask_B_T_K[1, 1, :K])
        assert torch.equal(
            mb.support_teacher_logprobs_B_T_K[0, 1, :K], mb.support_teacher_logprobs_B_T_K[1, 1, :K]
        )
        # S is in no row
        assert not (mb.support_mask_B_T_K[:, :, :K] & (mb.support_ids_B_T_K[:, :, :K] == S)).any()
        if support == "teacher_topk_plus_sampled":  # but the sampled S keeps its teacher-forced value
            assert mb.support_mask_B_T_K[0, 1, K] and mb.support_teacher_logprobs_B_T_K[0, 1, K] == -1.5
    assert mb.teacher_logprobs_B_T[0, 1] == -1.5


# --- the PPO old policy, recomputed


def _train_batch(objective, recompute, batch, mini, records, lr=1e-2):
    cfg = TrainerConfig(
        model="m",
        objective=objective,
        top_k=8,
        batch_size=batch,
        mini_batch_size=mini,
        chunk_size=7,
        recompute_old_logprobs=recompute,
        lr=lr,
    )
    module = parallel.wrap_model(_model(1), cfg, CPU)
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    return train_batch(module, opt, records, cfg, CPU, None)


def _stale_records():
    recs = _records(seed=4)
    for rec in recs:  # a rollout policy that is not the trainer's: its logprobs are off
        for s in rec.samples:
            s.behaviour_logprobs = s.behaviour_logprobs - 0.4 * (1 + (s.completion_ids % 3))
    return recs


@pytest.mark.parametrize("objective", ["sampled_token", "gamma"])
def test_recomputed_old_policy_gives_ratio_one_at_the_first_step(objective):
    recs = _stale_records()
    on = _train_batch(objective, "on", 4, 4, recs)
    assert on["opd/ratio_max_dev"] == 0.0 and on["opd/ratio_mean"] == 1.0 and on["opd/clip_frac"] == 0.0
    assert on["opd/clip_frac_rollout"] > 0.0 and on["opd/old_rollout_gap"] > 0.1  # reported both ways
    off = _train_batch(objective, "off", 4, 4, recs)
    assert off["opd/ratio_max_dev"] > 0.1 and "opd/clip_frac_rollout" not in off


def test_later_mini_batches_measure_the_batch_own_updates():
    """Two steps: the old policy of step 2 is the model before step 1, so its ratio moved off 1."""
    on = _train_batch("sampled_token", "on", 4, 2, _stale_records(), lr=5e-2)
    assert on["opd/ratio_max_dev"] > 0.0  # mean over steps: step 1 is exactly 0
