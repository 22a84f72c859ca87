"""Distillation objectives as pure tensor functions (DESIGN.md section 1).

Every function takes explicit masks, computes in fp32 whatever the input dtype, and works on any device.

Shape suffixes (the project's convention, here and in trainer/heads.py): a tensor's name ends with one
letter per dimension, separated by underscores, e.g. ``logprobs_B_T_K`` is [B, T, K] and ``weight_V_D``
is [V, D]; a 0-d or non-tensor value has none.

    B   batch: sequences (rows of a mini-batch)
    T   positions of a sequence (completion positions in the losses)
    K   support slots at a position (teacher or student top-K ids)
    V   vocabulary (logit width)
    D   hidden size (the LM head's input)
    N   flattened positions (B and T, or any leading dims, merged into one)
    C   teacher candidate ids per position
    L   completion length of one sample
    c   rows of one chunk (a slice of N, in the chunked LM-head kernels)

A letter that only one function uses is defined in its docstring (the blocked discounted-return scan below
writes C for its chunk length and N for its chunk count).

Notation (the paper, "Revisiting On-Policy Distillation", Fu et al.):

    S_t    support at position t (teacher top-K by default), given as K ids plus a mask of valid slots
    pi^(v) = pi(v|c_t) / sum_{u in S_t} pi(u|c_t)        student renormalised inside the support
    q^(v)  = q(v|c_t)  / sum_{u in S_t} q(u|c_t)         teacher renormalised inside the support
    L_LSM  = (1 / sum_i |o_i|) sum_i sum_t KL(pi^_t || q^_t)                    (equation 8)

Masked entries may hold anything, -inf and NaN included: every function selects with ``torch.where``
before any arithmetic touches them, so they reach neither the value nor the gradient.
"""

import torch
from torch import Tensor

# Stands in for -inf in masked support slots: exp() of it is exactly 0, and unlike -inf it never makes
# (-inf) - (-inf) = NaN in a log-softmax of a row whose slots are all masked.
_MASKED_LOGIT = torch.finfo(torch.float32).min

# Chunk length of the blocked discounted-return scan: a [C, C] discount matrix per level, log_C(T) levels.
_RETURN_CHUNK = 64


def _renormalized_logprobs(logprobs_B_T_K: Tensor, support_mask_B_T_K: Tensor) -> Tensor:
    """log of the distribution renormalised over the unmasked slots; 0 in masked slots.

    A per-row constant added to ``logprobs_B_T_K`` cancels, so unnormalised logits work as well.
    """
    filled_B_T_K = torch.where(support_mask_B_T_K, logprobs_B_T_K.float(), _MASKED_LOGIT)
    log_hat_B_T_K = torch.log_softmax(filled_B_T_K, dim=-1)
    return torch.where(support_mask_B_T_K, log_hat_B_T_K, 0.0)


def local_support_kl(
    student_logprobs: Tensor,  # (B, T, K) student log pi at the support ids (any per-row shift if renormalised)
    teacher_logprobs: Tensor,  # (B, T, K) teacher log q at the same ids; may be -inf in masked slots
    support_mask: Tensor,  # (B, T, K) bool, False where a slot is padding or a masked special token
    renormalize: bool = True,
) -> Tensor:  # (B, T)
    """Reverse KL between student and teacher restricted to the support, per position.

    ``renormalize=True`` (LSM): KL(pi^ || q^) = sum_{v in S} pi^(v) (log pi^(v) - log q^(v)), both
    distributions renormalised over the unmasked slots. The result is exact (not a sampled estimate), >= 0,
    and unchanged by a per-row constant shift of either input. Its gradient flows analytically through
    pi^, i.e. through a softmax over the K student values, so the full-vocabulary normaliser never appears.

    ``renormalize=False`` (the ablation): sum_{v in S} pi(v) (log pi(v) - log q(v)) on the given
    full-vocabulary log-probabilities. This is not a divergence (it can be negative) and it is what
    collapses in the paper.

    Rows with no unmasked slot give 0, with zero gradient.
    """
    mask_B_T_K = support_mask.bool()
    if renormalize:
        log_p_B_T_K = _renormalized_logprobs(student_logprobs, mask_B_T_K)
        log_q_B_T_K = _renormalized_logprobs(teacher_logprobs, mask_B_T_K)
    else:
        log_p_B_T_K = torch.where(mask_B_T_K, student_logprobs.float(), 0.0)
        log_q_B_T_K = torch.where(mask_B_T_K, teacher_logprobs.float(), 0.0)
    p_B_T_K = torch.where(mask_B_T_K, log_p_B_T_K.exp(), 0.0)
    return (p_B_T_K * (log_p_B_T_K - log_q_B_T_K)).sum(dim=-1)


