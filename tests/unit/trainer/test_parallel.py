"""trainer.parallel and the precision rules: bf16 master weights are refused (and why: a test where a bf16
AdamW step at the paper's lr leaves the norm weights exactly where they were while fp32 masters with bf16
compute move them), activation checkpointing's auto rule, the layouts' checks, the full-state gather."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from experiments.synthetic import synthetic_records
from experiments.tiny_models import build_char_tokenizer, tiny_llama_config
from services.common.config import ConfigError
from trainer import parallel
from trainer.config import TrainerConfig
from trainer.data import collate, sequences_of
from trainer.dist import DistContext
from trainer.objective import compute_objective

TOK = build_char_tokenizer()
CPU = DistContext(rank=0, world_size=1, device=torch.device("cpu"))


def _cfg(**kw) -> TrainerConfig:
    return TrainerConfig(**{"model": "unused", "top_k": 4, "diagnostics_every": 0, **kw})


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(len(TOK), tokenizer=TOK)).train()


def _batch(model: LlamaForCausalLM):
    teacher = _model(seed=1).eval()
    records = synthetic_records(
        model.eval(),
        teacher,
        n_records=2,
        group_size=2,
        top_k=4,
        behaviour_top_k=4,
        special_ids=sorted(set(TOK.all_special_ids)),
        eos_id=TOK.eos_token_id,
        completion_len=(5, 12),
        seed=3,
    )
    model.train()
    return collate(sequences_of(records), support="teacher_topk", top_k=4, max_seq_len=64)


def _norm_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "norm" in n}


def test_bf16_master_weights_are_refused_naming_the_fix():
    with pytest.raises(ConfigError, match='compute_dtype = "bfloat16"'):
        _cfg(dtype="bfloat16")
    cfg = _cfg(compute_dtype="bfloat16")
    assert cfg.dtype == "float32" and parallel.push_dtype_of(cfg) == torch.bfloat16
    assert parallel.push_dtype_of(_cfg(compute_dtype="bfloat16", push_dtype="float32")) == torch.float32


def test_a_bf16_adamw_step_at_the_papers_lr_moves_no_norm_weight_and_fp32_masters_do():
    """Norm weights start at 1.0, where bf16's spacing is 2^-7: an AdamW step of ~lr = 2e-6 rounds away.
    This is the failure `dtype = "bfloat16"` would have; fp32 masters with bf16 compute keep the step."""
    lr = 2e-6
    mb = _batch(_model())
    # (a) what the trainer used to do: bf16 parameters under a plain AdamW
    pure = _model().to(torch.bfloat16)
    before = _norm_weights(pure)
    opt = torch.optim.AdamW(pure.parameters(), lr=lr)
    loss, _ = compute_objective(pure, mb, _cfg())
    loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in pure.named_parameters() if "norm" in n
    )
    opt.step()
    after = _norm_weights(pure)
    assert all(torch.equal(before[n], after[n]) for n in before)  # not one norm weight moved

    # (b) fp32 master weights, bf16 compute (replicate layout: autocast trunk, bf16 head)
    model = _model()
    module = parallel.wrap_model(model, _cfg(compute_dtype="bfloat16"), CPU)
    before = _norm_weights(model)
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    loss, _ = module(mb)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in module.parameters() if p.grad is not None)
    opt.step()
    after = _norm_weights(model)
    for n in before:
        moved = (after[n] - before[n]).abs()
        assert moved.max() > 0.5 * lr, n  # Adam's first step is ~lr per element with a gradient


def test_bf16_compute_stays_close_to_fp32():
    mb = _batch(_model())
    fp32 = parallel.wrap_model(_model(), _cfg(), CPU)
    bf16 = parallel.wrap_model(_model(), _cfg(compute_dtype="bfloat16"), CPU)
    (l32, _), (l16, _) = fp32(mb), bf16(mb)
    assert l16.dtype == torch.float32
    assert abs(float(l16) - float(l32)) < 2e-2 * abs(float(l32)) + 1e-3


def test_activation_checkpointing_auto_switches_on_from_a_billion_parameters():
    assert not parallel.wants_checkpointing(_cfg(), 10**8)
    assert parallel.wants_checkpointing(_cfg(), parallel.AUTO_CHECKPOINTING_PARAMS)
    assert parallel.wants_checkpointing(_cfg(activation_checkpointing="on"), 10)
    assert not parallel.wants_checkpointing(_cfg(activation_checkpointing="off"), 10**12)
    model = _model()
    parallel.wrap_model(model, _cfg(activation_checkpointing="on"), CPU)
    assert model.is_gradient_checkpointing
    # checkpointed training computes the same gradients
    mb = _batch(_model())
    plain = parallel.wrap_model(_model(), _cfg(activation_checkpointing="off"), CPU)
    ck = parallel.wrap_model(_model(), _cfg(activation_checkpointing="on"), CPU)
    for m in (plain, ck):
        m(mb)[0].backward()
    for (n, a), b in zip(plain.named_parameters(), ck.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=lambda s, n=n: f"{n}: {s}")


def test_layout_checks():
    with pytest.raises(ConfigError, match="parallelism"):
        _cfg(parallelism="ddp")
    with pytest.raises(ConfigError, match="grad_variance_every"):
        _cfg(parallelism="fsdp", grad_variance_every=5)
    with pytest.raises(ValueError, match="float32"):
        parallel.wrap_model(_model().to(torch.bfloat16), _cfg(), CPU)
    with pytest.raises(RuntimeError, match="process group"):
        parallel.wrap_model(_model(), _cfg(parallelism="fsdp"), CPU)


def test_pushed_weights_are_cast_to_the_push_dtype_and_bytes_are_counted():
    module = parallel.wrap_model(_model(), _cfg(), CPU)
    weights = parallel.ModuleWeights(module, torch.bfloat16, is_main=True)
    full = dict(weights.tensors())
    assert full.keys() == module.model.state_dict().keys()
    assert [(n, tuple(t.shape), t.dtype) for n, t in full.items()] == weights.specs()  # specs say what comes
    assert all(t.dtype == torch.bfloat16 for t in full.values() if t.is_floating_point())
    assert list(parallel.ModuleWeights(module, torch.bfloat16, is_main=False).tensors()) == []
    opt = torch.optim.AdamW(module.parameters())
    n = sum(p.numel() for p in module.parameters())
    assert parallel.param_and_optimizer_bytes(module, opt) == 4 * n  # no optimizer state before a step
    module(_batch(_model()))[0].backward()
    opt.step()
    assert parallel.param_and_optimizer_bytes(module, opt) == 3 * 4 * n  # + exp_avg + exp_avg_sq
