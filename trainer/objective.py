"""The configured objective on a collated mini-batch: model -> final hidden states -> heads -> losses.

The LSM and sampled-token paths never build [T, V] logits: hidden states at the completion positions go
through trainer/heads.py (support logits, chunked logsumexp). Only `full_kl`, the reference, builds them.

`denom_tokens` makes a shard's loss use a larger mini-batch's token count as the denominator (data
parallelism, trainer/dist.py; micro-batches, trainer/data.py `micro_batches`): loss = (sum over this shard's
tokens) / denom_tokens, so the shards' losses, and hence their gradients, add up to those of the whole
mini-batch.

`compute_dtype` runs the LM head in a lower precision than the master weights: the completion hidden states
and the head's weight and bias are cast to it (a V x D copy of the weight in that dtype per call) and the
heads accumulate the weight gradient in fp32 (trainer/heads.py); the gradient flows back through the cast
and reaches the master weight in its own dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainer import heads, losses
from trainer.config import TrainerConfig
from trainer.data import MiniBatch, split_even
from trainer.metrics import GradientVariance

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def completion_hidden(hidden_B_S_d: Tensor, mb: MiniBatch) -> Tensor:
    """[N, d] hidden states that predict the N valid completion tokens (row-major over (b, t)).

    `hidden_B_S_d` has the rows of mb.input_ids_B_S (one per sequence, or one packed row); sequence b's
    states are in row mb.hidden_rows_B[b] at mb.positions_B_T[b].
    """
    h_B_T_d = hidden_B_S_d[mb.hidden_rows_B[:, None], mb.positions_B_T]  # (B, T, d)
    return h_B_T_d[mb.valid_B_T]  # (N, d)


def _scatter(values_N: Tensor, valid_B_T: Tensor) -> Tensor:
    """Put per-valid-position values [N, ...] back into a zero-padded [B, T, ...] (differentiable)."""
    out = values_N.new_zeros(*valid_B_T.shape, *values_N.shape[1:])
    return out.index_put((valid_B_T,), values_N)


def head_objective(
    h_N_d: Tensor, weight_V_d: Tensor, bias_V: Tensor | None, mb: MiniBatch, cfg: TrainerConfig
) -> tuple[Tensor, dict[str, float]]:
    """(loss, metrics) of cfg.objective from the hidden states of the valid completion positions.

    The loss is losses.masked_token_mean over mb.token_mask (1 / sum_i |o_i| of this mini-batch).
    """
    valid = mb.valid_B_T
    if cfg.objective == "lsm":
        ids_N_K = mb.support_ids_B_T_K[valid]
        z_N_K = heads.support_logits(h_N_d, weight_V_d, ids_N_K, cfg.chunk_size, bias_V)
        if not cfg.renormalize:
            # The ablation needs full-vocabulary log-probabilities; with renormalisation the normaliser cancels.
            z_N_K = (
                z_N_K.float() - heads.chunked_logsumexp(h_N_d, weight_V_d, cfg.chunk_size, bias_V)[:, None]
            )
        return losses.lsm_loss(
            _scatter(z_N_K, valid),
            mb.support_teacher_logprobs_B_T_K,
            mb.support_mask_B_T_K,
            mb.token_mask_B_T,
            renormalize=cfg.renormalize,
        )
    if cfg.objective in ("sampled_token", "gamma"):
        lp_N = heads.token_logprobs(h_N_d, weight_V_d, mb.sampled_ids_B_T[valid], cfg.chunk_size, bias_V)
        loss, metrics = losses.sampled_token_opd_loss(
            _scatter(lp_N, valid),
            mb.old_logprobs_B_T,
            mb.teacher_logprobs_B_T,
            mb.token_mask_B_T,
            gamma=cfg.gamma if cfg.objective == "gamma" else 0.0,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            reward_mask_BT=mb.reward_mask_B_T,
            step_mask_BT=mb.student_step_B_T,
            behaviour_logprobs_BT=mb.behaviour_logprobs_B_T if cfg.recompute_old else None,
        )
        if cfg.objective == "gamma":
            metrics["loss/gamma"] = metrics.pop("loss/sampled_token")
        return loss, metrics
    if cfg.objective == "full_kl":
        # Reference only: the record's teacher "top-K" is the whole vocabulary (checked), so scattering it by
        # id gives the teacher's full distribution; the student's logits are the plain (N, V) matmul.
        logits_N_V = h_N_d @ weight_V_d.T + (bias_V if bias_V is not None else 0.0)
        ids_N_V = mb.support_ids_B_T_K[valid]
        lq_N_V = mb.support_teacher_logprobs_B_T_K[valid]
        teacher_N_V = lq_N_V.new_empty(lq_N_V.shape).scatter_(1, ids_N_V, lq_N_V)
        return losses.full_reverse_kl(
            _scatter(logits_N_V, valid), _scatter(teacher_N_V, valid), mb.token_mask_B_T
        )
    raise ValueError(f"unknown objective {cfg.objective!r}")


def _token_mean(values_N: Tensor, mb: MiniBatch) -> float:
    return losses.masked_token_mean(_scatter(values_N.float(), mb.valid_B_T), mb.token_mask_B_T).item()


@torch.no_grad()
def diagnostics(
    h_N_d: Tensor, weight_V_d: Tensor, bias_V: Tensor | None, mb: MiniBatch, cfg: TrainerConfig
) -> dict[str, float]:
    """Student entropy, teacher - student log-prob gap on sampled tokens, and the support masses.

    Each is a token mean over mb.token_mask. These cost full-vocabulary passes (chunked, no [T, V] kept),
    hence `diagnostics_every`.
    """
    valid = mb.valid_B_T
    h_N_d = h_N_d.detach()
    lse_N = heads.chunked_logsumexp(h_N_d, weight_V_d, cfg.chunk_size, bias_V)
    ids_N_K = mb.support_ids_B_T_K[valid]
    sampled_N = mb.sampled_ids_B_T[valid]
    z_N_K1 = heads.support_logits(
        h_N_d, weight_V_d, torch.cat([ids_N_K, sampled_N[:, None]], 1), cfg.chunk_size, bias_V
    )
    student_lp_N_K1 = z_N_K1.float() - lse_N[:, None]
    mask_B_T_K = mb.support_mask_B_T_K
    student_mass_B_T = losses.support_mass(_scatter(student_lp_N_K1[:, :-1], valid), mask_B_T_K)
    teacher_mass_B_T = losses.support_mass(mb.support_teacher_logprobs_B_T_K, mask_B_T_K)
    gap_N = mb.teacher_logprobs_B_T[valid] - student_lp_N_K1[:, -1]
    tm = mb.token_mask_B_T
    gap_B_T = _scatter(gap_N.float(), valid)
    return {
        "student/entropy": _token_mean(heads.chunked_entropy(h_N_d, weight_V_d, cfg.chunk_size, bias_V), mb),
        # where the teacher's log q'(y_t) is defined (not at a sampled teacher-side alias id)
        "teacher/gap_mean": losses.masked_token_mean(gap_B_T, tm & mb.reward_mask_B_T).item(),
        "support/student_mass": losses.masked_token_mean(student_mass_B_T, tm).item(),
        "support/teacher_mass": losses.masked_token_mean(teacher_mass_B_T, tm).item(),
    }


def compute_objective(
    model: PreTrainedModel,
    mb: MiniBatch,
    cfg: TrainerConfig,
    denom_tokens: float | None = None,
    with_diagnostics: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """(loss, metrics) for one (shard of a) mini-batch already on the model's device, padded or packed.

    With `denom_tokens`, the loss is rescaled to sum(shard tokens) / denom_tokens (see the module docstring);
    metrics stay this shard's own token means. `compute_dtype` is the LM head's dtype (module docstring).
    """
    hidden_B_S_d = heads.final_hidden(model, mb.input_ids_B_S, mb.attention_mask_B_S, mb.position_ids_B_S)
    h_N_d, weight_V_d, bias_V = _head_inputs(model, completion_hidden(hidden_B_S_d, mb), compute_dtype)
    loss, metrics = head_objective(h_N_d, weight_V_d, bias_V, mb, cfg)
    if with_diagnostics:
        metrics.update(diagnostics(h_N_d, weight_V_d, bias_V, mb, cfg))
    if denom_tokens is not None:
        loss = loss * (mb.num_loss_tokens / max(denom_tokens, 1.0))
    return loss, metrics


@torch.no_grad()
def sampled_logprobs(
    model: PreTrainedModel, mb: MiniBatch, cfg: TrainerConfig, compute_dtype: torch.dtype | None = None
) -> Tensor:
    """(B, T) log pi(y_t | c_t) of the sampled tokens under `model` as it is now; 0 where not valid.

    The PPO old policy when `recompute_old_logprobs` is on: computed for every mini-batch of a batch before
    its first update, so the ratio is exactly 1 at the first step (same model, same inputs, same kernels).
    """
    hidden_B_S_d = heads.final_hidden(model, mb.input_ids_B_S, mb.attention_mask_B_S, mb.position_ids_B_S)
    h_N_d, weight_V_d, bias_V = _head_inputs(model, completion_hidden(hidden_B_S_d, mb), compute_dtype)
    lp_N = heads.token_logprobs(h_N_d, weight_V_d, mb.sampled_ids_B_T[mb.valid_B_T], cfg.chunk_size, bias_V)
    return _scatter(lp_N.float(), mb.valid_B_T)


def _head_inputs(
    model: PreTrainedModel, h_N_d: Tensor, compute_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(hidden, weight, bias) for the heads, cast to `compute_dtype` when given (differentiably)."""
    weight_V_d, bias_V = heads.lm_head_of(model)
    if compute_dtype is None:
        return h_N_d, weight_V_d, bias_V
    return (
        h_N_d.to(compute_dtype),
        weight_V_d.to(compute_dtype),
        None if bias_V is None else bias_V.to(compute_dtype),
    )


