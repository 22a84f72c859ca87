"""Student log-probabilities from final hidden states without materialising the [T, V] logit matrix.

The LSM loss only needs the student's logits at the K support ids of each position (after renormalising
inside the support the full-vocabulary normaliser cancels), and the sampled-token objective only needs
log pi(y_t) = z_t[y_t] - logsumexp_v z_t[v]. Both are computed here straight from the final hidden states
h [N, D] and the LM-head weight W [V, D] (+ bias b [V]), chunked over positions, with custom autograd
functions whose backward is chunked too:

    support_logits     z[n, k] = h[n] . W[ids[n, k]] + b[ids[n, k]]      extra memory: forward O(chunk * (K + D)),
                                                                         backward O(chunk * K * D) + grad W
    chunked_logsumexp  lse[n]  = log sum_v exp(h[n] . W[v] + b[v])     extra memory O(chunk * V) + grad W
    token_logprobs     log pi(y_n) = z[n, y_n] - lse[n]                 extra memory O(chunk * V) + grad W
                       (one fused function, so the two terms' gradients meet before any rounding)
    chunked_entropy    H[n] = -sum_v p[n, v] log p[n, v]                 (no grad, a diagnostic)

Inputs may carry leading dims ([B, T, D] with ids [B, T, K]); they are flattened to N = B * T and the
result is reshaped back. Shape suffixes follow trainer/losses.py; c is the rows of one chunk (a slice of N). Support logits come out in the input dtype; logsumexp, log-probabilities and
entropy are accumulated in at least float32 (float64 stays float64) because a bf16 logsumexp over a large
vocabulary loses the digits that a log-probability needs.

Gradients for the weight are returned from the backward, so a tied LM head (W shared with the input
embedding) accumulates both contributions through ordinary autograd. The weight must be a plain (local)
tensor, since these functions bypass the head module's forward hooks: under FSDP2 they run inside the root
module's forward, where the root's parameters (embeddings, LM head) are gathered (trainer/parallel.py). On CUDA the weight gradient accumulates with atomics (index_add_), so it is not bitwise
deterministic run to run.

The weight and bias gradients are sums over all N positions, built chunk by chunk. They accumulate in at
least float32 (float64 stays float64) and are cast to the parameter dtype once at the end. Added chunk by
chunk in bf16 instead, every addition would round to 8 significant bits, so the error would grow with the
chunk count (like the square root of the count for independent roundings, faster once the running sum
dwarfs each chunk's share). Each chunk's matmul still runs in the input dtype (a bf16 matmul accumulates in
fp32 internally and rounds once) and its result is added into the accumulator. Memory: the accumulator is
V * D * 4 bytes (2.2 GB for V = 152K, D = 3584: twice the bf16 gradient it becomes), plus, for
half-precision inputs, one V * D matmul result per chunk in the input dtype in the full-logit backwards
(chunked_logsumexp, token_logprobs); float32 and float64 inputs accumulate in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class _Ctx(Protocol):
    """What the autograd functions below use of their ctx (torch types it FunctionCtx, which has neither
    the C-side saved_tensors/needs_input_grad nor our chunk_size/has_bias)."""

    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]
    chunk_size: int
    has_bias: bool

    def save_for_backward(self, *tensors: Tensor) -> None: ...


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype logsumexp accumulates in: float32 for half types, the input dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _check_head(hidden_N_D: Tensor, weight_V_D: Tensor, bias_V: Tensor | None, chunk_size: int) -> None:
    if hidden_N_D.dim() < 1 or weight_V_D.dim() != 2:
        raise ValueError(
            f"hidden must be [..., d] and weight [V, d]; got {tuple(hidden_N_D.shape)} and "
            f"{tuple(weight_V_D.shape)}"
        )
    if hidden_N_D.shape[-1] != weight_V_D.shape[1]:
        raise ValueError(f"hidden dim {hidden_N_D.shape[-1]} != weight dim {weight_V_D.shape[1]}")
    if hidden_N_D.dtype != weight_V_D.dtype:
        raise ValueError(f"hidden dtype {hidden_N_D.dtype} != weight dtype {weight_V_D.dtype}")
    if bias_V is not None and (bias_V.shape != weight_V_D.shape[:1] or bias_V.dtype != weight_V_D.dtype):
        raise ValueError(
            f"bias must be [{weight_V_D.shape[0]}] of dtype {weight_V_D.dtype}; got "
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


def _gathered_dots(hidden_c_D: Tensor, weight_V_D: Tensor, ids_c_K: Tensor) -> Tensor:
    """(c, K) dot products h[n] . W[ids[n, k]] without materialising the (c, K, D) gather W[ids].

    embedding_bag(ids, W, per_sample_weights=s) = sum_k s[n, k] W[ids[n, k]], so its gradient with respect
    to s for an upstream gradient h is exactly h[n] . W[ids[n, k]]; PyTorch computes that gradient with a
    fused per-sample dot-product kernel (CPU and CUDA) whose only buffers are (c, D) and (c, K). Measured
    here (CPU, T=4096, K=32, D=512) it is ~5x faster than bmm over W[ids] and needs no O(c * K * D) memory.
    """
    if torch.is_inference_mode_enabled():
        # inference mode cannot record the autograd graph used below; the plain gather gives the same values
        return torch.bmm(weight_V_D[ids_c_K], hidden_c_D[:, :, None]).squeeze(-1)
    with torch.enable_grad():
        scale_c_K = torch.ones(
            ids_c_K.shape, dtype=hidden_c_D.dtype, device=hidden_c_D.device, requires_grad=True
        )
        bag_c_D = F.embedding_bag(ids_c_K, weight_V_D.detach(), per_sample_weights=scale_c_K, mode="sum")
        (dots_c_K,) = torch.autograd.grad(bag_c_D, scale_c_K, grad_outputs=hidden_c_D.detach())
    return dots_c_K


class _SupportLogits(torch.autograd.Function):
    """z[n, k] = h[n] . W[ids[n, k]] (+ b[ids[n, k]]), chunked over n in forward and backward."""

    @staticmethod
    def forward(
        ctx: _Ctx,
        hidden_N_D: Tensor,
        weight_V_D: Tensor,
        ids_N_K: Tensor,
        bias_V: Tensor | None,
        chunk_size: int,
    ) -> Tensor:
        N, K = ids_N_K.shape
        logits_N_K = hidden_N_D.new_empty(N, K)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            logits_N_K[s:e] = _gathered_dots(hidden_N_D[s:e], weight_V_D, ids_N_K[s:e])  # (c, K)
        if bias_V is not None:
            logits_N_K += bias_V[ids_N_K]
        ctx.save_for_backward(hidden_N_D, weight_V_D, ids_N_K)
        ctx.chunk_size = chunk_size
        ctx.has_bias = bias_V is not None
        return logits_N_K

    @staticmethod
    @once_differentiable
    def backward(
        ctx: _Ctx, grad_N_K: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, Tensor | None, None]:
        hidden_N_D, weight_V_D, ids_N_K = ctx.saved_tensors
        need_h, need_w, _, need_b, _ = ctx.needs_input_grad
        N, D = hidden_N_D.shape
        acc = _acc_dtype(weight_V_D.dtype)
        grad_N_K = grad_N_K.to(hidden_N_D.dtype)
        grad_hidden_N_D = torch.empty_like(hidden_N_D) if need_h else None
        grad_weight_V_D = torch.zeros_like(weight_V_D, dtype=acc) if need_w else None
        for s in range(0, N, ctx.chunk_size):
            e = min(s + ctx.chunk_size, N)
            ids_c_K, grad_c_K = ids_N_K[s:e], grad_N_K[s:e]
            if grad_hidden_N_D is not None:
                # dz/dh[n] = sum_k g[n, k] W[ids[n, k]]: a weighted embedding bag, no (c, K, D) gather
                grad_hidden_N_D[s:e] = F.embedding_bag(
                    ids_c_K, weight_V_D, per_sample_weights=grad_c_K, mode="sum"
                )
            if grad_weight_V_D is not None:
                # dz/dW[v] = sum over (n, k) with ids[n, k] == v of g[n, k] h[n]; index_add_ sums repeats in
                # the accumulation dtype. The product of two bf16 values is exact in fp32, so the only
                # roundings are the fp32 additions. The (c, K, D) product is the backward's only
                # O(chunk * K * D) buffer.
                gh_c_K_D = grad_c_K.to(acc)[:, :, None] * hidden_N_D[s:e, None, :].to(acc)
                grad_weight_V_D.index_add_(0, ids_c_K.reshape(-1), gh_c_K_D.reshape(-1, D))
        grad_bias_V = None
        if need_b and ctx.has_bias:
            grad_bias_V = (
                weight_V_D.new_zeros(weight_V_D.shape[0], dtype=acc)
                .index_add_(0, ids_N_K.reshape(-1), grad_N_K.reshape(-1).to(acc))
                .to(weight_V_D.dtype)
            )
        if grad_weight_V_D is not None:
            grad_weight_V_D = grad_weight_V_D.to(weight_V_D.dtype)
        return grad_hidden_N_D, grad_weight_V_D, None, grad_bias_V, None


def _add_matmul(acc_V_D: Tensor, a_V_c: Tensor, b_c_D: Tensor) -> None:
    """acc += a @ b, with the matmul in the inputs' dtype and the sum in the accumulator's.

    A half-precision matmul accumulates in fp32 internally and rounds its result once; adding that result
    into an fp32 accumulator keeps the chunks' sum from rounding at every chunk. When the dtypes agree the
    addition is fused (addmm_), with no (V, D) temporary.
    """
    if acc_V_D.dtype == a_V_c.dtype:
        acc_V_D.addmm_(a_V_c, b_c_D)
    else:
        acc_V_D += a_V_c @ b_c_D


def _chunk_logits(hidden_c_D: Tensor, weight_V_D: Tensor, bias_V: Tensor | None) -> Tensor:
    """(c, V) logits in the input dtype, then cast to the accumulation dtype."""
    if bias_V is None:
        z_c_V = hidden_c_D @ weight_V_D.T
    else:
        z_c_V = torch.addmm(bias_V, hidden_c_D, weight_V_D.T)
    return z_c_V.to(_acc_dtype(z_c_V.dtype))


def _full_logit_backward(
    hidden_N_D: Tensor,
    weight_V_D: Tensor,
    bias_V: Tensor | None,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
    logit_grad: Callable[[int, int, Tensor], Tensor],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients w.r.t. (h, W, b), where `needs` says which are wanted, of a per-position function of the full
    logits z = h W^T + b, recomputing z one (c, V) chunk at a time.

    `logit_grad(s, e, z_c_V)` turns the recomputed logits of rows [s, e) (accumulation dtype; the caller may
    overwrite them) into dL/dz for those rows. dL/dz is cast to the input dtype for the chunk's two matmuls;
    W and b accumulate over chunks in the accumulation dtype and are cast once at the end (module docstring).
    """
    need_h, need_w, need_b = needs
    N, dtype, acc = hidden_N_D.shape[0], hidden_N_D.dtype, _acc_dtype(hidden_N_D.dtype)
    grad_hidden_N_D = torch.empty_like(hidden_N_D) if need_h else None
    grad_weight_V_D = torch.zeros_like(weight_V_D, dtype=acc) if need_w else None
    grad_bias_V = torch.zeros_like(bias_V, dtype=acc) if need_b and bias_V is not None else None
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        gz_c_V = logit_grad(s, e, _chunk_logits(hidden_N_D[s:e], weight_V_D, bias_V))
        gz_in_c_V = gz_c_V.to(dtype)
        if grad_hidden_N_D is not None:
            grad_hidden_N_D[s:e] = gz_in_c_V @ weight_V_D  # (c, D)
        if grad_weight_V_D is not None:
            _add_matmul(grad_weight_V_D, gz_in_c_V.T, hidden_N_D[s:e])  # (V, D)
        if grad_bias_V is not None:
            grad_bias_V += gz_c_V.sum(0)
    return (
        grad_hidden_N_D,
        None if grad_weight_V_D is None else grad_weight_V_D.to(dtype),
        None if grad_bias_V is None else grad_bias_V.to(dtype),
    )


