"""Bounded soak of the whole pipeline: two teacher replicas, rollout service, worker, trainer, Redis.

    .venv/bin/python bench/soak.py                      # 3 minutes on the cached toy models (runs/toy)
    .venv/bin/python bench/soak.py --duration 600 --out runs/soak-long

Every service runs as its own `python -m launcher.cli ...` process, as deployed: redis-server (AOF,
appendfsync always, the production setting of docs/reliability.md), `opd teacher serve` x2, `opd rollout
serve`, `opd train` (pushing weights to the rollout service after every batch) and `opd rollout work`
spreading its Score calls over both replicas. After `--warmup` seconds (model loads, allocator warm-up)
the soak window starts; every `--sample` seconds it records each process's RSS (VmRSS from
/proc/<pid>/status) and the Prometheus counters.

Reported (table, `<out>/soak.json`, `<out>/rss.png`):
- records/s written by the worker and trained by the trainer over the window;
- p50/p99 Score latency from the teachers' own histograms (`opd_teacher_request_latency_seconds`, both
  replicas merged) and from the worker's client-side histogram (`opd_worker_score_seconds`, which includes
  the network and the client's failover), interpolated inside the histogram buckets;
- RSS of every process at the window's start and end, its growth and its least-squares slope (MiB/min).
  Target: no growth beyond noise (|growth| < 10% and < 50 MiB for every process).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "proto")]

from launcher.cli_proc import CliProc  # noqa: E402
from services.common.redis_server import EmbeddedRedis, free_port  # noqa: E402

console = Console(width=130)
RUN = "soak"
GROWTH_TARGET = (0.10, 50.0)  # relative, MiB: both must be exceeded to call it growth


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scrape(url: str) -> dict[str, list]:
    """Prometheus text from `url` as {sample name: [(labels, value), ...]}."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def buckets(samples: dict[str, list], name: str, **labels: str) -> dict[float, float]:
    """Cumulative bucket counts {upper bound: count}, summed over series that match `labels`."""
    out: dict[float, float] = {}
    for lab, v in samples.get(f"{name}_bucket", []):
        if all(lab.get(k) == x for k, x in labels.items()):
            le = float(lab["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def quantile(cum_start: dict[float, float], cum_end: dict[float, float], q: float) -> float:
    """q-quantile of the observations made between two snapshots of a cumulative histogram, linear inside
    the bucket (as PromQL's histogram_quantile); nan when there were none."""
    bounds = sorted(cum_end)
    counts = [cum_end[b] - cum_start.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for b, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if b == float("inf"):
                return prev_bound
            return prev_bound + (b - prev_bound) * (rank - prev_count) / max(c - prev_count, 1e-12)
        prev_bound, prev_count = b, c
    return bounds[-2] if len(bounds) > 1 else float("nan")


def slope_mib_per_min(ts: list[float], ys: list[float]) -> float:
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


class Child(CliProc):
    """A named service process, started at once, with a fresh log `<log_dir>/<name>.log`."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None):
        super().__init__(args, log_dir / f"{name}.log", env)
        self.name = name
        self.log_path.unlink(missing_ok=True)
        self.start()

    def check(self) -> None:
        if not self.alive:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 60.0) -> None:
        self.terminate(timeout)


def wait_for(cond, timeout: float, what: str, children: list[Child]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except (httpx.HTTPError, OSError, grpc.RpcError):
            pass
        for c in children:
            c.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.5)


def teacher_serving(address: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def committed_records(ckpt_dir: Path, key: str = "records") -> int:
    """Records the trainer committed as trained (`records`) or dropped as stale (`stale_records`)."""
    path = ckpt_dir / "commits.jsonl"
    if not path.exists():
        return 0
    return sum(len(json.loads(line)[key]) for line in path.read_text().splitlines() if line.strip())


def accounting(redis: EmbeddedRedis, ckpt_dir: Path, worker_log: Path) -> dict[str, int]:
    """After the stop: every record the worker wrote is trained, dropped stale, dead-lettered or still in
    the stream (the trainer stops mid-stream); `lost` must be 0."""
    import re

    from services.common.redis_keys import connect, dead_letter_stream, experience_stream

    r = connect(redis.url)
    done = re.findall(r"done: records=(\d+)", worker_log.read_text())
    out = dict(
        written=int(done[-1]) if done else -1,
        trained=committed_records(ckpt_dir),
        stale=committed_records(ckpt_dir, "stale_records"),
        dead=int(r.xlen(dead_letter_stream(RUN))),
        in_stream=int(r.xlen(experience_stream(RUN))),
    )
    out["lost"] = out["written"] - out["trained"] - out["stale"] - out["dead"] - out["in_stream"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=180.0, help="soak window, seconds (after the warm-up)")
    ap.add_argument("--warmup", type=float, default=45.0, help="seconds of running before the window starts")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--models", default="runs/toy/models", help="directory with teacher/ and student/")
    ap.add_argument("--prompts", default="runs/toy/data/train.jsonl")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="trainer sequences per batch")
    ap.add_argument("--concurrency", type=int, default=4, help="worker prompts in flight")
    ap.add_argument("--out", default="runs/soak")
    args = ap.parse_args()

    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)
    ckpt_dir = out / "checkpoints"
    for stale_dir in (ckpt_dir, out / "redis"):  # a fresh run: no checkpoints, no stream left from before
        if stale_dir.exists():
            shutil.rmtree(stale_dir)
    models = (REPO / args.models).resolve()
    if not (models / "teacher").is_dir() and args.models == ap.get_default("models"):
        # A fresh clone: make the toy models first, as `make demo` would (cached afterwards).
        from experiments.toy.prepare import ToyConfig, prepare
        from services.common.config import load_section

        prepare(load_section(ToyConfig, REPO / "configs/demo.toml", out=str(REPO / "runs/toy")))
    teacher_ports, teacher_mports = [free_port(), free_port()], [free_port(), free_port()]
    rollout_port, worker_mport = free_port(), free_port()
    rollout_url = f"http://127.0.0.1:{rollout_port}"
    children: list[Child] = []
    redis = EmbeddedRedis(data_dir=out / "redis", appendonly=True, appendfsync="always")
    redis.start()
    try:
        for i in range(2):
            children.append(
                Child(
                    f"teacher{i}",
                    [
                        "teacher",
                        "serve",
                        "--model",
                        str(models / "teacher"),
                        "--device",
                        "cpu",
                        "--port",
                        str(teacher_ports[i]),
                        "--metrics-port",
                        str(teacher_mports[i]),
                    ],
                    log_dir,
                )
            )
        children.append(
            Child(
                "rollout",
                [
                    "rollout",
                    "serve",
                    "--model",
                    str(models / "student"),
                    "--device",
                    "cpu",
                    "--port",
                    str(rollout_port),
                    "--insecure-no-token",
                    "--resume-from",
                    str(ckpt_dir),
                    "--log-level",
                    "warning",
                ],
                log_dir,
            )
        )
        addresses = [f"127.0.0.1:{p}" for p in teacher_ports]
        for a in addresses:
            wait_for(lambda a=a: teacher_serving(a), 300, f"teacher {a}", children)
        wait_for(
            lambda: httpx.get(f"{rollout_url}/readyz", timeout=2).status_code == 200, 300, "rollout", children
        )
        trainer_flags = dict(
            model=models / "student",
            device="cpu",
            redis_url=redis.url,
            run=RUN,
            batch_size=args.batch_size,
            mini_batch_size=args.batch_size,
            top_k=args.top_k,
            max_policy_lag=2,
            lr=3e-4,
            max_seq_len=128,
            checkpoint_dir=ckpt_dir,
            checkpoint_every=1,
            keep_checkpoints=1,
            push_every=1,
            rollout_urls=rollout_url,
            diagnostics_every=0,
        )
        trainer_args = ["train", "--no-tensorboard", "--no-progress"]
        for k, v in trainer_flags.items():
            trainer_args += ["--" + k.replace("_", "-"), str(v)]
        children.append(Child("trainer", trainer_args, log_dir))
        children.append(
            Child(
                "worker",
                [
                    "rollout",
                    "work",
                    "--run",
                    RUN,
                    "--redis-url",
                    redis.url,
                    "--rollout-url",
                    rollout_url,
                    "--teacher",
                    ",".join(addresses),
                    "--prompts",
                    str(REPO / args.prompts),
                    "--tokenizer",
                    str(models / "student"),
                    "--verifier",
                    "toy_arith",
                    "--group-size",
                    str(args.group_size),
                    "--max-new-tokens",
                    str(args.max_new_tokens),
                    "--top-k",
                    str(args.top_k),
                    "--concurrency",
                    str(args.concurrency),
                    "--max-backlog",
                    "16",
                    "--metrics-port",
                    str(worker_mport),
                ],
                log_dir,
            )
        )
        pids = {c.name: c.proc.pid for c in children} | {"redis": redis.proc.pid}
        worker_url = f"http://127.0.0.1:{worker_mport}/metrics"
        teacher_urls = [f"http://127.0.0.1:{p}/metrics" for p in teacher_mports]

        def snapshot() -> dict:
            for c in children:
                c.check()
            teachers = [scrape(u) for u in teacher_urls]
            worker = scrape(worker_url)
            return dict(
                t=time.monotonic(),
                rss={name: rss_mib(pid) for name, pid in pids.items()},
                written=value(worker, "opd_worker_records_total"),
                trained=committed_records(ckpt_dir),
                stale=committed_records(ckpt_dir, "stale_records"),
                teacher_ok=[value(s, "opd_teacher_requests_total", code="OK") for s in teachers],
                teacher_errors=sum(
                    v
                    for s in teachers
                    for lab, v in s.get("opd_teacher_requests_total", [])
                    if lab["code"] != "OK"
                ),
                server_hist=[buckets(s, "opd_teacher_request_latency_seconds", code="OK") for s in teachers],
                client_hist=buckets(worker, "opd_worker_score_seconds"),
            )

        samples: list[dict] = []
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TimeRemainingColumn(), console=console
        ) as progress:
            warm = progress.add_task("warm-up", total=args.warmup)
            t0 = time.monotonic()
            wait_for(
                lambda: value(scrape(worker_url), "opd_worker_records_total") > 0,
                600,
                "first record",
                children,
            )
            while (el := time.monotonic() - t0) < args.warmup:
                progress.update(warm, completed=el)
                for c in children:
                    c.check()
                time.sleep(1.0)
            progress.update(warm, completed=args.warmup)
            soak = progress.add_task("soak", total=args.duration)
            start = time.monotonic()
            while True:
                samples.append(snapshot())
                el = time.monotonic() - start
                progress.update(soak, completed=min(el, args.duration))
                if el >= args.duration:
                    break
                time.sleep(min(args.sample, args.duration - el + 0.01))
    finally:
        for c in reversed(children):  # the worker first, the teachers last
            c.stop()
    try:
        counts = accounting(redis, ckpt_dir, log_dir / "worker.log")
    finally:
        redis.close()
    report(samples, args, out, counts)


def merge(hists: list[dict[float, float]]) -> dict[float, float]:
    out: dict[float, float] = {}
    for h in hists:
        for b, v in h.items():
            out[b] = out.get(b, 0.0) + v
    return out


def report(samples: list[dict], args, out: Path, counts: dict[str, int]) -> None:
    first, last = samples[0], samples[-1]
    dt = last["t"] - first["t"]
    server_a, server_b = merge(first["server_hist"]), merge(last["server_hist"])
    result = {
        "duration_s": dt,
        "warmup_s": args.warmup,
        "records_written": last["written"] - first["written"],
        "records_trained": last["trained"] - first["trained"],
        "records_stale": last["stale"] - first["stale"],
        "whole_run": counts,
        "records_per_s": (last["written"] - first["written"]) / dt,
        "trained_per_s": (last["trained"] - first["trained"]) / dt,
        "score_calls_per_replica": [
            b - a for a, b in zip(first["teacher_ok"], last["teacher_ok"], strict=True)
        ],
        "teacher_errors": last["teacher_errors"] - first["teacher_errors"],
        "score_p50_s_server": quantile(server_a, server_b, 0.50),
        "score_p99_s_server": quantile(server_a, server_b, 0.99),
        "score_p50_s_client": quantile(first["client_hist"], last["client_hist"], 0.50),
        "score_p99_s_client": quantile(first["client_hist"], last["client_hist"], 0.99),
        "rss_mib": {},
    }
    ts = [s["t"] - first["t"] for s in samples]
    ok = True
    for name in first["rss"]:
        ys = [s["rss"][name] for s in samples]
        growth = ys[-1] - ys[0]
        grew = growth > GROWTH_TARGET[0] * ys[0] and growth > GROWTH_TARGET[1]
        ok &= not grew
        result["rss_mib"][name] = dict(
            start=ys[0],
            end=ys[-1],
            max=max(ys),
            growth=growth,
            slope_per_min=slope_mib_per_min(ts, ys),
            grew=grew,
        )
    result["rss_ok"] = ok
    (out / "soak.json").write_text(
        json.dumps(result | {"series": {"t": ts, "rss": [s["rss"] for s in samples]}}, indent=1)
    )

    table = Table(title=f"soak: {dt:.0f} s window after {args.warmup:.0f} s warm-up (2 teacher replicas)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row(
        "records/s written (worker)", f"{result['records_per_s']:.2f}  ({result['records_written']:.0f})"
    )
    table.add_row(
        "records/s trained (commit log)", f"{result['trained_per_s']:.2f}  ({result['records_trained']})"
    )
    table.add_row("records dropped stale (window)", f"{result['records_stale']}")
    c = counts
    table.add_row(
        "whole run: written = trained + stale + dead + left in stream",
        f"{c['written']} = {c['trained']} + {c['stale']} + {c['dead']} + {c['in_stream']}",
    )
    table.add_row("whole run: records lost", f"{'[green]' if c['lost'] == 0 else '[red]'}{c['lost']}")
    table.add_row(
        "Score calls per replica", " / ".join(f"{c:.0f}" for c in result["score_calls_per_replica"])
    )
    table.add_row("Score errors (non-OK)", f"{result['teacher_errors']:.0f}")
    table.add_row(
        "Score p50 / p99, server",
        f"{result['score_p50_s_server'] * 1e3:.0f} / {result['score_p99_s_server'] * 1e3:.0f} ms",
    )
    table.add_row(
        "Score p50 / p99, worker",
        f"{result['score_p50_s_client'] * 1e3:.0f} / {result['score_p99_s_client'] * 1e3:.0f} ms",
    )
    console.print(table)
    rss = Table(title="RSS (MiB) over the window; target: no growth beyond noise (>10% and >50 MiB)")
    for col in ("process", "start", "end", "max", "growth", "slope/min", "verdict"):
        rss.add_column(col, justify="left" if col == "process" else "right")
    for name, r in result["rss_mib"].items():
        rss.add_row(
            name,
            f"{r['start']:.0f}",
            f"{r['end']:.0f}",
            f"{r['max']:.0f}",
            f"{r['growth']:+.1f}",
            f"{r['slope_per_min']:+.2f}",
            "[red]GREW" if r["grew"] else "[green]flat",
        )
    console.print(rss)
    plot(ts, samples, out / "rss.png")
    console.print(f"wrote {out / 'soak.json'} and {out / 'rss.png'}")


def plot(ts: list[float], samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in samples[0]["rss"]:
        ax.plot(ts, [s["rss"][name] for s in samples], label=name, marker=".")
    ax.set_xlabel("seconds into the soak window")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("RSS of every pipeline process")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
