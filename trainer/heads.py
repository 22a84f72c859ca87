"""Student log-probabilities from final hidden states without materialising the [T, V] logit matrix.

The LSM loss only needs the student's logits at the K support ids of each position (after renormalising
inside the support the full-vocabulary normaliser cancels), and the sampled-token objective only needs
log pi(y_t) = z_t[y_t] - logsumexp_v z_t[v]. Both are computed here straight from the final hidden states
h [N, d] and the LM-head weight W [V, d] (+ bias b [V]), chunked over positions, with custom autograd
functions whose backward is chunked too:

    support_logits     z[n, k] = h[n] . W[ids[n, k]] + b[ids[n, k]]      extra memory: forward O(chunk * (K + d)),
                                                                         backward O(chunk * K * d) + grad W
    chunked_logsumexp  lse[n]  = log sum_v exp(h[n] . W[v] + b[v])     extra memory O(chunk * V) + grad W
    token_logprobs     log pi(y_n) = z[n, y_n] - lse[n]
    chunked_entropy    H[n] = -sum_v p[n, v] log p[n, v]                 (no grad, a diagnostic)

Inputs may carry leading dims ([B, T, d] with ids [B, T, K]); they are flattened to N = B * T and the
result is reshaped back. Support logits come out in the input dtype; logsumexp, log-probabilities and
entropy are accumulated in at least float32 (float64 stays float64) because a bf16 logsumexp over a large
vocabulary loses the digits that a log-probability needs.

Gradients for the weight are returned from the backward, so a tied LM head (W shared with the input
embedding) accumulates both contributions through ordinary autograd. The weight must be a plain (local)
tensor: under FSDP2 gather it first (e.g. `lm_head.unshard()`), since these functions bypass the module's
forward hooks. On CUDA the weight gradient accumulates with atomics (index_add_), so it is not bitwise
deterministic run to run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn import functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype logsumexp accumulates in: float32 for half types, the input dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _check_head(hidden_Nd: Tensor, weight_Vd: Tensor, bias_V: Tensor | None, chunk_size: int) -> None:
    if hidden_Nd.dim() < 1 or weight_Vd.dim() != 2:
        raise ValueError(
            f"hidden must be [..., d] and weight [V, d]; got {tuple(hidden_Nd.shape)} and "
            f"{tuple(weight_Vd.shape)}"
        )
    if hidden_Nd.shape[-1] != weight_Vd.shape[1]:
        raise ValueError(f"hidden dim {hidden_Nd.shape[-1]} != weight dim {weight_Vd.shape[1]}")
    if hidden_Nd.dtype != weight_Vd.dtype:
        raise ValueError(f"hidden dtype {hidden_Nd.dtype} != weight dtype {weight_Vd.dtype}")
    if bias_V is not None and (bias_V.shape != weight_Vd.shape[:1] or bias_V.dtype != weight_Vd.dtype):
        raise ValueError(
            f"bias must be [{weight_Vd.shape[0]}] of dtype {weight_Vd.dtype}; got "
            f"{tuple(bias_V.shape)} {bias_V.dtype}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_ids(ids: Tensor, vocab_size: int, name: str) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    # One host sync per call; it turns a CUDA device-side assert into an error that names the problem.
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} must lie in [0, {vocab_size}); got range [{int(ids.min())}, {int(ids.max())}]"
        )


def _gathered_dots(hidden_cd: Tensor, weight_Vd: Tensor, ids_cK: Tensor) -> Tensor:
    """(c, K) dot products h[n] . W[ids[n, k]] without materialising the (c, K, d) gather W[ids].

    embedding_bag(ids, W, per_sample_weights=s) = sum_k s[n, k] W[ids[n, k]], so its gradient with respect
    to s for an upstream gradient h is exactly h[n] . W[ids[n, k]]; PyTorch computes that gradient with a
    fused per-sample dot-product kernel (CPU and CUDA) whose only buffers are (c, d) and (c, K). Measured
    here (CPU, T=4096, K=32, d=512) it is ~5x faster than bmm over W[ids] and needs no O(c * K * d) memory.
    """
    if torch.is_inference_mode_enabled():
        # inference mode cannot record the autograd graph used below; the plain gather gives the same values
        return torch.bmm(weight_Vd[ids_cK], hidden_cd[:, :, None]).squeeze(-1)
    with torch.enable_grad():
        scale_cK = torch.ones(
            ids_cK.shape, dtype=hidden_cd.dtype, device=hidden_cd.device, requires_grad=True
        )
        bag_cd = F.embedding_bag(ids_cK, weight_Vd.detach(), per_sample_weights=scale_cK, mode="sum")
        (dots_cK,) = torch.autograd.grad(bag_cd, scale_cK, grad_outputs=hidden_cd.detach())
    return dots_cK


class _SupportLogits(torch.autograd.Function):
    """z[n, k] = h[n] . W[ids[n, k]] (+ b[ids[n, k]]), chunked over n in forward and backward."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden_Nd: Tensor,
        weight_Vd: Tensor,
        ids_NK: Tensor,
        bias_V: Tensor | None,
        chunk_size: int,
    ) -> Tensor:
        N, K = ids_NK.shape
        logits_NK = hidden_Nd.new_empty(N, K)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            logits_NK[s:e] = _gathered_dots(hidden_Nd[s:e], weight_Vd, ids_NK[s:e])  # (c, K)
        if bias_V is not None:
            logits_NK += bias_V[ids_NK]
        ctx.save_for_backward(hidden_Nd, weight_Vd, ids_NK)
        ctx.chunk_size = chunk_size
        ctx.has_bias = bias_V is not None
        return logits_NK

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_NK: Tensor):
        hidden_Nd, weight_Vd, ids_NK = ctx.saved_tensors
        need_h, need_w, _, need_b, _ = ctx.needs_input_grad
        N, d = hidden_Nd.shape
        grad_NK = grad_NK.to(hidden_Nd.dtype)
        grad_h = torch.empty_like(hidden_Nd) if need_h else None
        grad_w = torch.zeros_like(weight_Vd) if need_w else None
        for s in range(0, N, ctx.chunk_size):
            e = min(s + ctx.chunk_size, N)
            ids_cK, g_cK = ids_NK[s:e], grad_NK[s:e]
            if grad_h is not None:
                # dz/dh[n] = sum_k g[n, k] W[ids[n, k]]: a weighted embedding bag, no (c, K, d) gather
                grad_h[s:e] = F.embedding_bag(ids_cK, weight_Vd, per_sample_weights=g_cK, mode="sum")
            if grad_w is not None:
                # dz/dW[v] = sum over (n, k) with ids[n, k] == v of g[n, k] h[n]; index_add_ sums repeats.
                # The (c, K, d) product is the backward's only O(chunk * K * d) buffer.
                gh_cKd = g_cK[:, :, None] * hidden_Nd[s:e, None, :]
                grad_w.index_add_(0, ids_cK.reshape(-1), gh_cKd.reshape(-1, d))
        grad_b = None
        if need_b and ctx.has_bias:
            grad_b = weight_Vd.new_zeros(weight_Vd.shape[0]).index_add_(
                0, ids_NK.reshape(-1), grad_NK.reshape(-1)
            )
        return grad_h, grad_w, None, grad_b, None


