"""Appendix C toy: environment dynamics, Gaussian maths, the OPD estimator and the variance estimate."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from experiments import gamma_toy as g


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_policy_is_about_4k_parameters():
    n = sum(p.numel() for p in g.GaussianPolicy(64).parameters())
    assert 3_500 <= n <= 5_000


def test_step_and_state():
    x = torch.tensor([0.0, 5.9, -5.9, 1.0, 1.0])
    a = torch.tensor([1.0, 1.0, -1.0, 10.0, -0.5])
    # positions stay in [-X_MAX, X_MAX]; actions beyond +-A_MAX act as +-A_MAX
    want = torch.tensor([g.STEP, g.X_MAX, -g.X_MAX, 1.0 + g.STEP * g.A_MAX, 1.0 - 0.5 * g.STEP])
    torch.testing.assert_close(g.step(x, a), want)
    s = g.state(1, torch.tensor([3.0]), 5, 20)
    torch.testing.assert_close(s, torch.tensor([[1.0, 3.0 / g.X_MAX, 0.25]]))
    assert g.state(0, torch.tensor([0.0]), 0, 20)[0, 0] == -1.0


def test_rollout_follows_the_dynamics():
    torch.manual_seed(0)
    policy = g.GaussianPolicy(8)
    s, a, x = g.rollout(policy, 0, batch=5, horizon=7, gen=torch.Generator().manual_seed(1))
    assert s.shape == (5, 7, 3) and a.shape == (5, 7) and x.shape == (5, 8)
    assert (x[:, 0] == g.START[0]).all()
    torch.testing.assert_close(x[:, 1:], g.step(x[:, :-1], a))  # x_{t+1} = clip(x_t + STEP a_t)
    torch.testing.assert_close(s[:, :, 1], x[:, :-1] / g.X_MAX)  # the state holds the position before acting
    torch.testing.assert_close(s[0, :, 2], torch.arange(7) / 7)
    # mirrored task: starts at -2
    _, _, x1 = g.rollout(policy, 1, batch=2, horizon=3, gen=torch.Generator().manual_seed(1))
    assert (x1[:, 0] == g.START[1]).all() and g.TARGET == (-3.0, 3.0)


def test_log_prob_and_kl_match_torch_distributions():
    torch.manual_seed(0)
    pi, q = g.GaussianPolicy(16), g.GaussianPolicy(16)
    s = torch.randn(10, 3)
    a = torch.randn(10)
    mu, log_std = pi(s)
    torch.testing.assert_close(pi.log_prob(s, a), Normal(mu, log_std.exp()).log_prob(a))
    mq, lq = q(s)
    ref = kl_divergence(Normal(mu, log_std.exp()), Normal(mq, lq.exp()))
    torch.testing.assert_close(g.gaussian_kl(pi, q, s), ref, atol=1e-5, rtol=1e-5)


def _naive_loss(student, teacher, s, a, gamma):
    """-1/(B T) sum_{b,t} [sum_{t'>=t} gamma^(t'-t) (log q - log pi)(t')] log pi(t), written out with loops."""
    lp = student.log_prob(s, a)
    r = (teacher.log_prob(s, a) - lp).detach()
    B, T = r.shape
    total = 0.0
    for b in range(B):
        for t in range(T):
            adv = sum(gamma ** (u - t) * r[b, u] for u in range(t, T))
            total = total - adv * lp[b, t]
    return total / (B * T)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_opd_loss_gradient_matches_naive_definition(gamma):
    torch.manual_seed(1)
    student, teacher = g.GaussianPolicy(8), g.GaussianPolicy(8)
    s, a, _ = g.rollout(student, 0, batch=3, horizon=4, gen=torch.Generator().manual_seed(2))
    loss, reward = g.opd_loss(student, teacher, s, a, gamma)
    got = torch.autograd.grad(loss, list(student.parameters()))
    ref = torch.autograd.grad(_naive_loss(student, teacher, s, a, gamma), list(student.parameters()))
    for x, y in zip(got, ref, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reward, (teacher.log_prob(s, a) - student.log_prob(s, a)).detach())


def test_gamma_zero_is_the_per_step_reverse_kl_gradient_in_expectation():
    """Token-level OPD (gamma = 0) is an unbiased estimate of grad sum_t KL(pi(.|s_t) || q(.|s_t)) at fixed states."""
    torch.manual_seed(3)
    student, teacher = g.GaussianPolicy(8), g.GaussianPolicy(8)
    s = g.state(0, torch.full((1,), 1.0), 3, 10).expand(200_000, 3).reshape(200_000, 1, 3)
    mu, log_std = student(s)
    with torch.no_grad():
        a = mu + log_std.exp() * torch.randn_like(mu)
    loss, _ = g.opd_loss(student, teacher, s, a, 0.0)
    est = torch.autograd.grad(loss, [student.out.bias])[0]
    exact = torch.autograd.grad(g.gaussian_kl(student, teacher, s[:1]).sum(), [student.out.bias])[0]
    torch.testing.assert_close(est, exact, atol=0.05 * exact.abs().max().item() + 1e-3, rtol=0.05)


def test_output_grad_variance_matches_naive():
    torch.manual_seed(4)
    student, teacher = g.GaussianPolicy(8), g.GaussianPolicy(8)
    s, a, _ = g.rollout(student, 1, batch=16, horizon=5, gen=torch.Generator().manual_seed(5))
    got = g.output_grad_variance(student, teacher, s, a, 0.5, micro=4)
    grads = []
    for i in range(4):
        loss, _ = g.opd_loss(student, teacher, s[4 * i : 4 * i + 4], a[4 * i : 4 * i + 4], 0.5)
        gw, gb = torch.autograd.grad(loss, [student.out.weight, student.out.bias])
        grads.append(torch.cat([gw.flatten(), gb.flatten()]).double())
    ref = torch.stack(grads).var(0, unbiased=True).sum().item()
    assert got == pytest.approx(ref, rel=1e-6)
    assert got > 0


def test_short_teacher_training_and_distillation_step():
    cfg = g.ToyConfig(
        horizon=8,
        hidden=16,
        batch=32,
        teacher_iters=40,
        student_iters=4,
        variance_every=2,
        eval_batch=32,
        micro=8,
        snapshots=(2,),
    )
    teacher = g.train_teacher(0, cfg, seed=0)
    _, _, x = g.rollout(teacher, 0, 64, cfg.horizon, torch.Generator().manual_seed(0))
    assert (x[:, -1] - g.TARGET[0]).abs().mean() < abs(g.START[0] - g.TARGET[0])  # it moved towards -3
    out = g.distill(
        [teacher, g.train_teacher(1, g.ToyConfig(**{**cfg.__dict__, "teacher_iters": 1}), 0)],
        0.5,
        cfg,
        seed=0,
    )
    assert out["curve"]["iter"] == [0, 2]
    assert set(out["visitation"]) == {2, "final"}
    assert all(v > 0 and math.isfinite(v) for v in out["curve"]["variance"])
    assert set(out["final"]) == {"kl", "final_distance"} and out["final"]["kl"] >= 0
    hist = g.visitation(lambda k: out["student"], cfg, seed=0, bins=12)
    assert hist.shape == (12, cfg.horizon + 1)
    # every trajectory of both tasks counted at every step
    assert torch.all(hist.sum(0) == 2 * cfg.eval_batch)
    assert torch.all(out["visitation"][2].sum(0) == 2 * cfg.eval_batch)


def test_run_writes_table_and_plots(tmp_path):
    cfg = g.ToyConfig(
        horizon=6,
        hidden=8,
        batch=16,
        teacher_iters=3,
        student_iters=4,
        variance_every=2,
        eval_batch=16,
        micro=4,
        snapshots=(2,),
    )
    res = g.run([0, 1], (0.0, 1.0), cfg, tmp_path)
    assert [r["gamma"] for r in res["table"]] == [0.0, 1.0]
    assert set(res["runs"]) == {"seed0/gamma0.0", "seed0/gamma1.0", "seed1/gamma0.0", "seed1/gamma1.0"}
    for name in ("variance.png", "heatmaps_seed0.png", "heatmaps_seed1.png", "table.md", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| teachers |" in (tmp_path / "table.md").read_text()


def test_gamma_table_format():
    rows = [{"gamma": 0.0, "variance_mean": (2.0, 0.5), "kl": (0.1, 0.01), "final_distance": (0.2, 0.0)}]
    table = g.gamma_table(rows, [0.1, 0.3])
    assert "| 0 | 2 ± 0.5 | 0.100 ± 0.010 | 0.20 ± 0.00 |" in table
    assert "| teachers | – | 0 | 0.20 ± 0.14 |" in table
