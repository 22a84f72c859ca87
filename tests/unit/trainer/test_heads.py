"""trainer.heads against the naive full-logit path written from the definition (float64, tight tolerances)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from experiments.tiny_models import tiny_llama_config
from trainer.heads import (
    _ChunkedLogSumExp,
    _SupportLogits,
    _TokenLogProbs,
    chunked_entropy,
    chunked_logsumexp,
    final_hidden,
    lm_head_of,
    support_logits,
    token_logprobs,
)
from trainer.losses import full_reverse_kl, local_support_kl

F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-10, atol=1e-10)

# (N, V, d, K, chunk): chunk not dividing N, chunk > N, chunk == 1, K == 1, K == V, N == 1
CASES = [
    (13, 17, 5, 4, 5),
    (7, 11, 3, 1, 64),
    (9, 6, 4, 6, 1),
    (1, 23, 8, 3, 4),
    (32, 50, 16, 8, 8),
]


def _inputs(N, V, d, K, seed, bias, repeat_ids=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, **F64).requires_grad_()
    w = torch.randn(V, d, generator=g, **F64).requires_grad_()
    b = torch.randn(V, generator=g, **F64).requires_grad_() if bias else None
    if repeat_ids:  # few distinct ids: repeats inside rows and across rows
        ids = torch.randint(0, min(V, 3), (N, K), generator=g)
    else:  # distinct within a row, overlapping across rows
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    return h, w, b, ids


def _naive_logits(h, w, b):
    z = h @ w.T  # (N, V)
    return z if b is None else z + b


def _grads(out, params, seed):
    """Gradients of a random linear functional of `out` (exercises every output element's grad)."""
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=out.dtype)
    live = [p for p in params if p is not None]
    return torch.autograd.grad((out * upstream).sum(), live)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("repeat_ids", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_support_logits_matches_gather(case, bias, repeat_ids):
    N, V, d, K, chunk = case
    h, w, b, ids = _inputs(N, V, d, K, seed=N * V + K, bias=bias, repeat_ids=repeat_ids)
    got = support_logits(h, w, ids, chunk_size=chunk, bias_V=b)
    want = _naive_logits(h, w, b).gather(1, ids)
    assert got.shape == (N, K) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, **TOL)
    for gg, gw in zip(_grads(got, (h, w, b), 0), _grads(want, (h, w, b), 0), strict=True):
        torch.testing.assert_close(gg, gw, **TOL)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_logsumexp_token_logprobs_entropy_match_log_softmax(case, bias):
    N, V, d, _, chunk = case
    h, w, b, _ = _inputs(N, V, d, 1, seed=N + V, bias=bias)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(N))
    logp = torch.log_softmax(_naive_logits(h, w, b), dim=-1)  # (N, V)

    lse = chunked_logsumexp(h, w, chunk_size=chunk, bias_V=b)
    want_lse = torch.logsumexp(_naive_logits(h, w, b), dim=-1)
    torch.testing.assert_close(lse, want_lse, **TOL)
    for gg, gw in zip(_grads(lse, (h, w, b), 1), _grads(want_lse, (h, w, b), 1), strict=True):
        torch.testing.assert_close(gg, gw, **TOL)

    lp = token_logprobs(h, w, y, chunk_size=chunk, bias_V=b)
    want_lp = logp.gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(lp, want_lp, **TOL)
    for gg, gw in zip(_grads(lp, (h, w, b), 2), _grads(want_lp, (h, w, b), 2), strict=True):
        torch.testing.assert_close(gg, gw, **TOL)

    ent = chunked_entropy(h, w, chunk_size=chunk, bias_V=b)
    assert not ent.requires_grad
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1).detach(), **TOL)


def test_leading_dims_are_flattened_and_restored():
    B, T, V, d, K = 2, 5, 19, 6, 3
    h, w, b, ids = _inputs(B * T, V, d, K, seed=3, bias=True)
    h_BTd, ids_BTK = h.detach().reshape(B, T, d).requires_grad_(), ids.reshape(B, T, K)
    z = support_logits(h_BTd, w, ids_BTK, chunk_size=4, bias_V=b)
    assert z.shape == (B, T, K)
    torch.testing.assert_close(z, _naive_logits(h_BTd, w, b).gather(-1, ids_BTK), **TOL)
    assert token_logprobs(h_BTd, w, ids_BTK[..., 0], chunk_size=3, bias_V=b).shape == (B, T)
    assert chunked_logsumexp(h_BTd, w, chunk_size=3).shape == (B, T)
    assert chunked_entropy(h_BTd, w, chunk_size=3).shape == (B, T)
    # z.sum() hands the backward an expanded (stride 0) gradient
    (gh,) = torch.autograd.grad(z.sum(), h_BTd)
    (want_gh,) = torch.autograd.grad(_naive_logits(h_BTd, w, b).gather(-1, ids_BTK).sum(), h_BTd)
    assert gh.shape == (B, T, d)
    torch.testing.assert_close(gh, want_gh, **TOL)


