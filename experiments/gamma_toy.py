"""`opd experiment gamma-toy`: the paper's appendix C toy, on CPU in a few minutes, no language model.

Environment: two mirrored 1-D continuous-control tasks over T steps,

    task 0: x_0 = +2, target -3          task 1: x_0 = -2, target +3
    x_{t+1} = clip(x_t + STEP * clip(a_t, -1, 1), -X_MAX, X_MAX)     a_t ~ N(mu(s_t), sigma(s_t)^2)
    s_t = (task id in {-1, +1}, x_t / X_MAX, t / T)          (the policy's input)

Policy: an MLP 3 -> 64 -> 64 -> 2 (mean, log std clamped to [-1, 1]) with tanh, 4,546 parameters, a Gaussian over a_t.
Teachers: one per task, trained with REINFORCE on the dense reward -|x_{t+1} - target| (batch-mean baseline
per step). Student: one shared policy distilled on-policy, the task alternating every iteration: B
student trajectories, per-step reward r_t = log q(a_t | s_t) - log pi(a_t | s_t) (reverse-KL, detached),
advantage A_t = sum_{t' >= t} gamma^(t'-t) r_t' (trainer.losses.discounted_returns), loss
-mean_{b,t} A_t log pi(a_t | s_t). gamma = 0 is token-level OPD, gamma = 1 the sequence-level estimator.

Gradient variance (C.2): each iteration's B = 64 trajectories are split into M = 8 micro-batches; the
gradient of the same loss w.r.t. the output layer is computed per micro-batch; we report the total
variance across micro-batches (trainer.metrics.GradientVariance: trace of the covariance).

Outputs under `--out` (runs/experiments/gamma-toy): variance.png (variance and KL over training, one line
per gamma, mean +- std over seeds: Figure 1), heatmaps_seed<s>.png (state visitation (t, x) of the
teachers and of each gamma's student, both tasks: Figures A1-A3), results.json, table.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from trainer.losses import discounted_returns
from trainer.metrics import GradientVariance

START = (2.0, -2.0)
TARGET = (-3.0, 3.0)
STEP = 0.5
A_MAX = 1.0  # actions are clipped: the trip to the target takes >= 10 of the T = 20 steps
X_MAX = 6.0
LOG_STD_MIN, LOG_STD_MAX = -1.0, 1.0
GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class ToyConfig:
    horizon: int = 20
    hidden: int = 64
    batch: int = 64  # B trajectories per iteration
    micro: int = 8  # M micro-batches for the variance estimate
    teacher_iters: int = 300
    teacher_lr: float = 3e-3
    student_iters: int = 300
    student_lr: float = 3e-3
    variance_every: int = 5
    eval_batch: int = 256
    snapshots: tuple[int, ...] = (60, 120)  # iterations whose state visitation is plotted besides the final


class GaussianPolicy(nn.Module):
    """(..., 3) state -> Gaussian over a scalar action; `out` is the output layer of the variance study."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.out = nn.Linear(hidden, 2)

    def forward(self, s: Tensor) -> tuple[Tensor, Tensor]:
        mu_log_std = self.out(self.body(s))
        return mu_log_std[..., 0], mu_log_std[..., 1].clamp(LOG_STD_MIN, LOG_STD_MAX)

    def log_prob(self, s: Tensor, a: Tensor) -> Tensor:
        mu, log_std = self(s)
        return -0.5 * ((a - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)


def state(task: int, x_B: Tensor, t: int, horizon: int) -> Tensor:
    """(B, 3) policy input of task `task` at positions x_B and step t."""
    tid = torch.full_like(x_B, -1.0 if task == 0 else 1.0)
    return torch.stack([tid, x_B / X_MAX, torch.full_like(x_B, t / horizon)], dim=-1)


def step(x_B: Tensor, a_B: Tensor) -> Tensor:
    return (x_B + STEP * a_B.clamp(-A_MAX, A_MAX)).clamp(-X_MAX, X_MAX)


@torch.no_grad()
def rollout(policy: GaussianPolicy, task: int, batch: int, horizon: int, gen: torch.Generator):
    """States (B, T, 3), actions (B, T), positions (B, T + 1) of `batch` trajectories from x_0 = START."""
    x_B = torch.full((batch,), START[task])
    states, actions, xs = [], [], [x_B]
    for t in range(horizon):
        s_B3 = state(task, x_B, t, horizon)
        mu, log_std = policy(s_B3)
        a_B = mu + log_std.exp() * torch.randn(batch, generator=gen)
        x_B = step(x_B, a_B)
        states.append(s_B3)
        actions.append(a_B)
        xs.append(x_B)
    return torch.stack(states, 1), torch.stack(actions, 1), torch.stack(xs, 1)


def train_teacher(task: int, cfg: ToyConfig, seed: int) -> GaussianPolicy:
    """REINFORCE on the dense reward -|x_{t+1} - target|, return-to-go with a per-step batch-mean baseline."""
    torch.manual_seed(seed * 100 + task)
    gen = torch.Generator().manual_seed(seed * 100 + task)
    policy = GaussianPolicy(cfg.hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.teacher_lr)
    mask_B_T = torch.ones(cfg.batch, cfg.horizon, dtype=torch.bool)
    for _ in range(cfg.teacher_iters):
        s_B_T_3, a_B_T, x_B_T1 = rollout(policy, task, cfg.batch, cfg.horizon, gen)
        reward_B_T = -(x_B_T1[:, 1:] - TARGET[task]).abs()
        ret_B_T = discounted_returns(reward_B_T, mask_B_T, 1.0)
        adv_B_T = ret_B_T - ret_B_T.mean(0, keepdim=True)
        loss = -(adv_B_T * policy.log_prob(s_B_T_3, a_B_T)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.eval()


def opd_loss(
    student: GaussianPolicy, teacher: GaussianPolicy, s_B_T_3: Tensor, a_B_T: Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    """(loss, reward (B, T)): the discounted OPD policy gradient surrogate of this batch."""
    lp_B_T = student.log_prob(s_B_T_3, a_B_T)
    with torch.no_grad():
        reward_B_T = teacher.log_prob(s_B_T_3, a_B_T) - lp_B_T.detach()
    adv_B_T = discounted_returns(reward_B_T, torch.ones_like(reward_B_T, dtype=torch.bool), gamma)
    return -(adv_B_T * lp_B_T).mean(), reward_B_T


def output_grad_variance(
    student: GaussianPolicy, teacher: GaussianPolicy, s_B_T_3: Tensor, a_B_T: Tensor, gamma: float, micro: int
) -> float:
    """Total variance of the output-layer gradient across `micro` equal micro-batches of the batch."""
    acc = GradientVariance()
    for s_m, a_m in zip(s_B_T_3.chunk(micro), a_B_T.chunk(micro), strict=True):
        loss, _ = opd_loss(student, teacher, s_m, a_m, gamma)
        grads = torch.autograd.grad(loss, [student.out.weight, student.out.bias])
        acc.add(torch.cat([g.flatten() for g in grads]))
    return acc.metrics()["grad/variance"]


def gaussian_kl(student: GaussianPolicy, teacher: GaussianPolicy, s: Tensor) -> Tensor:
    """KL(pi(.|s) || q(.|s)) per state, closed form for Gaussians."""
    mp, lp = student(s)
    mq, lq = teacher(s)
    return lq - lp + ((2 * lp).exp() + (mp - mq) ** 2) / (2 * (2 * lq).exp()) - 0.5


@torch.no_grad()
def evaluate(
    student: GaussianPolicy, teachers: list[GaussianPolicy], cfg: ToyConfig, gen
) -> dict[str, float]:
    """Per-step reverse KL to the task's teacher on the student's own states, and final distance to target."""
    kls, dists = [], []
    for task in (0, 1):
        s_B_T_3, _, x_B_T1 = rollout(student, task, cfg.eval_batch, cfg.horizon, gen)
        kls.append(float(gaussian_kl(student, teachers[task], s_B_T_3).mean()))
        dists.append(float((x_B_T1[:, -1] - TARGET[task]).abs().mean()))
    return {"kl": sum(kls) / 2, "final_distance": sum(dists) / 2}


def distill(teachers: list[GaussianPolicy], gamma: float, cfg: ToyConfig, seed: int) -> dict:
    """Alternating-task OPD of a fresh shared student: curves, final metrics, the final student, and the
    state visitation at `cfg.snapshots` and at the end ({iteration or "final": (bins, T + 1)})."""
    torch.manual_seed(10_000 + seed)  # the same initial student for every gamma of a seed
    student = GaussianPolicy(cfg.hidden)
    gen = torch.Generator().manual_seed(20_000 + seed)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.student_lr)
    curve: dict[str, list[float]] = {"iter": [], "variance": [], "kl": []}
    visits: dict = {}
    for it in range(cfg.student_iters):
        task = it % 2
        if it in cfg.snapshots:
            visits[it] = visitation(lambda k: student, cfg, seed)
        s_B_T_3, a_B_T, _ = rollout(student, task, cfg.batch, cfg.horizon, gen)
        if it % cfg.variance_every == 0:
            curve["iter"].append(it)
            curve["variance"].append(
                output_grad_variance(student, teachers[task], s_B_T_3, a_B_T, gamma, cfg.micro)
            )
            curve["kl"].append(evaluate(student, teachers, cfg, gen)["kl"])
        loss, _ = opd_loss(student, teachers[task], s_B_T_3, a_B_T, gamma)
        opt.zero_grad()
        loss.backward()
        opt.step()
    visits["final"] = visitation(lambda k: student, cfg, seed)
    final = evaluate(student, teachers, cfg, gen)
    return {"curve": curve, "final": final, "student": student.eval(), "visitation": visits}


@torch.no_grad()
def visitation(policy_for_task, cfg: ToyConfig, seed: int, bins: int = 48) -> Tensor:
    """(bins, T + 1) histogram of positions per step, both tasks' trajectories together."""
    gen = torch.Generator().manual_seed(30_000 + seed)
    hist = torch.zeros(bins, cfg.horizon + 1)
    for task in (0, 1):
        _, _, x_B_T1 = rollout(policy_for_task(task), task, cfg.eval_batch, cfg.horizon, gen)
        for t in range(cfg.horizon + 1):
            hist[:, t] += torch.histc(x_B_T1[:, t], bins=bins, min=-X_MAX, max=X_MAX)
    return hist


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(seeds: list[int], gammas: tuple[float, ...], cfg: ToyConfig, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.progress import Progress

    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": cfg.__dict__, "seeds": seeds, "runs": {}}
    curves: dict[float, list[dict]] = {g: [] for g in gammas}
    with Progress() as progress:
        task = progress.add_task("gamma toy", total=len(seeds) * (1 + len(gammas)))
        for seed in seeds:
            teachers = [train_teacher(k, cfg, seed) for k in (0, 1)]
            teacher_eval = evaluate_teachers(teachers, cfg, seed)
            progress.advance(task)
            heat = {"teachers": {"final": visitation(lambda k, ts=teachers: ts[k], cfg, seed)}}
            for gamma in gammas:
                res = distill(teachers, gamma, cfg, seed)
                curves[gamma].append(res["curve"])
                results["runs"][f"seed{seed}/gamma{gamma}"] = {
                    **res["final"],
                    "variance_mean": statistics.fmean(res["curve"]["variance"]),
                    "teacher_final_distance": teacher_eval,
                }
                heat[f"gamma={gamma:g}"] = res["visitation"]
                progress.advance(task)
            _plot_heatmaps(plt, heat, cfg, out / f"heatmaps_seed{seed}.png", f"state visitation, seed {seed}")
    _plot_variance(plt, curves, out / "variance.png")
    rows = []
    for gamma in gammas:
        per = [results["runs"][f"seed{s}/gamma{gamma}"] for s in seeds]
        rows.append(
            {
                "gamma": gamma,
                **{k: _mean_std([p[k] for p in per]) for k in ("variance_mean", "kl", "final_distance")},
            }
        )
    results["table"] = rows
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = gamma_table(
        rows, [float(results["runs"][f"seed{s}/gamma{gammas[0]}"]["teacher_final_distance"]) for s in seeds]
    )
    (out / "table.md").write_text(
        f"# opd experiment gamma-toy\n\nseeds {seeds}\n\n{table}\n![variance](variance.png)\n"
        + "".join(f"![heatmaps seed {s}](heatmaps_seed{s}.png)\n" for s in seeds)
    )
    results["markdown"] = table
    return results


@torch.no_grad()
def evaluate_teachers(teachers: list[GaussianPolicy], cfg: ToyConfig, seed: int) -> float:
    gen = torch.Generator().manual_seed(40_000 + seed)
    dists = []
    for task in (0, 1):
        _, _, x_B_T1 = rollout(teachers[task], task, cfg.eval_batch, cfg.horizon, gen)
        dists.append(float((x_B_T1[:, -1] - TARGET[task]).abs().mean()))
    return sum(dists) / 2


def gamma_table(rows: list[dict], teacher_distances: list[float]) -> str:
    """Markdown: per gamma, mean +- std over seeds of gradient variance, final KL and final distance."""
    lines = [
        "| gamma | output-layer grad variance (mean over training) | final per-step KL(pi ‖ q) | "
        "final distance to target |",
        "|---|---|---|---|",
    ]
    for r in rows:
        v, k, d = r["variance_mean"], r["kl"], r["final_distance"]
        lines.append(
            f"| {r['gamma']:g} | {v[0]:.3g} ± {v[1]:.2g} | {k[0]:.3f} ± {k[1]:.3f} | "
            f"{d[0]:.2f} ± {d[1]:.2f} |"
        )
    m, s = _mean_std(teacher_distances)
    lines.append(f"| teachers | – | 0 | {m:.2f} ± {s:.2f} |")
    return "\n".join(lines) + "\n"


def _plot_variance(plt, curves: dict[float, list[dict]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for gamma, runs in curves.items():
        xs = runs[0]["iter"]
        for ax, key in zip(axes, ("variance", "kl"), strict=True):
            vals = torch.tensor([r[key] for r in runs])  # (seeds, points)
            # geometric mean for the variance: it spans orders of magnitude
            mean = vals.log().mean(0).exp() if key == "variance" else vals.mean(0)
            (line,) = ax.plot(xs, mean, label=f"gamma={gamma:g}")
            if len(runs) > 1:
                ax.fill_between(
                    xs, vals.min(0).values, vals.max(0).values, color=line.get_color(), alpha=0.12
                )
    axes[0].set_yscale("log")
    axes[0].set_title("output-layer gradient variance (B=64, M=8)", fontsize=10)
    axes[1].set_yscale("log")
    axes[1].set_title("per-step reverse KL to the teacher", fontsize=10)
    for ax in axes:
        ax.set_xlabel("distillation iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_heatmaps(plt, heat: dict[str, dict], cfg: ToyConfig, path: Path, title: str) -> None:
    """Rows: the snapshot iterations and the end of training; columns: the teachers, then each gamma."""
    moments = [m for m in (*cfg.snapshots, "final") if any(m in h for h in heat.values())]
    fig, axes = plt.subplots(
        len(moments), len(heat), figsize=(2.5 * len(heat), 2.4 * len(moments)), sharey=True, squeeze=False
    )
    for r, moment in enumerate(moments):
        for c, (name, hists) in enumerate(heat.items()):
            ax = axes[r, c]
            h = hists.get(moment, hists.get("final"))  # the teachers do not train: one histogram
            ax.imshow(
                h.log1p(), origin="lower", aspect="auto", extent=(0, cfg.horizon, -X_MAX, X_MAX), cmap="magma"
            )
            for target in TARGET:
                ax.axhline(target, color="cyan", lw=0.6, ls="--")
            when = "end" if moment == "final" else f"iter {moment}"
            ax.set_title(name if name == "teachers" else f"{name}, {when}", fontsize=8)
            if r == len(moments) - 1:
                ax.set_xlabel("t")
        axes[r, 0].set_ylabel("position x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opd experiment gamma-toy", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--gammas", default=",".join(f"{g:g}" for g in GAMMAS))
    parser.add_argument("--teacher-iters", type=int, default=ToyConfig.teacher_iters)
    parser.add_argument("--student-iters", type=int, default=ToyConfig.student_iters)
    parser.add_argument("--out", default="runs/experiments/gamma-toy")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    gammas = tuple(float(g) for g in args.gammas.split(",") if g.strip())
    if not seeds or not gammas or any(not 0.0 <= g <= 1.0 for g in gammas):
        parser.error("--seeds and --gammas need at least one value each, gammas in [0, 1]")
    cfg = ToyConfig(teacher_iters=args.teacher_iters, student_iters=args.student_iters)
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and the machine is shared)
    t0 = time.perf_counter()
    results = run(seeds, gammas, cfg, Path(args.out))
    print(
        f"\nopd experiment gamma-toy ({time.perf_counter() - t0:.0f} s): {args.out}/table.md, variance.png, "
        f"heatmaps_seed*.png\n"
    )
    print(results["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
