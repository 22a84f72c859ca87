"""trainer.objective through heads.py against the naive path: full [B, S, V] logits from the model's own
forward, log_softmax, gather -> trainer.losses (values and gradients), for every objective and support."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from experiments.synthetic import synthetic_records
from experiments.tiny_models import build_char_tokenizer, tiny_llama_config
from services.common.config import ConfigError
from trainer import losses
from trainer.config import TrainerConfig
from trainer.data import collate, sequences_of
from trainer.objective import compute_objective, lm_head_gradient_variance
from trainer.train import check_setup

TOK = build_char_tokenizer()
SPECIAL = sorted(set(TOK.all_special_ids))


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(len(TOK), tokenizer=TOK)).double()


@pytest.fixture(scope="module")
def models():
    return _model(1), _model(2)


@pytest.fixture(scope="module")
def records(models):
    student, teacher = models
    V = len(TOK)
    recs = synthetic_records(
        student.float(),
        teacher.float(),
        n_records=3,
        group_size=2,
        top_k=V,
        behaviour_top_k=6,
        special_ids=SPECIAL,
        eos_id=TOK.eos_token_id,
        seed=3,
    )
    student.double(), teacher.double()
    for rec in recs:  # an old behaviour policy, so PPO ratios differ from 1 and some clip
        for s in rec.samples:
            s.behaviour_logprobs = s.behaviour_logprobs - 0.3 * (1 + (s.completion_ids % 3))
    return recs


def _cfg(**kw) -> TrainerConfig:
    base = dict(model="tiny", top_k=8, batch_size=4, mini_batch_size=2, chunk_size=5)
    return TrainerConfig(**{**base, **kw})


def _batch(records, cfg, masked=True):
    masked_ids = torch.tensor(SPECIAL) if masked else None
    mb = collate(
        sequences_of(records),
        support=cfg.support,
        top_k=cfg.top_k,
        max_seq_len=cfg.max_seq_len,
        masked_ids=masked_ids,
    )
    mb.support_teacher_logprobs_B_T_K = mb.support_teacher_logprobs_B_T_K.double()
    return mb


def _naive_student_logprobs_BTV(model, mb):
    """Full logits from the HF forward (the path heads.py avoids), at the completion positions."""
    logits_BSV = model(input_ids=mb.input_ids_B_S, attention_mask=mb.attention_mask_B_S).logits
    b = torch.arange(mb.positions_B_T.shape[0])[:, None]
    return torch.log_softmax(logits_BSV[b, mb.positions_B_T].double(), dim=-1)  # (B, T, V)


def _naive_loss(model, mb, cfg):
    lp_BTV = _naive_student_logprobs_BTV(model, mb)
    if cfg.objective == "lsm":
        lp_BTK = lp_BTV.gather(-1, mb.support_ids_B_T_K)
        return losses.lsm_loss(
            lp_BTK,
            mb.support_teacher_logprobs_B_T_K,
            mb.support_mask_B_T_K,
            mb.token_mask_B_T,
            renormalize=cfg.renormalize,
        )[0]
    lp_BT = lp_BTV.gather(-1, mb.sampled_ids_B_T[..., None])[..., 0]
    gamma = cfg.gamma if cfg.objective == "gamma" else 0.0
    return losses.sampled_token_opd_loss(
        lp_BT,
        mb.behaviour_logprobs_B_T,
        mb.teacher_logprobs_B_T,
        mb.token_mask_B_T,
        gamma,
        cfg.clip_low,
        cfg.clip_high,
    )[0]


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_grads(a, b, rtol=1e-5, atol=1e-8):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


VARIANTS = [
    dict(objective="lsm", support="teacher_topk"),
    dict(objective="lsm", support="teacher_topk", renormalize=False),
    dict(objective="lsm", support="student_topk", top_k=5),
    dict(objective="lsm", support="teacher_topk_plus_sampled"),
    dict(objective="sampled_token"),
    dict(objective="gamma", gamma=0.9),
    dict(objective="gamma", gamma=1.0, clip_low=0.05, clip_high=0.05),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_objective_matches_naive_full_logits(models, records, kw):
    student, _ = models
    cfg = _cfg(**kw)
    mb = _batch(records, cfg)
    assert mb.token_mask_B_T.sum() < mb.valid_B_T.sum()  # the eos positions are masked out
    loss, metrics = compute_objective(student, mb, cfg, with_diagnostics=True)
    ref = _naive_loss(student, mb, cfg)
    assert loss.item() != 0.0
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-5, atol=1e-7)
    _assert_close_grads(_grads(student, loss), _grads(student, ref))
    loss_key = {"lsm": "loss/lsm", "sampled_token": "loss/sampled_token", "gamma": "loss/gamma"}[
        cfg.objective
    ]
    assert metrics[loss_key] == pytest.approx(ref.item(), rel=1e-5)
    if cfg.objective != "lsm":
        assert 0.0 <= metrics["opd/clip_frac"] <= 1.0
    if kw.get("clip_low") == 0.05:
        assert metrics["opd/clip_frac"] > 0  # the perturbed behaviour logprobs leave the narrow clip range


def test_diagnostics_match_definitions(models, records):
    student, _ = models
    cfg = _cfg(objective="lsm")
    mb = _batch(records, cfg)
    _, m = compute_objective(student, mb, cfg, with_diagnostics=True)
    lp_BTV = _naive_student_logprobs_BTV(student, mb).detach()
    tm = mb.token_mask_B_T
    entropy = -(lp_BTV.exp() * lp_BTV).sum(-1)
    gap = mb.teacher_logprobs_B_T - lp_BTV.gather(-1, mb.sampled_ids_B_T[..., None])[..., 0]
    smask = mb.support_mask_B_T_K
    s_mass = (lp_BTV.gather(-1, mb.support_ids_B_T_K).exp() * smask).sum(-1)
    t_mass = (mb.support_teacher_logprobs_B_T_K.exp() * smask).sum(-1)
    for key, ref in [
        ("student/entropy", entropy),
        ("teacher/gap_mean", gap),
        ("support/student_mass", s_mass),
        ("support/teacher_mass", t_mass),
    ]:
        assert m[key] == pytest.approx((ref * tm).sum().item() / tm.sum().item(), rel=1e-5), key
    assert 0 < m["support/teacher_mass"] < 1 and 0 < m["support/student_mass"] < 1


def test_lsm_with_k_equal_v_is_full_reverse_kl(models, records):
    """LSM over the whole vocabulary with renormalisation is the full reverse KL, computed here by hand."""
    student, _ = models
    V = len(TOK)
    lsm_cfg = _cfg(objective="lsm", top_k=V, special_token_masking=False)
    full_cfg = dataclasses.replace(lsm_cfg, objective="full_kl")
    mb = _batch(records, lsm_cfg, masked=False)
    lsm, _ = compute_objective(student, mb, lsm_cfg)
    full, m = compute_objective(student, mb, full_cfg)
    lp_BTV = _naive_student_logprobs_BTV(student, mb)
    lq_BTV = torch.empty_like(lp_BTV).scatter_(-1, mb.support_ids_B_T_K, mb.support_teacher_logprobs_B_T_K)
    kl_BT = (lp_BTV.exp() * (lp_BTV - lq_BTV)).sum(-1)
    ref = (kl_BT * mb.token_mask_B_T).sum() / mb.token_mask_B_T.sum()
    torch.testing.assert_close(lsm.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(full.double(), ref, rtol=1e-5, atol=1e-7)
    assert m["loss/full_kl"] == pytest.approx(ref.item(), rel=1e-5)
    _assert_close_grads(_grads(student, lsm), _grads(student, full), rtol=1e-4, atol=1e-7)


def test_full_kl_refuses_a_top_k_teacher():
    with pytest.raises(ConfigError, match="vocabulary size 88"):
        check_setup(_cfg(objective="full_kl", top_k=16), vocab_size=88, world_size=1)
    check_setup(_cfg(objective="full_kl", top_k=88), vocab_size=88, world_size=1)
    with pytest.raises(ConfigError, match="cannot feed"):
        check_setup(_cfg(batch_size=4, mini_batch_size=1), vocab_size=88, world_size=2)


@pytest.mark.parametrize("objective", ["lsm", "sampled_token"])
def test_shards_with_global_denominator_add_up_to_the_mini_batch(models, records, objective):
    """The data-parallel split: per-shard losses over the global token count sum to the whole loss."""
    student, _ = models
    cfg = _cfg(objective=objective)
    mb = _batch(records, cfg)
    whole, _ = compute_objective(student, mb, cfg)
    g_whole = _grads(student, whole)
    total = float(mb.num_loss_tokens)
    shards = [mb.rows(0, 2), mb.rows(2, 3), mb.rows(3, 6)]
    acc = None
    value = 0.0
    for sh in shards:
        loss, _ = compute_objective(student, sh, cfg, denom_tokens=total)
        value += loss.item()
        g = _grads(student, loss)
        acc = g if acc is None else {k: acc[k] + g[k] for k in acc}
    assert value == pytest.approx(whole.item(), rel=1e-6)
    _assert_close_grads(acc, g_whole)


def test_lm_head_gradient_variance_matches_naive(models, records):
    student, _ = models
    cfg = _cfg(objective="lsm")
    mb = _batch(records, cfg)
    student.zero_grad(set_to_none=True)
    m = lm_head_gradient_variance(student, mb, cfg, micro_batches=3)
    w = student.get_output_embeddings().weight
    gs = []
    for s, e in [(0, 2), (2, 4), (4, 6)]:
        sub = mb.rows(s, e)
        (g,) = torch.autograd.grad(_naive_loss(student, sub, cfg), [w])
        gs.append(g.flatten())
    G = torch.stack(gs)
    ref = G.var(dim=0, unbiased=True).sum().item()
    assert m["grad/variance"] == pytest.approx(ref, rel=1e-5)
    assert m["grad/variance_rel"] == pytest.approx(ref / G.mean(0).square().sum().item(), rel=1e-5)
    assert student.get_output_embeddings().weight.grad is None  # only autograd.grad, no accumulation


@pytest.mark.parametrize("objective", ["lsm", "sampled_token"])
def test_bf16_compute_dtype_keeps_fp32_master_weights(models, records, objective):
    """compute_dtype=bf16 on an fp32 model: the LM head runs in bf16 (the loss stays close to the fp32 one)
    and the gradient reaches the fp32 weights through the cast, in fp32 and close to the fp32 gradient."""
    student = copy.deepcopy(models[0]).float()
    cfg = _cfg(objective=objective)
    mb = _batch(records, cfg)
    ref, _ = compute_objective(student, mb, cfg)
    g_ref = _grads(student, ref)
    loss, metrics = compute_objective(student, mb, cfg, with_diagnostics=True, compute_dtype=torch.bfloat16)
    g = _grads(student, loss)
    assert loss.dtype == torch.float32 and all(np.isfinite(v) for v in metrics.values())
    assert loss.item() == pytest.approx(ref.item(), rel=5e-3, abs=1e-4)
    assert g.keys() == g_ref.keys()
    for name, p in student.named_parameters():
        assert p.dtype == g[name].dtype == torch.float32, name
        rel_err = ((g[name] - g_ref[name]).norm() / g_ref[name].norm()).item()
        assert rel_err < 2e-2, (name, rel_err)
    head = student.get_output_embeddings().weight
    assert not torch.equal(g["lm_head.weight"], g_ref["lm_head.weight"])  # it did run in bf16
    assert head.grad is not None and head.grad.dtype == torch.float32