def test_no_grad_inference_mode_and_frozen_weight():
    h, w, b, ids = _inputs(9, 13, 4, 5, seed=21, bias=True, repeat_ids=True)
    want = _naive_logits(h, w, b).gather(1, ids).detach()
    with torch.no_grad():
        torch.testing.assert_close(support_logits(h, w, ids, 4, b), want, **TOL)
    with torch.inference_mode():
        torch.testing.assert_close(support_logits(h, w, ids, 4, b), want, **TOL)
    # frozen head: only the hidden states get a gradient, and it still matches
    w_frozen = w.detach()
    z = support_logits(h, w_frozen, ids.int(), 4)  # int32 ids are accepted too
    want_z = (h @ w_frozen.T).gather(1, ids)
    torch.testing.assert_close(_grads(z, (h,), 7)[0], _grads(want_z, (h,), 7)[0], **TOL)


def test_gradcheck_support_logits():
    h, w, b, ids = _inputs(5, 7, 3, 4, seed=11, bias=True, repeat_ids=True)
    assert torch.autograd.gradcheck(lambda h, w, b: _SupportLogits.apply(h, w, ids, b, 2), (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w: _SupportLogits.apply(h, w, ids, None, 3), (h, w))


def test_gradcheck_logsumexp():
    h, w, b, _ = _inputs(5, 7, 3, 1, seed=12, bias=True)
    assert torch.autograd.gradcheck(lambda h, w, b: _ChunkedLogSumExp.apply(h, w, b, 2), (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w: _ChunkedLogSumExp.apply(h, w, None, 4), (h, w))


def test_gradcheck_token_logprobs():
    h, w, b, _ = _inputs(5, 7, 3, 1, seed=13, bias=True)
    y = torch.tensor([0, 6, 3, 3, 1])  # a repeated id
    assert torch.autograd.gradcheck(lambda h, w, b: _TokenLogProbs.apply(h, w, y, b, 2), (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w: _TokenLogProbs.apply(h, w, y, None, 4), (h, w))


def test_renormalised_support_softmax_matches_restricted_softmax():
    """LSM's pi^: softmax over support logits == full softmax restricted to the support, renormalised."""
    N, V, d, K = 12, 40, 8, 6
    h, w, b, ids = _inputs(N, V, d, K, seed=5, bias=True)
    pi_hat = torch.softmax(support_logits(h, w, ids, chunk_size=5, bias_V=b), dim=-1)
    p_support = torch.softmax(_naive_logits(h, w, b), dim=-1).gather(1, ids)  # (N, K)
    torch.testing.assert_close(pi_hat, p_support / p_support.sum(-1, keepdim=True), **TOL)
    # and the log-prob shift is exactly the per-row logsumexp
    lp = support_logits(h, w, ids, 5, b) - chunked_logsumexp(h, w, 5, b)[:, None]
    torch.testing.assert_close(lp, p_support.log(), **TOL)


def test_lsm_on_full_support_through_heads_equals_full_reverse_kl():
    """Issue 5: with K = V (every id in the support) LSM through the heads is the full-vocabulary reverse KL."""
    B, T, V, d = 2, 5, 11, 6
    h, w, b, _ = _inputs(B * T, V, d, 1, seed=9, bias=True)
    h_BTd = h.detach().reshape(B, T, d).requires_grad_()
    g = torch.Generator().manual_seed(10)
    teacher_BTV = torch.log_softmax(torch.randn(B, T, V, generator=g, **F64), dim=-1)
    perm_BTV = torch.stack([torch.randperm(V, generator=g) for _ in range(B * T)]).reshape(B, T, V)
    mask_BTV = torch.ones(B, T, V, dtype=torch.bool)

    z_BTV = support_logits(h_BTd, w, perm_BTV, chunk_size=3, bias_V=b)  # every id once, shuffled
    lsm_BT = local_support_kl(z_BTV, teacher_BTV.gather(-1, perm_BTV), mask_BTV, True)
    full, _ = full_reverse_kl(_naive_logits(h_BTd, w, b), teacher_BTV, torch.ones(B, T, dtype=torch.bool))
    # the losses module computes in float32, hence the looser tolerance
    torch.testing.assert_close(lsm_BT.mean(), full.to(lsm_BT.dtype), rtol=1e-5, atol=1e-6)
    g_lsm = torch.autograd.grad(lsm_BT.mean(), (h_BTd, w, b))
    g_full = torch.autograd.grad(full, (h_BTd, w, b))
    for a, c in zip(g_lsm, g_full, strict=True):
        torch.testing.assert_close(a, c.to(a.dtype), rtol=1e-4, atol=1e-6)


def test_float32_accumulates_logsumexp_in_float32():
    h, w = torch.randn(6, 4).bfloat16(), torch.randn(9, 4).bfloat16()
    assert support_logits(h, w, torch.zeros(6, 2, dtype=torch.long)).dtype == torch.bfloat16
    lse = chunked_logsumexp(h, w, chunk_size=4)
    assert lse.dtype == torch.float32
    want = torch.logsumexp((h @ w.T).float(), dim=-1)
    torch.testing.assert_close(lse, want)


def test_bad_inputs_raise_clear_errors():
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        support_logits(h, w, torch.tensor([[0, 10]] * 4))
    with pytest.raises(ValueError, match="support_ids must be"):
        support_logits(h, w, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dim"):
        chunked_logsumexp(h, torch.randn(10, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logsumexp(h, w, chunk_size=0)
    with pytest.raises(ValueError, match="dtype"):
        token_logprobs(h.double(), w, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids must be"):
        token_logprobs(h, w, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 10\)"):
        token_logprobs(h, w, torch.tensor([0, 1, 2, 10]))


@pytest.mark.parametrize("tied", [False, True])
def test_final_hidden_and_lm_head_reproduce_model_logits_and_grads(tied):
    """Through a tiny Llama: values, and gradients w.r.t. every parameter (incl. a tied head) equal the
    model's own logits path."""
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=48, hidden_size=64, num_layers=1)
    config.tie_word_embeddings = tied
    model = LlamaForCausalLM(config).double()
    weight, bias = lm_head_of(model)
    assert bias is None and weight.shape == (48, 64)
    assert (weight is model.get_input_embeddings().weight) == tied

    ids_BT = torch.randint(0, 48, (2, 7))
    mask_BT = torch.ones(2, 7, dtype=torch.long)
    mask_BT[1, :2] = 0  # left padding
    support_BTK = torch.randint(0, 48, (2, 7, 5))
    y_BT = torch.randint(0, 48, (2, 7))

    h_BTd = final_hidden(model, ids_BT, mask_BT)
    logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits
    torch.testing.assert_close(h_BTd @ weight.T, logits_BTV, **TOL)

    def loss_heads():
        h = final_hidden(model, ids_BT, mask_BT)
        z = support_logits(h, weight, support_BTK, chunk_size=3)
        return (torch.log_softmax(z, -1)[..., 0]).sum() + token_logprobs(h, weight, y_BT, chunk_size=4).sum()

    def loss_naive():
        logp = torch.log_softmax(model(input_ids=ids_BT, attention_mask=mask_BT).logits, -1)
        z = logp.gather(-1, support_BTK)
        return (torch.log_softmax(z, -1)[..., 0]).sum() + logp.gather(-1, y_BT[..., None]).sum()

    params = [p for p in model.parameters()]
    g_heads = torch.autograd.grad(loss_heads(), params)
    g_naive = torch.autograd.grad(loss_naive(), params)
    for (name, _), a, b in zip(model.named_parameters(), g_heads, g_naive, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


# bf16 weight gradients: N = 2048 positions in chunks of 8 is 256 chunks summed into grad W.
BF16_N, BF16_D, BF16_V, BF16_K, BF16_CHUNK = 2048, 64, 512, 8, 8


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def _bf16_head(same_sign: bool):
    """bf16 hidden states with a common direction (mean 1, as real final hidden states have), a small-scale
    head, support ids, and upstream gradients (all positive when `same_sign`)."""
    g = torch.Generator().manual_seed(17 + same_sign)
    h = (torch.randn(BF16_N, BF16_D, generator=g) + 1).bfloat16()
    w = (0.1 * torch.randn(BF16_V, BF16_D, generator=g)).bfloat16()
    ids = torch.randint(0, BF16_V, (BF16_N, BF16_K), generator=g)
    u_sup = torch.randn(BF16_N, BF16_K, generator=g).bfloat16()  # bf16: support logits come out in bf16
    u_tok = torch.randn(BF16_N, generator=g)
    if same_sign:
        u_sup, u_tok = u_sup.abs(), u_tok.abs()
    return h, w, ids, u_sup, u_tok


def _weight_grad(loss_of_w, w):
    w = w.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_of_w(w), w)
    return g


@pytest.mark.parametrize("same_sign", [False, True], ids=["mixed_sign", "same_sign"])
@pytest.mark.parametrize("head", ["support_logits", "token_logprobs"])
def test_bf16_weight_grad_is_as_accurate_as_one_full_logit_matmul(head, same_sign):
    """grad W through the chunked heads, bf16 in and out, against float64 from the definition (the same
    bf16 values, full logits, autograd): over 256 chunks it must be no less accurate than the plain bf16
    full-logit path (one bf16 matmul, accumulated in fp32 inside the kernel and rounded once)."""
    h, w, ids, u_sup, u_tok = _bf16_head(same_sign)
    y = ids[:, 0]
    if head == "support_logits":

        def heads_loss(w_):
            return (support_logits(h, w_, ids, chunk_size=BF16_CHUNK) * u_sup).sum()

        def full_loss(w_):  # in the dtype of w_: bf16 for the plain path, float64 for the reference
            return ((h.to(w_.dtype) @ w_.T).gather(1, ids) * u_sup.to(w_.dtype)).sum()

    else:

        def heads_loss(w_):
            return (token_logprobs(h, w_, y, chunk_size=BF16_CHUNK) * u_tok).sum()

        def full_loss(w_):  # bf16 logits, log_softmax in fp32 (plain) or float64 throughout (reference)
            z = (h.to(w_.dtype) @ w_.T).to(torch.promote_types(w_.dtype, torch.float32))
            return (torch.log_softmax(z, -1).gather(1, y[:, None])[:, 0] * u_tok.to(z.dtype)).sum()

    ref = _weight_grad(full_loss, w.double())
    got = _weight_grad(heads_loss, w)
    plain = _weight_grad(full_loss, w)
    assert got.dtype == torch.bfloat16
    err, err_plain = _rel_err(got, ref), _rel_err(plain, ref)
    assert err <= 1.5 * err_plain, (err, err_plain)
    assert err < 1e-2


def test_bf16_chunk_by_chunk_accumulation_error_grows_with_the_chunk_count():
    """Why the heads accumulate grad W in fp32: the old backward (addmm_ of each chunk into a bf16 grad W,
    replayed here for chunked_logsumexp) rounds once per chunk, so its error grows with the chunk count and
    at 256 chunks fails the bound the test above puts on the heads."""
    h, w, _, _, u = _bf16_head(same_sign=True)
    ref = _weight_grad(lambda w_: (torch.logsumexp(h.double() @ w_.T, -1) * u.double()).sum(), w.double())
    plain = _weight_grad(lambda w_: (torch.logsumexp((h @ w_.T).float(), -1) * u).sum(), w)
    lse = torch.logsumexp((h @ w.T).float(), -1)

    def old_grad(chunk: int) -> torch.Tensor:
        acc = torch.zeros_like(w)
        for s in range(0, BF16_N, chunk):
            p = ((h[s : s + chunk] @ w.T).float() - lse[s : s + chunk, None]).exp() * u[s : s + chunk, None]
            acc.addmm_(p.bfloat16().T, h[s : s + chunk])
        return acc

    err_4, err_256 = _rel_err(old_grad(BF16_N // 4), ref), _rel_err(old_grad(BF16_CHUNK), ref)
    assert err_256 > 3 * err_4
    assert err_256 > 1.5 * _rel_err(plain, ref)
    new = _weight_grad(lambda w_: (chunked_logsumexp(h, w_, chunk_size=BF16_CHUNK) * u).sum(), w)
    assert _rel_err(new, ref) <= 1.5 * _rel_err(plain, ref)
