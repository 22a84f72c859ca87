"""trainer.losses: discounted returns (the gamma estimator) and sampled-token OPD with PPO clipping.

References are Python loops straight from the formulas, in float64.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.losses import discounted_returns, masked_token_mean, sampled_token_opd_loss

PROPS = settings(max_examples=50, deadline=None)
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny; intra-op threads only add spin-wait overhead on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ref_returns(r_B_T, mask_B_T, gamma):
    """A_t = sum_{t' >= t, t' unmasked} gamma^(t'-t) r_t'; masked positions get 0."""
    B, T = r_B_T.shape
    rows = []
    for b in range(B):
        row = []
        for t in range(T):
            if not mask_B_T[b, t]:
                row.append(torch.zeros((), dtype=F64))
                continue
            terms = [gamma ** (u - t) * r_B_T[b, u] for u in range(t, T) if mask_B_T[b, u]]
            row.append(sum(terms))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_returns_recursive(r_B_T, mask_B_T, gamma):
    """The same quantity via A_t = r_t + gamma A_{t+1} (O(T), for long sequences)."""
    r = torch.where(mask_B_T, r_B_T.to(F64), 0.0)
    out = torch.zeros_like(r)
    acc = torch.zeros(r.shape[0], dtype=F64)
    for t in reversed(range(r.shape[1])):
        acc = r[:, t] + gamma * acc
        out[:, t] = acc
    return torch.where(mask_B_T, out, 0.0)


def ref_opd_per_token(lp, old, teacher, mask, gamma, clip_low, clip_high):
    """Per-token -min(ratio A, clip(ratio) A) with r = log q - log pi_old, from the definitions."""
    B, T = lp.shape
    rewards = torch.stack(
        [torch.stack([(teacher[b, t] - old[b, t]).detach() for t in range(T)]) for b in range(B)]
    )
    adv = ref_returns(rewards, mask, gamma)
    rows = []
    for b in range(B):
        row = []
        for t in range(T):
            ratio = torch.exp(lp[b, t] - old[b, t])
            clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
            row.append(-torch.minimum(ratio * adv[b, t], clipped * adv[b, t]))
        rows.append(torch.stack(row))
    return torch.stack(rows), rewards, adv


def ref_mean(x, mask):
    vals = [x[b, t] for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    return sum(vals) / len(vals) if vals else torch.zeros((), dtype=F64)


@st.composite
def reward_cases(draw, max_b=3, max_t=12):
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    p_keep = draw(st.sampled_from([0.0, 0.6, 1.0]))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, generator=g, dtype=F64), torch.rand(B, T, generator=g) < p_keep


def close(actual, expected, atol=2e-5, rtol=2e-4):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------- discounted returns


@PROPS
@given(reward_cases(), st.floats(0.0, 1.0))
def test_discounted_returns_matches_reference(case, gamma):
    r, mask = case
    got = discounted_returns(r, mask, gamma)
    assert got.dtype == torch.float32 and got.shape == r.shape
    close(got, ref_returns(r, mask, gamma))


@PROPS
@given(reward_cases())
def test_gamma_zero_is_per_token_reward(case):
    r, mask = case
    close(discounted_returns(r, mask, 0.0), torch.where(mask, r.float(), 0.0), atol=0, rtol=0)


@PROPS
@given(reward_cases())
def test_gamma_one_is_causal_return_to_go(case):
    r, mask = case
    B, T = r.shape
    expected = torch.tensor(
        [
            [sum(float(r[b, u]) for u in range(t, T) if mask[b, u]) if mask[b, t] else 0.0 for t in range(T)]
            for b in range(B)
        ],
        dtype=F64,
    )
    close(discounted_returns(r, mask, 1.0), expected)


@pytest.mark.parametrize("T", [63, 64, 65, 200, 4097, 5000])
@pytest.mark.parametrize("gamma", [0.3, 0.9, 0.999])
def test_discounted_returns_long_sequences(T, gamma):
    """Several chunk levels of the blocked scan; compared with the plain recursion."""
    g = torch.Generator().manual_seed(T)
    r = torch.randn(2, T, generator=g, dtype=F64)
    mask = torch.rand(2, T, generator=g) < 0.9
    mask[1, T // 2 :] = False  # a short row padded to T
    got = discounted_returns(r, mask, gamma)
    assert torch.isfinite(got).all()
    # Returns grow to ~1 / (1 - gamma) in scale; fp32 error grows with it.
    close(got, ref_returns_recursive(r, mask, gamma), atol=2e-4 / (1 - gamma), rtol=1e-4)


def test_discounted_returns_positions_count_in_the_distance():
    # The masked middle position adds no reward but still counts one step of discount.
    r = torch.tensor([[1.0, 100.0, 1.0]])
    mask = torch.tensor([[True, False, True]])
    assert discounted_returns(r, mask, 0.5).tolist() == [[1.0 + 0.25 * 1.0, 0.0, 1.0]]


def test_discounted_returns_gradient_matches_reference():
    g = torch.Generator().manual_seed(5)
    r = torch.randn(2, 9, generator=g, dtype=F64)
    mask = torch.rand(2, 9, generator=g) < 0.7
    w = torch.randn(2, 9, generator=g, dtype=F64)
    for gamma in (0.0, 0.7, 1.0):
        a = r.clone().requires_grad_(True)
        b = r.clone().requires_grad_(True)
        (ga,) = torch.autograd.grad((discounted_returns(a, mask, gamma).to(F64) * w).sum(), a)
        (gb,) = torch.autograd.grad((ref_returns(b, mask, gamma) * w).sum(), b, materialize_grads=True)
        close(ga, gb)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, math.nan])
def test_discounted_returns_rejects_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), gamma)


def test_discounted_returns_empty_and_all_masked():
    assert discounted_returns(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), 0.5).shape == (2, 0)
    r = torch.full((2, 70), math.nan)
    out = discounted_returns(r, torch.zeros(2, 70, dtype=torch.bool), 0.9)
    assert torch.equal(out, torch.zeros(2, 70))


# ------------------------------------------------------------------------------------ sampled-token OPD


@st.composite
def opd_cases(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    p_keep = draw(st.sampled_from([0.0, 0.7, 1.0]))
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 4
    lp = old + torch.randn(B, T, generator=g, dtype=F64) * 0.3  # ratios around 1, some beyond the clip
    teacher = -torch.rand(B, T, generator=g, dtype=F64) * 4
    return lp, old, teacher, torch.rand(B, T, generator=g) < p_keep


@PROPS
@given(opd_cases(), st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([(0.2, 0.2), (0.1, 0.3)]))
def test_sampled_token_loss_matches_reference(case, gamma, clips):
    lp, old, teacher, mask = case
    clip_low, clip_high = clips
    loss, metrics = sampled_token_opd_loss(lp, old, teacher, mask, gamma, clip_low, clip_high)
    per, rewards, adv = ref_opd_per_token(lp, old, teacher, mask, gamma, clip_low, clip_high)
    close(loss, ref_mean(per, mask))
    assert metrics["loss/sampled_token"] == pytest.approx(loss.item())
    assert metrics["opd/reward_mean"] == pytest.approx(float(ref_mean(rewards, mask)), abs=1e-5)
    assert metrics["opd/advantage_mean"] == pytest.approx(float(ref_mean(adv, mask)), abs=1e-4)

    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(
        sampled_token_opd_loss(a, old, teacher, mask, gamma, clip_low, clip_high)[0], a
    )
    ref_loss = ref_mean(ref_opd_per_token(b, old, teacher, mask, gamma, clip_low, clip_high)[0], mask)
    gb = torch.autograd.grad(ref_loss, b)[0] if ref_loss.requires_grad else torch.zeros_like(b)
    close(ga, gb)


def test_clip_fraction_and_gradient_on_a_hand_case():
    # gamma = 0, so A_t = r_t = teacher - old. Ratios exp(lp - old):
    #   t0: A = +1, ratio 1.5 > 1.2 -> clipped          t1: A = +1, ratio 0.5 -> not clipped (min is ratio*A)
    #   t2: A = -1, ratio 0.5 < 0.8 -> clipped          t3: A = -1, ratio 1.5 -> not clipped
    #   t4: masked, ratio 10 with A = +1: would clip, must not count
    old = torch.full((1, 5), -2.0, dtype=F64)
    teacher = old + torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]], dtype=F64)
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 10.0]], dtype=F64)
    lp = (old + ratio.log()).requires_grad_(True)
    mask = torch.tensor([[True, True, True, True, False]])

    loss, metrics = sampled_token_opd_loss(lp, old, teacher, mask, gamma=0.0, clip_low=0.2, clip_high=0.2)
    assert metrics["opd/clip_frac"] == pytest.approx(0.5)
    # Per token: -min(ratio A, clip(ratio) A) = [-1.2, -0.5, +0.8, +1.5] -> mean 0.15.
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4, abs=1e-6)
    assert metrics["opd/reward_mean"] == pytest.approx(0.0, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, lp)
    # d/d lp of -A ratio is -A ratio where unclipped; 0 where clipped or masked; / 4 tokens.
    expected = torch.tensor([[0.0, -1.0 * 0.5, 0.0, 1.0 * 1.5, 0.0]], dtype=F64) / 4
    close(grad, expected, atol=1e-6)


@PROPS
@given(opd_cases(), st.sampled_from([0.0, 0.9, 1.0]))
def test_sampled_token_gradient_is_minus_advantage_times_ratio_where_unclipped(case, gamma):
    lp, old, teacher, mask = case
    leaf = lp.clone().requires_grad_(True)
    loss, metrics = sampled_token_opd_loss(leaf, old, teacher, mask, gamma)
    (grad,) = torch.autograd.grad(loss, leaf)
    adv = ref_returns(teacher - old, mask, gamma)
    ratio = torch.exp(lp - old)
    clipped = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    n = max(int(mask.sum()), 1)
    expected = torch.where(mask & ~clipped, -adv * ratio / n, 0.0)
    close(grad, expected, atol=1e-5)
    assert metrics["opd/clip_frac"] == pytest.approx(int((clipped & mask).sum()) / n)


def test_on_policy_sampled_token_gradient_is_the_reward_policy_gradient():
    # ratio = 1 (no staleness): the gradient is -A_t / N, the REINFORCE form of token-level OPD.
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(2, 6, generator=g)
    teacher = -torch.rand(2, 6, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    lp = old.clone().requires_grad_(True)
    loss, metrics = sampled_token_opd_loss(lp, old, teacher, mask, gamma=0.0)
    (grad,) = torch.autograd.grad(loss, lp)
    close(grad, -(teacher - old) / 12)
    assert metrics["opd/clip_frac"] == 0.0
    assert loss.item() == pytest.approx(-masked_token_mean(teacher - old, mask).item(), abs=1e-6)


def test_sampled_token_loss_all_masked_and_garbage_positions():
    lp = torch.tensor([[-1.0, math.nan, -math.inf]], requires_grad=True)
    old = torch.tensor([[-1.0, -math.inf, math.nan]])
    teacher = torch.tensor([[-0.5, -math.inf, -math.inf]])
    none = torch.zeros(1, 3, dtype=torch.bool)
    loss, metrics = sampled_token_opd_loss(lp, old, teacher, none, gamma=1.0)
    assert loss.item() == 0.0 and all(v == 0.0 for v in metrics.values())
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.equal(grad, torch.zeros(1, 3))
    # Only the first position counts; garbage elsewhere stays out of value and gradient.
    first = torch.tensor([[True, False, False]])
    loss, _ = sampled_token_opd_loss(lp, old, teacher, first, gamma=1.0)
    assert loss.item() == pytest.approx(-0.5)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(grad).all() and grad[0, 1:].eq(0).all()
