"""trainer.losses: support KL, LSM, full reverse KL, support building and masking.

Each function is checked against a naive reference written with Python loops straight from the formulas of
DESIGN.md section 1, in float64, plus hypothesis properties. The returns / PPO part is in
test_losses_opd.py.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.losses import (
    add_sampled_token,
    full_reverse_kl,
    local_support_kl,
    lsm_loss,
    masked_token_mean,
    special_token_mask,
    support_mass,
)

PROPS = settings(max_examples=50, deadline=None)
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny; intra-op threads only add spin-wait overhead on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- references


def ref_support_kl(s_B_T_K, q_B_T_K, mask_B_T_K, renormalize):
    """sum_{v in S} pi^(v) log(pi^(v) / q^(v)), one position at a time, only the unmasked slots touched."""
    B, T, K = mask_B_T_K.shape
    rows = []
    for b in range(B):
        for t in range(T):
            idx = [k for k in range(K) if mask_B_T_K[b, t, k]]
            if not idx:
                rows.append(torch.zeros((), dtype=F64))
                continue
            if renormalize:
                z_pi = sum(torch.exp(s_B_T_K[b, t, k]) for k in idx)
                z_q = sum(torch.exp(q_B_T_K[b, t, k]) for k in idx)
                pis = [torch.exp(s_B_T_K[b, t, k]) / z_pi for k in idx]
                qs = [torch.exp(q_B_T_K[b, t, k]) / z_q for k in idx]
                rows.append(sum(p * torch.log(p / q) for p, q in zip(pis, qs, strict=True)))
            else:
                rows.append(
                    sum(torch.exp(s_B_T_K[b, t, k]) * (s_B_T_K[b, t, k] - q_B_T_K[b, t, k]) for k in idx)
                )
    return torch.stack(rows).view(B, T)


def ref_masked_mean(x_B_T, mask_B_T):
    vals = [x_B_T[b, t] for b in range(x_B_T.shape[0]) for t in range(x_B_T.shape[1]) if mask_B_T[b, t]]
    if not vals:
        return torch.zeros((), dtype=F64)
    return sum(vals) / len(vals)


def ref_full_kl_per_position(logits_V, teacher_logprobs_V):
    z = sum(torch.exp(x) for x in logits_V)
    total = torch.zeros((), dtype=F64)
    for v in range(logits_V.shape[0]):
        p = torch.exp(logits_V[v]) / z
        total = total + p * (torch.log(p) - teacher_logprobs_V[v])
    return total


# ------------------------------------------------------------------------------------------------ cases


@st.composite
def support_cases(draw, max_b=3, max_t=4, max_k=6):
    """Random student/teacher values at K slots with a random mask (some rows may be all masked)."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    K = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    p_keep = draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, K, generator=g, dtype=F64) * 3
    teacher = torch.randn(B, T, K, generator=g, dtype=F64) * 3
    mask = torch.rand(B, T, K, generator=g) < p_keep
    return student, teacher, mask