def lm_head_gradient_variance(
    model: PreTrainedModel,
    mb: MiniBatch,
    cfg: TrainerConfig,
    micro_batches: int,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Paper appendix C.2: split the mini-batch into M micro-batches, take the objective's gradient on the
    LM-head weight for each, and report the total variance sum_j Var_m[g_m[j]] (unbiased over m) and the
    same divided by the squared norm of the mean gradient. The trunk runs once without grad, over the whole
    mini-batch in its layout (padded or packed); each micro-batch takes its sequences' rows of the
    completion hidden states.
    """
    weight_V_d, _ = heads.lm_head_of(model)
    with torch.no_grad():
        hidden_B_S_d = heads.final_hidden(model, mb.input_ids_B_S, mb.attention_mask_B_S, mb.position_ids_B_S)
        h_N_d = completion_hidden(hidden_B_S_d, mb)
    # sequence b's valid positions are rows [first_B[b], first_B[b + 1]) of h_N_d (row-major over (b, t))
    first_B = [0, *torch.cumsum(mb.valid_B_T.sum(1), 0).tolist()]
    acc = GradientVariance()
    for start, end in _micro_bounds(mb.num_sequences, micro_batches):
        sub = mb.rows(start, end)
        h_sub, w_sub, b_sub = _head_inputs(model, h_N_d[first_B[start] : first_B[end]], compute_dtype)
        loss, _ = head_objective(h_sub, w_sub, b_sub, sub, cfg)
        (g_V_d,) = torch.autograd.grad(loss, [weight_V_d], allow_unused=True)
        acc.add(torch.zeros_like(weight_V_d) if g_V_d is None else g_V_d)
    return acc.metrics()


def _micro_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    return [(s, e) for s, e in split_even(n, min(parts, n)) if e > s]