def _chunk_logits(hidden_cd: Tensor, weight_Vd: Tensor, bias_V: Tensor | None) -> Tensor:
    """(c, V) logits in the input dtype, then cast to the accumulation dtype."""
    if bias_V is None:
        z_cV = hidden_cd @ weight_Vd.T
    else:
        z_cV = torch.addmm(bias_V, hidden_cd, weight_Vd.T)
    return z_cV.to(_acc_dtype(z_cV.dtype))


class _ChunkedLogSumExp(torch.autograd.Function):
    """lse[n] = logsumexp_v (h[n] . W[v] + b[v]); saves only lse and recomputes the softmax in backward."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, hidden_Nd: Tensor, weight_Vd: Tensor, bias_V: Tensor | None, chunk_size: int
    ) -> Tensor:
        N = hidden_Nd.shape[0]
        lse_N = hidden_Nd.new_empty(N, dtype=_acc_dtype(hidden_Nd.dtype))
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            lse_N[s:e] = torch.logsumexp(_chunk_logits(hidden_Nd[s:e], weight_Vd, bias_V), dim=-1)
        ctx.save_for_backward(hidden_Nd, weight_Vd, bias_V, lse_N)
        ctx.chunk_size = chunk_size
        return lse_N

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_N: Tensor):
        hidden_Nd, weight_Vd, bias_V, lse_N = ctx.saved_tensors
        need_h, need_w, need_b, _ = ctx.needs_input_grad
        N, dtype = hidden_Nd.shape[0], hidden_Nd.dtype
        grad_N = grad_N.to(lse_N.dtype)
        grad_h = torch.empty_like(hidden_Nd) if need_h else None
        grad_w = torch.zeros_like(weight_Vd) if need_w else None
        grad_b = torch.zeros_like(bias_V) if need_b else None
        for s in range(0, N, ctx.chunk_size):
            e = min(s + ctx.chunk_size, N)
            # d lse / d z = softmax(z); scaled by the upstream grad, in place on the recomputed logits
            gp_cV = _chunk_logits(hidden_Nd[s:e], weight_Vd, bias_V)
            gp_cV.sub_(lse_N[s:e, None]).exp_().mul_(grad_N[s:e, None])
            gp_in = gp_cV.to(dtype)
            if grad_h is not None:
                grad_h[s:e] = gp_in @ weight_Vd  # (c, d)
            if grad_w is not None:
                grad_w.addmm_(gp_in.T, hidden_Nd[s:e])  # (V, d)
            if grad_b is not None:
                grad_b += gp_cV.sum(0).to(dtype)
        return grad_h, grad_w, grad_b, None


def support_logits(
    hidden_Nd: Tensor,
    weight_Vd: Tensor,
    support_ids_NK: Tensor,
    chunk_size: int = 1024,
    bias_V: Tensor | None = None,
) -> Tensor:
    """Student logits at the support ids: z[..., k] = h[...] . W[ids[..., k]] (+ b[ids[..., k]]).

    hidden [..., d], weight [V, d], support_ids [..., K] (int, any valid id; padding slots may hold any
    valid id and are masked by the caller; ids may repeat within and across rows) -> [..., K] in the
    input dtype. These are log pi up to a per-row shift, which is all a renormalised support loss needs.
    """
    _check_head(hidden_Nd, weight_Vd, bias_V, chunk_size)
    lead = hidden_Nd.shape[:-1]
    if support_ids_NK.dim() < 1 or support_ids_NK.shape[:-1] != lead:
        raise ValueError(f"support_ids must be {tuple(lead)} + (K,), got {tuple(support_ids_NK.shape)}")
    _check_ids(support_ids_NK, weight_Vd.shape[0], "support_ids")
    K = support_ids_NK.shape[-1]
    h_Nd = hidden_Nd.reshape(-1, hidden_Nd.shape[-1])
    ids_NK = support_ids_NK.reshape(-1, K).long()
    z_NK = _SupportLogits.apply(h_Nd, weight_Vd, ids_NK, bias_V, chunk_size)
    return z_NK.reshape(*lead, K)


def chunked_logsumexp(
    hidden_Nd: Tensor, weight_Vd: Tensor, chunk_size: int = 1024, bias_V: Tensor | None = None
) -> Tensor:
    """log sum_v exp(h . W[v] + b[v]) for hidden [..., d] -> [...], in float32 (float64 for float64 input).

    Forward holds one (chunk, V) logit block at a time and saves only the result; backward recomputes
    the softmax per chunk.
    """
    _check_head(hidden_Nd, weight_Vd, bias_V, chunk_size)
    lead = hidden_Nd.shape[:-1]
    lse_N = _ChunkedLogSumExp.apply(hidden_Nd.reshape(-1, hidden_Nd.shape[-1]), weight_Vd, bias_V, chunk_size)
    return lse_N.reshape(lead)


def token_logprobs(
    hidden_Nd: Tensor,
    weight_Vd: Tensor,
    token_ids_N: Tensor,
    chunk_size: int = 1024,
    bias_V: Tensor | None = None,
) -> Tensor:
    """log pi(y) = z[y] - logsumexp(z) for hidden [..., d] and token ids [...] -> [...] (float32 or wider)."""
    z_N = support_logits(hidden_Nd, weight_Vd, token_ids_N[..., None], chunk_size, bias_V)[..., 0]
    return z_N - chunked_logsumexp(hidden_Nd, weight_Vd, chunk_size, bias_V)


@torch.no_grad()
def chunked_entropy(
    hidden_Nd: Tensor, weight_Vd: Tensor, chunk_size: int = 1024, bias_V: Tensor | None = None
) -> Tensor:
    """Entropy of the full next-token distribution, hidden [..., d] -> [...]; no grad (a diagnostic)."""
    _check_head(hidden_Nd, weight_Vd, bias_V, chunk_size)
    lead = hidden_Nd.shape[:-1]
    h_Nd = hidden_Nd.reshape(-1, hidden_Nd.shape[-1])
    N = h_Nd.shape[0]
    ent_N = h_Nd.new_empty(N, dtype=_acc_dtype(h_Nd.dtype))
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        logp_cV = torch.log_softmax(_chunk_logits(h_Nd[s:e], weight_Vd, bias_V), dim=-1)
        ent_N[s:e] = -(logp_cV.exp() * logp_cV).sum(-1)
    return ent_N.reshape(lead)


def lm_head_of(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [V, d], bias [V] or None) of a Hugging Face causal LM's output projection.

    Refuses models whose logits are not plain `lm_head(hidden)` (soft-capping, logit scaling), since
    the functions above would silently compute a different distribution for them.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"expected an nn.Linear output embedding, got {type(head).__name__}")
    cfg = model.config.to_dict()
    for key in ("final_logit_softcapping", "logit_scale"):
        if cfg.get(key) not in (None, 1.0):
            raise NotImplementedError(f"model config sets {key}={cfg[key]}: logits are not lm_head(hidden)")
    return head.weight, head.bias


def final_hidden(model: nn.Module, input_ids_BT: Tensor, attention_mask_BT: Tensor | None = None) -> Tensor:
    """The decoder's final (post-norm) hidden states [B, T, d], the input of lm_head; no [B, T, V] logits."""
    out = model.get_decoder()(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False)
    return out.last_hidden_state