def _discounted_scan(rewards_B_T: Tensor, gamma: float) -> Tensor:
    """A_t = sum_{t' >= t} gamma^(t'-t) r_t' along the last dim, blocked so no power of gamma is divided.

    Within a chunk of C positions the sum is a product with the upper-triangular [C, C] matrix
    gamma^(j - i); across chunks A at a chunk start obeys the same recursion with gamma^C, which is solved
    by the same function on the T / C chunk sums. Only non-negative powers appear, so gamma in [0, 1]
    never overflows or divides by an underflowed power (the naive gamma^t' / gamma^t form does).
    """
    B, T = rewards_B_T.shape
    C = min(T, _RETURN_CHUNK)
    n_chunks = -(-T // C)
    padded_B_NC = torch.nn.functional.pad(rewards_B_T, (0, n_chunks * C - T))
    r_B_N_C = padded_B_NC.view(B, n_chunks, C)

    idx_C = torch.arange(C, device=rewards_B_T.device)
    lag_C_C = idx_C[None, :] - idx_C[:, None]  # (C, C) j - i
    gamma_t = torch.tensor(gamma, dtype=torch.float32, device=rewards_B_T.device)
    # 0 ** 0 = 1 in torch, so gamma = 0 keeps the diagonal.
    discount_C_C = torch.where(lag_C_C >= 0, gamma_t ** lag_C_C.clamp_min(0), 0.0)
    local_B_N_C = r_B_N_C @ discount_C_C.T  # (B, N, C) returns that stop at the chunk end

    if n_chunks > 1:
        # A at the start of each chunk, then the tail of chunk n is carried in from chunk n + 1's start.
        start_B_N = _discounted_scan(local_B_N_C[:, :, 0].contiguous(), gamma**C)
        next_start_B_N = torch.nn.functional.pad(start_B_N[:, 1:], (0, 1))
        carry_C = gamma_t ** (C - idx_C)  # (C,) distance from position i to the next chunk start
        local_B_N_C = local_B_N_C + next_start_B_N[:, :, None] * carry_C
    return local_B_N_C.reshape(B, n_chunks * C)[:, :T]


def discounted_returns(
    rewards: Tensor, token_mask: Tensor, gamma: float, step_mask: Tensor | None = None
) -> Tensor:
    """Discounted return-to-go over the student's own steps, shape (B, T) -> (B, T).

        A_t = sum_{t' >= t, t' unmasked} gamma^(d(t, t')) r_t',   d(t, t') = steps in [t, t') that advance

    `step_mask` (B, T) marks the positions that advance the discount: the student's own tokens. In a
    multi-turn episode the environment's tokens sit between the student's turns; they are not steps of the
    student, so they do not lengthen the distance (gamma discounts per decision, not per token of context).
    None means every position is a step. A position outside `token_mask` contributes no reward and gets
    A = 0; a masked position that is a step (a masked special token) still counts in the distance.
    gamma = 0 gives A_t = r_t (token-level OPD); gamma = 1 the causal return-to-go (the sequence-level
    estimator). gamma must lie in [0, 1].
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    mask_B_T = token_mask.bool()
    r_B_T = torch.where(mask_B_T, rewards.float(), 0.0)
    if r_B_T.shape[-1] == 0:
        return r_B_T
    if step_mask is not None:
        # A reward needs a student token: a non-step position has none.
        mask_B_T = mask_B_T & step_mask.bool()
        r_B_T = torch.where(mask_B_T, r_B_T, 0.0)
    if step_mask is not None and gamma not in (0.0, 1.0):
        # Move each row's steps to its front, in order (stable sort), scan there, and scatter back; the
        # non-steps land in the tail with reward 0 and add nothing.
        steps_B_T = step_mask.bool()
        order_B_T = torch.argsort((~steps_B_T).to(torch.int8), dim=-1, stable=True)
        compact_B_T = _discounted_scan(r_B_T.gather(-1, order_B_T), gamma)
        returns_B_T = torch.empty_like(compact_B_T).scatter_(-1, order_B_T, compact_B_T)
    elif gamma == 0.0:
        returns_B_T = r_B_T
    elif gamma == 1.0:
        # Reverse cumulative sum: sum over t' >= t (distance does not matter).
        returns_B_T = r_B_T.flip(-1).cumsum(-1).flip(-1)
    else:
        returns_B_T = _discounted_scan(r_B_T, gamma)
    return torch.where(mask_B_T, returns_B_T, 0.0)


def masked_token_mean(per_token: Tensor, token_mask: Tensor) -> Tensor:
    """Sum over all unmasked tokens of the batch divided by their count (equation 8's 1 / sum_i |o_i|).

    (B, T) -> scalar. 0 (with zero gradient) when nothing is unmasked.
    """
    mask_B_T = token_mask.bool()
    total = torch.where(mask_B_T, per_token.float(), 0.0).sum()
    return total / mask_B_T.sum().clamp_min(1)


def add_sampled_token(
    support_ids_BTK: Tensor,  # (B, T, K) int, teacher top-K ids
    teacher_logprobs_BTK: Tensor,  # (B, T, K) teacher log q at those ids
    support_mask_BTK: Tensor,  # (B, T, K) bool
    sampled_ids_BT: Tensor,  # (B, T) int, the sampled token y_t
    sampled_teacher_logprobs_BT: Tensor,  # (B, T) teacher log q(y_t | c_t)
) -> tuple[Tensor, Tensor, Tensor]:  # ids (B, T, K+1), teacher logprobs (B, T, K+1), mask (B, T, K+1)
    """Support variant "teacher top-K plus the sampled token", deduplicated.

    Appends y_t as slot K. The extra slot is masked where y_t already sits in an unmasked slot of the
    support (so it is never counted twice); a copy of y_t in a masked slot (padding) does not count.
    Special-token masking applies afterwards like for any support (``special_token_mask``).
    """
    mask_BTK = support_mask_BTK.bool()
    sampled_BT1 = sampled_ids_BT.to(support_ids_BTK.dtype).unsqueeze(-1)
    already_in_BT = ((support_ids_BTK == sampled_BT1) & mask_BTK).any(dim=-1)
    ids_BTK1 = torch.cat([support_ids_BTK, sampled_BT1], dim=-1)
    teacher_BTK1 = torch.cat(
        [teacher_logprobs_BTK.float(), sampled_teacher_logprobs_BT.float().unsqueeze(-1)], dim=-1
    )
    mask_BTK1 = torch.cat([mask_BTK, (~already_in_BT).unsqueeze(-1)], dim=-1)
    return ids_BTK1, teacher_BTK1, mask_BTK1


def special_token_mask(
    sampled_ids_BT: Tensor,  # (B, T) int
    token_mask_BT: Tensor,  # (B, T) bool
    support_ids_BTK: Tensor,  # (B, T, K) int
    support_mask_BTK: Tensor,  # (B, T, K) bool
    masked_ids: Tensor,  # (M,) int64, ids to drop (by default those the two tokenizers disagree on); M may be 0
    positions: bool = True,
    support: bool = True,
) -> tuple[Tensor, Tensor]:  # token mask (B, T), support mask (B, T, K)
    """Special-token masking, in two independent parts.

    `positions`: drop the positions whose sampled token is in ``masked_ids`` from the loss.
    `support`: drop the masked ids from every support (their slots stop counting, the rest renormalise).
    """
    masked_ids = masked_ids.to(device=sampled_ids_BT.device, dtype=torch.int64)
    token_BT, support_BTK = token_mask_BT.bool(), support_mask_BTK.bool()
    if positions:
        token_BT = token_BT & ~torch.isin(sampled_ids_BT.long(), masked_ids)
    if support:
        support_BTK = support_BTK & ~torch.isin(support_ids_BTK.long(), masked_ids)
    return token_BT, support_BTK


def lsm_loss(
    student_support_logprobs_BTK: Tensor,  # (B, T, K) student log pi (or logits) at the support ids
    teacher_support_logprobs_BTK: Tensor,  # (B, T, K) teacher log q at the support ids
    support_mask_BTK: Tensor,  # (B, T, K) bool
    token_mask_BT: Tensor,  # (B, T) bool, completion positions that count
    renormalize: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Local support matching loss (equation 8): masked_token_mean of the per-position support KL.

    The denominator counts every unmasked token, including positions whose support ended up empty
    (they contribute 0), as in the paper's 1 / sum_i |o_i|.
    """
    kl_B_T = local_support_kl(
        student_support_logprobs_BTK, teacher_support_logprobs_BTK, support_mask_BTK, renormalize
    )
    loss = masked_token_mean(kl_B_T, token_mask_BT)
    return loss, {"loss/lsm": loss.item()}


def sampled_token_opd_loss(
    logprobs_BT: Tensor,  # (B, T) log pi_theta(y_t | c_t) under the policy being trained (has grad)
    old_logprobs_BT: Tensor,  # (B, T) log pi_old(y_t | c_t): the PPO old policy (rollout's or recomputed)
    teacher_logprobs_BT: Tensor,  # (B, T) log q(y_t | c_t)
    token_mask_BT: Tensor,  # (B, T) bool
    gamma: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    *,
    reward_mask_BT: Tensor | None = None,  # (B, T) bool, False where log q(y_t) is undefined: reward 0
    step_mask_BT: Tensor | None = None,  # (B, T) bool, the student's own steps (discounted_returns)
    behaviour_logprobs_BT: Tensor | None = None,  # (B, T) the rollout's log pi(y_t), for a metric only
) -> tuple[Tensor, dict[str, float]]:
    """Sampled-token OPD as a PPO-clipped policy gradient, with the gamma return-to-go estimator.

    r_t = log q(y_t) - log pi_old(y_t) (no gradient; 0 where `reward_mask_BT` is False, e.g. a sampled
    teacher-side alias id, to which the merged teacher gives no mass), A = discounted_returns(r, mask,
    gamma, step_mask), ratio_t = exp(log pi_theta(y_t) - log pi_old(y_t)), and per token
    -min(ratio_t A_t, clip(ratio_t, 1 - clip_low, 1 + clip_high) A_t), reduced with masked_token_mean.
    gamma = 0 is token-level OPD; gamma = 1 the causal sequence-level estimator.

    Metrics: ``opd/clip_frac`` is the fraction of unmasked tokens where the clipped term is the smaller one
    (ratio below 1 - clip_low with A < 0, or above 1 + clip_high with A > 0): there the token gets no
    gradient. ``opd/ratio_max_dev`` is max |ratio - 1|. With `behaviour_logprobs_BT` (the old policy was
    recomputed by the trainer), ``opd/clip_frac_rollout`` is the clip fraction the ratio to the rollout's
    log-probabilities would have had, and ``opd/old_rollout_gap`` the mean |log pi_old - log pi_rollout|.
    """
    mask_BT = token_mask_BT.bool()
    logprobs_BT = torch.where(mask_BT, logprobs_BT.float(), 0.0)
    old_BT = torch.where(mask_BT, old_logprobs_BT.float(), 0.0).detach()
    teacher_BT = torch.where(mask_BT, teacher_logprobs_BT.float(), 0.0).detach()

    rewards_BT = teacher_BT - old_BT
    if reward_mask_BT is not None:
        rewards_BT = torch.where(reward_mask_BT.bool(), rewards_BT, 0.0)
    advantages_BT = discounted_returns(rewards_BT, mask_BT, gamma, step_mask_BT)
    ratio_BT = (logprobs_BT - old_BT).exp()
    unclipped_BT = ratio_BT * advantages_BT
    clipped_BT = ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages_BT
    per_token_BT = -torch.minimum(unclipped_BT, clipped_BT)
    loss = masked_token_mean(per_token_BT, mask_BT)

    def clip_fraction(ratio: Tensor) -> float:
        bound = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages_BT < ratio * advantages_BT
        return masked_token_mean(bound.float(), mask_BT).item()

    ratio_dev_BT = torch.where(mask_BT, (ratio_BT.detach() - 1.0).abs(), 0.0)
    metrics = {
        "loss/sampled_token": loss.item(),
        "opd/clip_frac": clip_fraction(ratio_BT.detach()),
        "opd/reward_mean": masked_token_mean(rewards_BT, mask_BT).item(),
        "opd/advantage_mean": masked_token_mean(advantages_BT, mask_BT).item(),
        "opd/ratio_mean": masked_token_mean(ratio_BT.detach(), mask_BT).item(),
        "opd/ratio_max_dev": ratio_dev_BT.max().item() if ratio_dev_BT.numel() else 0.0,
    }
    if behaviour_logprobs_BT is not None:
        behaviour_BT = torch.where(mask_BT, behaviour_logprobs_BT.float(), 0.0)
        metrics["opd/clip_frac_rollout"] = clip_fraction((logprobs_BT.detach() - behaviour_BT).exp())
        metrics["opd/old_rollout_gap"] = masked_token_mean((old_BT - behaviour_BT).abs(), mask_BT).item()
    return loss, metrics


def full_reverse_kl(
    student_logits_BTV: Tensor,  # (B, T, V) student logits over the whole vocabulary
    teacher_logprobs_BTV: Tensor,  # (B, T, V) teacher full-vocabulary log-probabilities (finite)
    token_mask_BT: Tensor,  # (B, T) bool
) -> tuple[Tensor, dict[str, float]]:
    """Full-vocabulary reverse KL(pi || q) per position (equation 4), reduced with masked_token_mean.

    The reference objective; it needs the (B, T, V) matrices, which LSM avoids.
    """
    mask_BT1 = token_mask_BT.bool().unsqueeze(-1)
    log_p_BTV = torch.log_softmax(torch.where(mask_BT1, student_logits_BTV.float(), 0.0), dim=-1)
    log_q_BTV = torch.where(mask_BT1, teacher_logprobs_BTV.float(), 0.0)
    kl_BT = (log_p_BTV.exp() * (log_p_BTV - log_q_BTV)).sum(dim=-1)
    loss = masked_token_mean(kl_BT, token_mask_BT)
    return loss, {"loss/full_kl": loss.item()}


def support_mass(logprobs_BTK: Tensor, support_mask_BTK: Tensor) -> Tensor:
    """sum_{v in S_t} p(v | c_t) for full-vocabulary log-probabilities at the support ids, (B, T, K) -> (B, T).

    A diagnostic: how much of the teacher's (or student's) probability the support covers.
    """
    mask_BTK = support_mask_BTK.bool()
    return torch.where(mask_BTK, torch.where(mask_BTK, logprobs_BTK.float(), 0.0).exp(), 0.0).sum(dim=-1)