class _ChunkedLogSumExp(torch.autograd.Function):
    """lse[n] = logsumexp_v (h[n] . W[v] + b[v]); saves only lse and recomputes the softmax in backward."""

    @staticmethod
    def forward(
        ctx: _Ctx, hidden_N_D: Tensor, weight_V_D: Tensor, bias_V: Tensor | None, chunk_size: int
    ) -> Tensor:
        N = hidden_N_D.shape[0]
        lse_N = hidden_N_D.new_empty(N, dtype=_acc_dtype(hidden_N_D.dtype))
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            lse_N[s:e] = torch.logsumexp(_chunk_logits(hidden_N_D[s:e], weight_V_D, bias_V), dim=-1)
        ctx.save_for_backward(hidden_N_D, weight_V_D, lse_N, *(() if bias_V is None else (bias_V,)))
        ctx.chunk_size = chunk_size
        return lse_N

    @staticmethod
    @once_differentiable
    def backward(ctx: _Ctx, grad_N: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        hidden_N_D, weight_V_D, lse_N, *bias = ctx.saved_tensors
        need_h, need_w, need_b, _ = ctx.needs_input_grad
        g_N = grad_N.to(lse_N.dtype)

        def softmax_grad(s: int, e: int, z_c_V: Tensor) -> Tensor:
            # d lse / d z = softmax(z), scaled by the upstream grad, in place on the recomputed logits
            return z_c_V.sub_(lse_N[s:e, None]).exp_().mul_(g_N[s:e, None])

        grads = _full_logit_backward(
            hidden_N_D,
            weight_V_D,
            bias[0] if bias else None,
            ctx.chunk_size,
            (need_h, need_w, need_b),
            softmax_grad,
        )
        return (*grads, None)


class _TokenLogProbs(torch.autograd.Function):
    """log pi(y[n]) = z[n, y[n]] - logsumexp_v z[n, v], z = h W^T + b: one (c, V) logit block per chunk in
    forward and in backward, saving only the logsumexp.

    One function rather than support_logits(y) - chunked_logsumexp because in half precision the two terms'
    weight gradients nearly cancel (h[n] at the sampled id against the softmax-weighted h[n] at every id):
    as two autograd outputs each would be rounded to the parameter dtype before their sum, while here the
    logit gradient g[n] (onehot(y[n]) - softmax(z[n])) is formed in fp32 and goes through one matmul.
    """

    @staticmethod
    def forward(
        ctx: _Ctx,
        hidden_N_D: Tensor,
        weight_V_D: Tensor,
        ids_N: Tensor,
        bias_V: Tensor | None,
        chunk_size: int,
    ) -> Tensor:
        N = hidden_N_D.shape[0]
        lse_N = hidden_N_D.new_empty(N, dtype=_acc_dtype(hidden_N_D.dtype))
        logprobs_N = torch.empty_like(lse_N)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            z_c_V = _chunk_logits(hidden_N_D[s:e], weight_V_D, bias_V)
            lse_N[s:e] = torch.logsumexp(z_c_V, dim=-1)
            logprobs_N[s:e] = z_c_V.gather(1, ids_N[s:e, None])[:, 0] - lse_N[s:e]
        ctx.save_for_backward(hidden_N_D, weight_V_D, ids_N, lse_N, *(() if bias_V is None else (bias_V,)))
        ctx.chunk_size = chunk_size
        return logprobs_N

    @staticmethod
    @once_differentiable
    def backward(ctx: _Ctx, grad_N: Tensor) -> tuple[Tensor | None, Tensor | None, None, Tensor | None, None]:
        hidden_N_D, weight_V_D, ids_N, lse_N, *bias = ctx.saved_tensors
        need_h, need_w, _, need_b, _ = ctx.needs_input_grad
        g_N = grad_N.to(lse_N.dtype)

        def logprob_grad(s: int, e: int, z_c_V: Tensor) -> Tensor:
            # d log pi(y) / d z = onehot(y) - softmax(z), scaled by the upstream grad
            gz_c_V = z_c_V.sub_(lse_N[s:e, None]).exp_().mul_(-g_N[s:e, None])
            return gz_c_V.scatter_add_(1, ids_N[s:e, None], g_N[s:e, None])

        gh, gw, gb = _full_logit_backward(
            hidden_N_D,
            weight_V_D,
            bias[0] if bias else None,
            ctx.chunk_size,
            (need_h, need_w, need_b),
            logprob_grad,
        )
        return gh, gw, None, gb, None


def support_logits(
    hidden_Nd: Tensor,
    weight_Vd: Tensor,
    support_ids_NK: Tensor,
    chunk_size: int = 1024,
    bias_V: Tensor | None = None,
) -> Tensor:
    """Student logits at the support ids: z[..., k] = h[...] . W[ids[..., k]] (+ b[ids[..., k]]).

    hidden [..., D], weight [V, D], support_ids [..., K] (int, any valid id; padding slots may hold any
    valid id and are masked by the caller; ids may repeat within and across rows) -> [..., K] in the
    input dtype. These are log pi up to a per-row shift, which is all a renormalised support loss needs.
    """
    _check_head(hidden_Nd, weight_Vd, bias_V, chunk_size)
    lead = hidden_Nd.shape[:-1]
    if support_ids_NK.dim() < 1 or support_ids_NK.shape[:-1] != lead:
        raise ValueError(f"support_ids must be {tuple(lead)} + (K,), got {tuple(support_ids_NK.shape)}")
    _check_ids(support_ids_NK, weight_Vd.shape[0], "support_ids")
    K = support_ids_NK.shape[-1]
    hidden_N_D = hidden_Nd.reshape(-1, hidden_Nd.shape[-1])
    ids_N_K = support_ids_NK.reshape(-1, K).long()
    z_N_K = _SupportLogits.apply(hidden_N_D, weight_Vd, ids_N_K, bias_V, chunk_size)
    return z_N_K.reshape(*lead, K)


def chunked_logsumexp(
    hidden_Nd: Tensor, weight_Vd: Tensor, chunk_size: int = 1024, bias_V: Tensor | None = None
) -> Tensor:
    """log sum_v exp(h . W[v] + b[v]) for hidden [..., D] -> [...], in float32 (float64 for float64 input).

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
    """log pi(y) = z[y] - logsumexp(z) for hidden [..., D] and token ids [...] -> [...] (float32 or wider).

    z[y] comes from the same (chunk, V) logit block as the logsumexp, so log pi(y) <= 0 up to rounding.
    """
    _check_head(hidden_Nd, weight_Vd, bias_V, chunk_size)
    lead = hidden_Nd.shape[:-1]
    if token_ids_N.shape != lead:
        raise ValueError(f"token_ids must be {tuple(lead)}, got {tuple(token_ids_N.shape)}")
    _check_ids(token_ids_N, weight_Vd.shape[0], "token_ids")
    hidden_N_D = hidden_Nd.reshape(-1, hidden_Nd.shape[-1])
    lp_N = _TokenLogProbs.apply(hidden_N_D, weight_Vd, token_ids_N.reshape(-1).long(), bias_V, chunk_size)
    return lp_N.reshape(lead)


@torch.no_grad()
def chunked_entropy(
    hidden_Nd: Tensor, weight_Vd: Tensor, chunk_size: int = 1024, bias_V: Tensor | None = None
) -> Tensor:
    """Entropy of the full next-token distribution, hidden [..., D] -> [...]; no grad (a diagnostic)."""
    _check_head(hidden_Nd, weight_Vd, bias_V, chunk_size)
    lead = hidden_Nd.shape[:-1]
    hidden_N_D = hidden_Nd.reshape(-1, hidden_Nd.shape[-1])
    N = hidden_N_D.shape[0]
    ent_N = hidden_N_D.new_empty(N, dtype=_acc_dtype(hidden_N_D.dtype))
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        logp_c_V = torch.log_softmax(_chunk_logits(hidden_N_D[s:e], weight_Vd, bias_V), dim=-1)
        ent_N[s:e] = -(logp_c_V.exp() * logp_c_V).sum(-1)
    return ent_N.reshape(lead)


def lm_head_of(model: PreTrainedModel) -> tuple[Tensor, Tensor | None]:
    """(weight [V, D], bias [V] or None) of a Hugging Face causal LM's output projection.

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


def final_hidden(
    model: PreTrainedModel,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor | None = None,
    position_ids_BT: Tensor | None = None,
) -> Tensor:
    """The decoder's final (post-norm) hidden states [B, T, D], the input of lm_head; no [B, T, V] logits.

    `position_ids_BT` restarting at 0 with `attention_mask_BT=None` is the padding-free packed format:
    several sequences in one row, each attending only to itself (trainer/data.py, `collate(pack=True)`).
    """
    out = model.get_decoder()(
        input_ids=input_ids_BT,
        attention_mask=attention_mask_BT,
        position_ids=position_ids_BT,
        use_cache=False,
    )
    return out.last_hidden_state
