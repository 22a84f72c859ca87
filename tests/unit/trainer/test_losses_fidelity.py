"""Issue #19 fixes in the pure losses, each against a reference written from its definition: special-token
masking in two independent parts, the discount over the student's own steps (environment tokens do not
advance it), and rewards that are undefined (a sampled teacher-side alias id) counting as 0."""

import itertools

import pytest
import torch

from trainer.losses import discounted_returns, sampled_token_opd_loss, special_token_mask

F64 = torch.float64


def reference_step_returns(r, token_mask, step_mask, gamma):
    """A_t = sum_{t' >= t} gamma^(#steps in [t, t')) r_t', over t' in token_mask & step_mask; 0 elsewhere."""
    B, T = r.shape
    out = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        for t in range(T):
            if not (token_mask[b, t] and step_mask[b, t]):
                continue
            total, distance = 0.0, 0
            for u in range(t, T):
                if token_mask[b, u] and step_mask[b, u]:
                    total += gamma**distance * float(r[b, u])
                if step_mask[b, u]:
                    distance += 1
            out[b, t] = total
    return out


@pytest.mark.parametrize(
    ("T", "gamma", "seed"), [(7, 0.5, 0), (70, 0.9, 1), (150, 0.97, 2), (9, 0.0, 3), (9, 1.0, 4)]
)
def test_discount_counts_student_steps_only(T, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(3, T, generator=g)
    step = torch.rand(3, T, generator=g) > 0.3  # the rest: environment tokens between turns
    token = step & (torch.rand(3, T, generator=g) > 0.2)  # some steps masked (special tokens): still steps
    got = discounted_returns(r, token, gamma, step_mask=step)
    torch.testing.assert_close(
        got.double(), reference_step_returns(r, token, step, gamma), rtol=1e-5, atol=1e-5
    )


def test_environment_tokens_do_not_advance_the_discount_hand_case():
    # turn 1: student tokens 0, 1; environment 2, 3, 4; turn 2: student token 5
    r = torch.tensor([[1.0, 0.0, 9.0, 9.0, 9.0, 1.0]])
    step = torch.tensor([[True, True, False, False, False, True]])
    got = discounted_returns(r, step, 0.5, step_mask=step)
    assert got.tolist() == [[1.0 + 0.25, 0.5, 0.0, 0.0, 0.0, 1.0]]
    # by position (no step mask) the environment would count: 1 + 0.5^5
    assert discounted_returns(r, step, 0.5)[0, 0].item() == pytest.approx(1.0 + 0.5**5)


def test_all_steps_is_the_plain_discount():
    g = torch.Generator().manual_seed(5)
    r, mask = torch.randn(2, 90, generator=g), torch.rand(2, 90, generator=g) > 0.2
    ones = torch.ones(2, 90, dtype=torch.bool)
    torch.testing.assert_close(
        discounted_returns(r, mask, 0.8, step_mask=ones), discounted_returns(r, mask, 0.8)
    )


@pytest.mark.parametrize(("positions", "support"), list(itertools.product([False, True], repeat=2)))
def test_special_token_mask_parts_match_reference(positions, support):
    g = torch.Generator().manual_seed(6)
    B, T, K, V = 2, 5, 4, 9
    sampled = torch.randint(0, V, (B, T), generator=g)
    ids = torch.randint(0, V, (B, T, K), generator=g)
    tok, sup = torch.rand(B, T, generator=g) > 0.2, torch.rand(B, T, K, generator=g) > 0.2
    masked = torch.tensor([0, 3, 7])
    got_tok, got_sup = special_token_mask(
        sampled, tok, ids, sup, masked, positions=positions, support=support
    )
    for b, t in itertools.product(range(B), range(T)):
        drop = positions and int(sampled[b, t]) in (0, 3, 7)
        assert bool(got_tok[b, t]) == (bool(tok[b, t]) and not drop)
        for k in range(K):
            drop_k = support and int(ids[b, t, k]) in (0, 3, 7)
            assert bool(got_sup[b, t, k]) == (bool(sup[b, t, k]) and not drop_k)


def test_undefined_reward_counts_as_zero_and_keeps_the_position():
    g = torch.Generator().manual_seed(7)
    lp = torch.randn(1, 6, generator=g).requires_grad_(True)
    old = lp.detach() - 0.1
    teacher = torch.randn(1, 6, generator=g)
    mask = torch.ones(1, 6, dtype=torch.bool)
    ok = torch.tensor([[True, False, True, True, False, True]])
    for floor in (-30.0, -3.0):  # whatever the record holds there
        t = torch.where(ok, teacher, floor)
        loss, m = sampled_token_opd_loss(lp, old, t, mask, gamma=1.0, reward_mask_BT=ok)
        r = torch.where(ok, teacher - old, 0.0)
        adv = r.flip(-1).cumsum(-1).flip(-1)
        ratio = (lp - old).exp()
        ref = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        assert m["opd/reward_mean"] == pytest.approx(r.mean().item(), rel=1e-6)


def test_clip_fraction_is_reported_against_both_old_policies():
    lp = torch.zeros(1, 4)
    old = torch.zeros(1, 4)  # recomputed: ratio 1, nothing clips
    behaviour = torch.tensor([[-1.0, 0.0, 1.0, 0.0]])  # the rollout's: ratios e, 1, 1/e, 1
    teacher = torch.tensor([[1.0, 1.0, -1.0, 1.0]])  # A > 0, > 0, < 0, > 0 at gamma 0
    _, m = sampled_token_opd_loss(
        lp, old, teacher, torch.ones(1, 4, dtype=torch.bool), behaviour_logprobs_BT=behaviour
    )
    assert m["opd/clip_frac"] == 0.0 and m["opd/ratio_max_dev"] == 0.0
    assert m["opd/clip_frac_rollout"] == pytest.approx(0.5)  # ratio e with A > 0, 1/e with A < 0
    assert m["opd/old_rollout_gap"] == pytest.approx(0.5)