def grads(fn, *inputs, weight):
    """d(sum(weight * fn(inputs))) / d inputs, zeros for inputs the output does not reach."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    if not out.requires_grad:  # the loop references build no graph when every slot is masked
        return [torch.zeros_like(x) for x in leaves]
    return torch.autograd.grad(
        (out.to(F64) * weight).sum(), leaves, allow_unused=True, materialize_grads=True
    )


def close(actual, expected, atol=2e-5, rtol=2e-4):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------ support KL


@PROPS
@given(support_cases(), st.booleans())
def test_support_kl_matches_reference(case, renormalize):
    student, teacher, mask = case
    got = local_support_kl(student, teacher, mask, renormalize=renormalize)
    assert got.dtype == torch.float32 and got.shape == mask.shape[:2]
    close(got, ref_support_kl(student, teacher, mask, renormalize))


@PROPS
@given(support_cases(), st.booleans())
def test_support_kl_gradients_match_reference(case, renormalize):
    student, teacher, mask = case
    weight = torch.randn(mask.shape[:2], generator=torch.Generator().manual_seed(0), dtype=F64)
    fn = lambda s, q: local_support_kl(s, q, mask, renormalize=renormalize)
    ref = lambda s, q: ref_support_kl(s, q, mask, renormalize)
    for got, expected in zip(
        grads(fn, student, teacher, weight=weight), grads(ref, student, teacher, weight=weight), strict=True
    ):
        close(got, expected, atol=5e-5)


@PROPS
@given(support_cases())
def test_support_kl_nonnegative(case):
    student, teacher, mask = case
    assert (local_support_kl(student, teacher, mask) >= -1e-6).all()


@PROPS
@given(support_cases(), st.integers(0, 2**31 - 1))
def test_support_kl_zero_when_equal_up_to_row_shift(case, seed):
    student, _, mask = case
    g = torch.Generator().manual_seed(seed)
    shift_B_T_1 = torch.randn(*mask.shape[:2], 1, generator=g, dtype=F64) * 20
    # Agreement only matters on the support: masked teacher slots hold garbage.
    teacher = torch.where(mask, student + shift_B_T_1, torch.randn(mask.shape, generator=g, dtype=F64) * 9)
    kl = local_support_kl(student, teacher, mask)
    close(kl, torch.zeros_like(kl), atol=1e-5)


@PROPS
@given(support_cases(), st.integers(0, 2**31 - 1))
def test_support_kl_invariant_to_row_shifts(case, seed):
    student, teacher, mask = case
    g = torch.Generator().manual_seed(seed)
    shift_s = torch.randn(*mask.shape[:2], 1, generator=g, dtype=F64) * 20
    shift_q = torch.randn(*mask.shape[:2], 1, generator=g, dtype=F64) * 20
    base = local_support_kl(student, teacher, mask)
    close(local_support_kl(student + shift_s, teacher, mask), base, atol=5e-5)
    close(local_support_kl(student, teacher + shift_q, mask), base, atol=5e-5)


@PROPS
@given(
    st.integers(1, 3), st.integers(1, 4), st.integers(2, 12), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0)
)
def test_lsm_full_support_equals_full_reverse_kl(B, T, V, seed, p_token):
    """K = V, support = every id (in a shuffled order), renormalised: LSM is exactly equation 4."""
    g = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(B, T, V, generator=g, dtype=F64) * 3
    teacher_logprobs = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=F64) * 3, dim=-1)
    token_mask = torch.rand(B, T, generator=g) < p_token
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(B * T)]).view(B, T, V)
    student_at_ids = torch.log_softmax(student_logits, -1).gather(-1, ids)
    teacher_at_ids = teacher_logprobs.gather(-1, ids)
    support = torch.ones(B, T, V, dtype=torch.bool)

    lsm, _ = lsm_loss(student_at_ids, teacher_at_ids, support, token_mask)
    full, metrics = full_reverse_kl(student_logits, teacher_logprobs, token_mask)
    close(lsm, full)
    assert metrics["loss/full_kl"] == pytest.approx(full.item())
    # Unrenormalised too: with the whole vocabulary the support sums to 1 already.
    lsm_raw, _ = lsm_loss(student_at_ids, teacher_at_ids, support, token_mask, renormalize=False)
    close(lsm_raw, full)


def test_support_kl_all_masked_is_zero_without_nan():
    student = torch.randn(2, 3, 4, dtype=F64)
    teacher = torch.full((2, 3, 4), -math.inf, dtype=F64)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    for renormalize in (True, False):
        s = student.clone().requires_grad_(True)
        q = teacher.clone().requires_grad_(True)
        kl = local_support_kl(s, q, mask, renormalize=renormalize)
        assert torch.equal(kl, torch.zeros(2, 3))
        loss, metrics = lsm_loss(s, q, mask, torch.ones(2, 3, dtype=torch.bool), renormalize=renormalize)
        assert loss.item() == 0.0 and metrics == {"loss/lsm": 0.0}
        gs, gq = torch.autograd.grad(loss, [s, q])
        assert torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gq, torch.zeros_like(gq))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("garbage", [-math.inf, math.inf, math.nan])
def test_support_kl_ignores_nonfinite_values_in_masked_slots(renormalize, garbage):
    g = torch.Generator().manual_seed(1)
    student = torch.log_softmax(torch.randn(3, 5, 6, generator=g, dtype=F64), -1)
    teacher = torch.log_softmax(torch.randn(3, 5, 6, generator=g, dtype=F64), -1)
    mask = torch.rand(3, 5, 6, generator=g) < 0.6
    mask[0, 0] = False  # one empty row as well
    dirty_teacher = torch.where(mask, teacher, garbage)
    dirty_student = torch.where(mask, student, -math.inf)  # e.g. a padding id the student never emits
    weight = torch.randn(3, 5, generator=g, dtype=F64)

    fn = lambda s, q: local_support_kl(s, q, mask, renormalize=renormalize)
    close(fn(dirty_student, dirty_teacher), ref_support_kl(student, teacher, mask, renormalize))
    got = grads(fn, dirty_student, dirty_teacher, weight=weight)
    expected = grads(lambda s, q: ref_support_kl(s, q, mask, renormalize), student, teacher, weight=weight)
    for a, e in zip(got, expected, strict=True):
        assert torch.isfinite(a).all()
        close(a, e, atol=5e-5)
        assert (a[~mask] == 0).all()


def test_support_kl_hand_computed():
    # Support {a, b}: student 1:3 over it, teacher 1:1 -> KL = 1/4 log(1/2) + 3/4 log(3/2).
    student = torch.log(torch.tensor([[[0.1, 0.3, 0.6]]]))
    teacher = torch.log(torch.tensor([[[0.2, 0.2, 0.6]]]))
    mask = torch.tensor([[[True, True, False]]])
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert local_support_kl(student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)
    raw = 0.1 * math.log(0.1 / 0.2) + 0.3 * math.log(0.3 / 0.2)
    assert local_support_kl(student, teacher, mask, renormalize=False).item() == pytest.approx(raw, rel=1e-6)


def test_support_kl_fp32_inside_for_low_precision_inputs():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 5, generator=g).bfloat16()
    teacher = torch.randn(2, 3, 5, generator=g).bfloat16()
    mask = torch.rand(2, 3, 5, generator=g) < 0.7
    got = local_support_kl(student, teacher, mask)
    assert got.dtype == torch.float32
    close(got, ref_support_kl(student.to(F64), teacher.to(F64), mask, True))


# ---------------------------------------------------------------------------------------- LSM, means


@PROPS
@given(support_cases(), st.integers(0, 2**31 - 1), st.booleans())
def test_lsm_loss_matches_reference(case, seed, renormalize):
    student, teacher, mask = case
    token_mask = torch.rand(mask.shape[:2], generator=torch.Generator().manual_seed(seed)) < 0.7
    loss, metrics = lsm_loss(student, teacher, mask, token_mask, renormalize=renormalize)
    expected = ref_masked_mean(ref_support_kl(student, teacher, mask, renormalize), token_mask)
    close(loss, expected)
    assert loss.shape == () and metrics["loss/lsm"] == pytest.approx(loss.item())
    weight = torch.ones((), dtype=F64)
    got = grads(lambda s: lsm_loss(s, teacher, mask, token_mask, renormalize)[0], student, weight=weight)
    exp = grads(
        lambda s: ref_masked_mean(ref_support_kl(s, teacher, mask, renormalize), token_mask),
        student,
        weight=weight,
    )
    close(got[0], exp[0], atol=5e-5)


@PROPS
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.3, 1.0]))
def test_masked_token_mean_matches_reference(B, T, seed, p):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) < p
    got = masked_token_mean(torch.where(mask, x, math.nan), mask)  # masked values never leak
    close(got, ref_masked_mean(x, mask))
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(masked_token_mean(leaf, mask), leaf)
    n = int(mask.sum())
    close(grad, mask.to(F64) / max(n, 1))


def test_masked_token_mean_counts_tokens_not_sequences():
    # Equation 8: 1 / sum_i |o_i|, so a long sequence weighs more than a short one.
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    assert masked_token_mean(x, mask).item() == pytest.approx(9.0 / 5.0)


def test_masked_token_mean_all_masked():
    x = torch.randn(2, 3, requires_grad=True)
    out = masked_token_mean(x, torch.zeros(2, 3, dtype=torch.bool))
    assert out.item() == 0.0
    (grad,) = torch.autograd.grad(out, x)
    assert torch.equal(grad, torch.zeros(2, 3))


# ------------------------------------------------------------------------------------ full reverse KL


@PROPS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_full_reverse_kl_matches_reference(B, T, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 3
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=F64) * 3, -1)
    token_mask = torch.rand(B, T, generator=g) < 0.7

    def ref(lg, q):
        per = [[ref_full_kl_per_position(lg[b, t], q[b, t]) for t in range(T)] for b in range(B)]
        return ref_masked_mean(torch.stack([torch.stack(r) for r in per]), token_mask)

    loss, _ = full_reverse_kl(logits, teacher, token_mask)
    close(loss, ref(logits, teacher))
    assert loss.item() >= -1e-6
    one = torch.ones((), dtype=F64)
    fn = lambda lg, q: full_reverse_kl(lg, q, token_mask)[0]
    for a, e in zip(
        grads(fn, logits, teacher, weight=one), grads(ref, logits, teacher, weight=one), strict=True
    ):
        close(a, e, atol=5e-5)


def test_full_reverse_kl_ignores_garbage_at_masked_positions():
    logits = torch.randn(2, 3, 5)
    teacher = torch.log_softmax(torch.randn(2, 3, 5), -1)
    token_mask = torch.tensor([[True, False, True], [False, False, False]])
    dirty_logits = torch.where(token_mask[..., None], logits, math.nan).requires_grad_(True)
    dirty_teacher = torch.where(token_mask[..., None], teacher, -math.inf)
    loss, _ = full_reverse_kl(dirty_logits, dirty_teacher, token_mask)
    clean, _ = full_reverse_kl(logits, teacher, token_mask)
    assert loss.item() == pytest.approx(clean.item())
    (grad,) = torch.autograd.grad(loss, dirty_logits)
    assert torch.isfinite(grad).all() and (grad[~token_mask] == 0).all()
    empty, _ = full_reverse_kl(logits, teacher, torch.zeros(2, 3, dtype=torch.bool))
    assert empty.item() == 0.0


# ------------------------------------------------------------------------------------- support mass


@PROPS
@given(support_cases())
def test_support_mass_matches_reference(case):
    _, teacher, mask = case
    logprobs = torch.log_softmax(teacher, -1)
    got = support_mass(torch.where(mask, logprobs, -math.inf), mask)
    B, T, K = mask.shape
    expected = torch.tensor(
        [
            [sum(math.exp(logprobs[b, t, k]) for k in range(K) if mask[b, t, k]) for t in range(T)]
            for b in range(B)
        ],
        dtype=F64,
    )
    close(got, expected)
    assert (got <= 1 + 1e-6).all()


# --------------------------------------------------------------------------- support variants, masking


def test_add_sampled_token_dedup_hand_case():
    ids = torch.tensor([[[4, 7, 2], [4, 7, 2], [4, 7, 9]]])  # (1, 3, 3)
    teacher = torch.log(torch.tensor([[[0.5, 0.2, 0.1], [0.5, 0.2, 0.1], [0.5, 0.2, 0.1]]]))
    mask = torch.tensor([[[True, True, True], [True, True, True], [True, True, False]]])
    sampled = torch.tensor([[7, 3, 9]])  # in the support / new / only in a masked (padding) slot
    sampled_q = torch.log(torch.tensor([[0.2, 0.01, 0.05]]))

    ids1, q1, mask1 = add_sampled_token(ids, teacher, mask, sampled, sampled_q)
    assert ids1.shape == (1, 3, 4) and q1.shape == (1, 3, 4) and mask1.shape == (1, 3, 4)
    assert torch.equal(ids1[..., :3], ids) and torch.equal(ids1[..., 3], sampled)
    assert torch.equal(mask1[..., :3], mask)
    assert mask1[..., 3].tolist() == [[False, True, True]]
    torch.testing.assert_close(q1[..., 3], sampled_q)
    # Deduplicated: the KL of the extended support equals the KL of the original one when y_t was in it.
    student = torch.log(torch.tensor([[[0.3, 0.3, 0.2], [0.3, 0.3, 0.2], [0.3, 0.3, 0.2]]]))
    student1 = torch.cat([student, student.gather(-1, torch.tensor([[[1], [0], [0]]]))], -1)
    kl1 = local_support_kl(student1, q1, mask1)
    assert kl1[0, 0].item() == pytest.approx(local_support_kl(student, teacher, mask)[0, 0].item())


@PROPS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(0, 4), st.integers(0, 2**31 - 1))
def test_add_sampled_token_matches_reference(B, T, K, extra_v, seed):
    g = torch.Generator().manual_seed(seed)
    V = K + extra_v
    # A top-K support holds distinct ids.
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    teacher = torch.randn(B, T, K, generator=g)
    mask = torch.rand(B, T, K, generator=g) < 0.7
    sampled = torch.randint(0, V, (B, T), generator=g)
    sampled_q = torch.randn(B, T, generator=g)
    ids1, q1, mask1 = add_sampled_token(ids, teacher, mask, sampled, sampled_q)
    for b in range(B):
        for t in range(T):
            present = any(bool(mask[b, t, k]) and int(ids[b, t, k]) == int(sampled[b, t]) for k in range(K))
            assert bool(mask1[b, t, K]) == (not present)
            assert int(ids1[b, t, K]) == int(sampled[b, t])
            assert float(q1[b, t, K]) == float(sampled_q[b, t])
            # Each id occurs at most once among the unmasked slots the sampled token can add to.
            valid = [int(ids1[b, t, k]) for k in range(K + 1) if mask1[b, t, k]]
            assert valid.count(int(sampled[b, t])) == 1


def test_special_token_mask_hand_case():
    sampled = torch.tensor([[5, 1, 8, 2]])
    token_mask = torch.tensor([[True, True, True, False]])
    support_ids = torch.tensor([[[5, 3], [1, 0], [8, 1], [2, 2]]])
    support_mask = torch.tensor([[[True, True], [True, True], [True, False], [True, True]]])
    new_tokens, new_support = special_token_mask(
        sampled, token_mask, support_ids, support_mask, torch.tensor([1, 2], dtype=torch.int64)
    )
    assert new_tokens.tolist() == [[True, False, True, False]]
    assert new_support.tolist() == [[[True, True], [False, True], [True, False], [False, False]]]
    # No masked ids: nothing changes.
    same_tokens, same_support = special_token_mask(
        sampled, token_mask, support_ids, support_mask, torch.empty(0, dtype=torch.int64)
    )
    assert torch.equal(same_tokens, token_mask) and torch.equal(same_support, support_mask)


@PROPS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_special_token_mask_matches_reference(B, T, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    sampled = torch.randint(0, V, (B, T), generator=g)
    token_mask = torch.rand(B, T, generator=g) < 0.8
    ids = torch.randint(0, V, (B, T, K), generator=g)
    mask = torch.rand(B, T, K, generator=g) < 0.8
    masked_ids = torch.unique(torch.randint(0, V, (3,), generator=g))
    special = {int(i) for i in masked_ids}
    tok, sup = special_token_mask(sampled, token_mask, ids, mask, masked_ids)
    for b in range(B):
        for t in range(T):
            assert bool(tok[b, t]) == (bool(token_mask[b, t]) and int(sampled[b, t]) not in special)
            for k in range(K):
                assert bool(sup[b, t, k]) == (bool(mask[b, t, k]) and int(ids[b, t, k]) not in special)


# --------------------------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_support_kl_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 16, 8, generator=g)
    teacher = torch.where(
        torch.rand(4, 16, 8, generator=g) < 0.2, -math.inf, torch.randn(4, 16, 8, generator=g)
    )
    mask = torch.isfinite(teacher)
    token_mask = torch.rand(4, 16, generator=g) < 0.9
    cpu, _ = lsm_loss(student, teacher, mask, token_mask)
    cuda, _ = lsm_loss(student.cuda().bfloat16(), teacher.cuda(), mask.cuda(), token_mask.cuda())
    assert cuda.device.type == "cuda"
    assert cuda.item() == pytest.approx(cpu.item(), rel=2e-2)
