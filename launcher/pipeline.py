"""`opd up`: the whole pipeline on one machine, as child processes.

    Redis (embedded unless redis_url) -> teacher replica(s) -> rollout service -> trainer -> rollout worker(s)

With tasks (`[tasks.<name>]` tables, services/common/tasks.py) every task gets its own teacher deployment
(its `teacher_model`, `teacher_replicas` processes) and its own workers (`num_workers` each, writing to
the task's stream); the rollout service and the trainer are shared.

Every child reads its own section of the same TOML file (`--config`); this driver only adds what is
dynamic (ports, URLs, the run directory, a fresh weight-update token) through the children's environment
variables, so the file alone describes the run. One rich display follows the trainer's metrics; Ctrl-C or
any child's failure stops everything (process groups, no orphans), showing the failing child's log tail.
Outputs go to `runs/<name>/`: config, logs/, metrics.jsonl, TensorBoard events, checkpoints/, plots/,
report.md.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from launcher.plans import check_task_overrides, task_workers, teacher_plans
from launcher.supervisor import Child, ChildFailed, Supervisor
from services.common.config import (
    ConfigBase,
    ConfigError,
    Layers,
    defaults,
    load,
    opt,
    read_toml_section,
    report_config_errors,
)
from services.common.logs import setup_logging
from services.common.redis_keys import REDIS_PASSWORD_ENV, redacted
from services.common.redis_server import EmbeddedRedis, free_port
from services.common.tasks import TaskConfig, load_tasks
from services.worker.config import WorkerConfig
from trainer.config import TrainerConfig

log = logging.getLogger("opd.up")


@dataclass
class PipelineConfig(ConfigBase):
    """Run the whole pipeline locally (teacher, rollout, workers, trainer, embedded Redis)."""

    SECTION: ClassVar[str] = "up"
    ENV_PREFIX: ClassVar[str] = "OPD_UP_"

    name: str = opt("demo", "run name: Redis keys opd:<name>:..., outputs under <out_dir>/<name>")
    out_dir: str = opt("runs", "parent directory of the run directory")
    redis_url: str | None = opt(None, "external Redis; unset = start an embedded redis-server (AOF on)")
    prepare_toy: bool = opt(False, "first run `opd toy prepare` with the file's [toy] section (cached)")
    prepare_toy_multi: bool = opt(
        False, "first run `opd toy prepare-multi` with the file's [toy_multi] section (cached)"
    )
    teacher_replicas: int = opt(1, "teacher service processes; workers spread requests over all of them")
    num_workers: int = opt(1, "rollout worker processes (prompt shards)")
    startup_timeout_s: float = opt(600.0, "how long a service may take to become ready")
    fresh: bool = opt(True, "delete an existing run directory first (off = keep it, e.g. to resume)")
    child_threads: int = opt(
        1,
        "torch/OpenMP threads per child process (0 = library default); on a small "
        "machine several processes with a thread per core each slow down many times",
    )

    def __post_init__(self) -> None:
        if self.teacher_replicas < 1 or self.num_workers < 1:
            raise ConfigError(
                f"teacher_replicas and num_workers must be >= 1, got "
                f"{self.teacher_replicas}, {self.num_workers}"
            )


def _grpc_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def _http_ready(url: str) -> bool:
    from services.rollout.client import RolloutClient  # imports torch: keep it off `opd up`'s start

    with RolloutClient(url, timeout_s=2, retries=0) as client:
        return client.ready()


def _opd(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


class MetricsFollower:
    """Reads new lines of the trainer's metrics.jsonl as they appear and keeps the latest values."""

    def __init__(self, path: Path):
        self.path, self.offset, self.latest, self.rows = path, 0, {}, []

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as fh:
            fh.seek(self.offset)
            for line in fh:
                if not line.endswith("\n"):
                    break
                self.offset += len(line)
                row = json.loads(line)
                self.rows.append(row)
                self.latest.update(row)


def _status_table(latest: dict, first_eval: float | None) -> Table:
    table = Table.grid(padding=(0, 2))
    cells = []
    for key, label in [
        ("loss/lsm", "loss"),
        ("loss/sampled_token", "loss"),
        ("eval/pass@1", "pass@1"),
        ("queue/backlog", "backlog"),
        ("rollout/policy_lag", "policy lag"),
        ("queue/dropped_stale", "stale"),
        ("perf/tokens_per_s", "tok/s"),
    ]:
        if key in latest:
            value = latest[key]
            cells.append(
                f"[bold]{label}[/] {value:.4g}" if isinstance(value, float) else f"[bold]{label}[/] {value}"
            )
    if first_eval is not None and "eval/pass@1" in latest:
        cells.append(f"[bold]pass@1 start[/] {first_eval:.3f}")
    for key, value in latest.items():  # per-task eval: task/<name>/eval/pass@1 or .../success_rate
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "task" and parts[3] in ("pass@1", "success_rate"):
            cells.append(f"[bold]{parts[1]} {parts[3]}[/] {value:.3f}")
    table.add_row(*cells) if cells else table.add_row("waiting for the first batch ...")
    return table


def check_sections(path: Path) -> list[TaskConfig]:
    """Cross-process consistency that no single process can check for itself; the file's tasks."""
    tasks = load_tasks(path)
    check_task_overrides(tasks)
    worker = {**defaults(WorkerConfig), **read_toml_section(path, "worker")}
    trainer = {**defaults(TrainerConfig), **read_toml_section(path, "trainer")}
    # With tasks, each task's workers and stream have their own settings: check each one.
    for values in [{**worker, **t.worker} for t in tasks] or [worker]:
        _check_worker_trainer(values, trainer)
    return tasks


def _check_worker_trainer(worker: dict, trainer: dict) -> None:
    records, per_record = int(worker["max_backlog"]), int(worker["group_size"])
    # Entries leave the stream only at the checkpoint that commits them: checkpoint_every batches stay in it.
    batch = int(trainer["batch_size"]) * int(trainer["checkpoint_every"])
    if records * per_record < batch:
        raise ConfigError(
            f"worker.max_backlog ({records} records x group_size {per_record}) must hold at "
            f"least checkpoint_every trainer batches ({batch} sequences), or the pipeline deadlocks"
        )
    if int(worker["top_k"]) < int(trainer["top_k"]):
        raise ConfigError(
            f"worker.top_k {worker['top_k']} < trainer.top_k {trainer['top_k']}: "
            "records would not carry the support the trainer needs"
        )


def start_embedded_redis(data_dir: Path) -> tuple[EmbeddedRedis, dict[str, str]]:
    """A redis-server (AOF on) with a fresh random password, and the environment that gives its clients the
    password (never argv: the process list shows argv to every user of the machine)."""
    password = secrets.token_hex(24)
    server = EmbeddedRedis(data_dir=data_dir, appendonly=True, password=password).start()
    return server, {REDIS_PASSWORD_ENV: password}


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(cfg: PipelineConfig, config_path: Path) -> int:
    console = Console()
    tasks = check_sections(config_path)
    # SIGTERM (e.g. from a job runner) takes the same clean path as Ctrl-C: children are stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    run_dir = Path(cfg.out_dir) / cfg.name
    if cfg.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_path, run_dir / "config.toml")
    trainer_section = read_toml_section(config_path, "trainer")
    max_batches = int(trainer_section.get("max_batches", 0))

    if cfg.prepare_toy:
        from experiments.toy.prepare import ToyConfig, prepare

        console.print("[bold]preparing the toy task and models[/] (cached after the first run)")
        prepare(ToyConfig(**read_toml_section(config_path, "toy")))
    if cfg.prepare_toy_multi:
        from experiments.toy.multitask import MultiToyConfig
        from experiments.toy.multitask import prepare as prepare_multi

        console.print("[bold]preparing the two-task toy models[/] (cached after the first run)")
        prepare_multi(MultiToyConfig(**read_toml_section(config_path, "toy_multi")))

    threads = (
        {}
        if not cfg.child_threads
        else {"OMP_NUM_THREADS": str(cfg.child_threads), "MKL_NUM_THREADS": str(cfg.child_threads)}
    )
    supervisor = Supervisor(run_dir / "logs", env=threads)
    redis_server = None
    token = secrets.token_urlsafe(24)  # weight-update token shared by trainer and rollout, this run only
    common = {"--config": str(config_path)}
    args = [a for kv in common.items() for a in kv]
    try:
        if cfg.redis_url:
            redis_url, redis_env = cfg.redis_url, {}
        else:
            redis_server, redis_env = start_embedded_redis(run_dir / "redis")
            redis_url = redis_server.address_url
        console.print(f"redis: {redacted(redis_url)}")

        # One teacher deployment per task ("" = the single task): its replicas' children and addresses.
        teachers: dict[str, list[tuple[Child, str]]] = {}
        for plan in teacher_plans(tasks, cfg.teacher_replicas):
            port = free_port()
            address = f"127.0.0.1:{port}"
            child = supervisor.start(
                Child(
                    plan.child_name,
                    _opd("teacher", "serve", *args),
                    env={**plan.env, "OPD_TEACHER_HOST": "127.0.0.1", "OPD_TEACHER_PORT": str(port)},
                    ready=lambda a=address: _grpc_serving(a),
                )
            )
            teachers.setdefault(plan.task, []).append((child, address))
        rollout_port = free_port()
        rollout_url = f"http://127.0.0.1:{rollout_port}"
        rollout = supervisor.start(
            Child(
                "rollout",
                _opd("rollout", "serve", *args),
                env={
                    "OPD_ROLLOUT_HOST": "127.0.0.1",
                    "OPD_ROLLOUT_PORT": str(rollout_port),
                    "OPD_WEIGHTS_TOKEN": token,
                    # a restarted (or resumed) service serves the trainer's newest committed weights
                    "OPD_ROLLOUT_RESUME_FROM": str(run_dir / "checkpoints"),
                },
                ready=lambda: _http_ready(rollout_url),
            )
        )
        with console.status("starting teacher and rollout services ..."):
            for child, _ in (c for replicas in teachers.values() for c in replicas):
                supervisor.wait_ready(child, cfg.startup_timeout_s)
            supervisor.wait_ready(rollout, cfg.startup_timeout_s)
        for task, replicas in teachers.items():
            console.print(f"teacher{f' ({task})' if task else ''}: {', '.join(a for _, a in replicas)}")
        console.print(f"rollout: {rollout_url}")

        supervisor.start(
            Child(
                "trainer",
                _opd("train", *args),
                env={
                    "OPD_TRAINER_REDIS_URL": redis_url,
                    **redis_env,
                    "OPD_TRAINER_RUN": cfg.name,
                    "OPD_TRAINER_ROLLOUT_URLS": rollout_url,
                    "OPD_WEIGHTS_TOKEN": token,
                    "OPD_TRAINER_CHECKPOINT_DIR": str(run_dir / "checkpoints"),
                    "OPD_TRAINER_LOG_DIR": str(run_dir),
                    "OPD_TRAINER_PROGRESS": "false",
                },
                finishes_run=True,
            )
        )
        for task in [t.name for t in tasks] or [""]:
            n = task_workers(tasks, task, cfg.num_workers)
            for j in range(n):
                supervisor.start(
                    Child(
                        f"worker-{task}-{j}" if task else f"worker-{j}",
                        _opd("rollout", "work", *args),
                        env={
                            "OPD_WORKER_REDIS_URL": redis_url,
                            **redis_env,
                            "OPD_WORKER_RUN": cfg.name,
                            "OPD_WORKER_ROLLOUT_URL": rollout_url,
                            "OPD_WORKER_TEACHER": ",".join(a for _, a in teachers[task]),
                            "OPD_WORKER_WORKER_INDEX": str(j),
                            "OPD_WORKER_NUM_WORKERS": str(n),
                            **({"OPD_WORKER_TASK": task} if task else {}),
                        },
                        may_finish=True,  # a worker with epochs / max_records ends before the trainer
                    )
                )

        follower = MetricsFollower(run_dir / "metrics.jsonl")
        progress = Progress(
            TextColumn("[bold]training[/]"),
            BarColumn(),
            TextColumn("batch {task.completed}" + (f"/{max_batches}" if max_batches else "")),
            TimeElapsedColumn(),
        )
        task = progress.add_task("train", total=max_batches or None)
        first_eval = None
        with Live(console=console, refresh_per_second=2) as live:
            while supervisor.check() is None:
                follower.poll()
                if first_eval is None:
                    first_eval = next((r["eval/pass@1"] for r in follower.rows if "eval/pass@1" in r), None)
                progress.update(task, completed=follower.latest.get("batch", 0))
                grid = Table.grid()
                grid.add_row(progress)
                grid.add_row(_status_table(follower.latest, first_eval))
                live.update(grid)
                time.sleep(0.5)
        follower.poll()
        console.print("[green]trainer finished[/]; stopping services")
    except ChildFailed as e:
        console.print(f"[red]pipeline failed:[/] {e}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopping services[/]")
        return 130
    finally:
        supervisor.stop_all()
        if redis_server is not None:
            redis_server.stop()

    from experiments.report import write_report

    report = write_report(run_dir)
    console.print(report.read_text(), markup=False)
    return 0


@report_config_errors("opd up")
def main(argv: list[str] | None = None) -> int:
    cfg, config_path = load_config(argv)
    setup_logging("up")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    return run(cfg, config_path)


def load_config(argv: list[str] | None) -> tuple[PipelineConfig, Path]:
    """The [up] section, and the file every child reads its own section of."""
    files: list[Path | None] = []

    def remember_file(layers: Layers) -> dict[str, Any]:
        files.append(layers.path)
        return {}

    cfg = load(PipelineConfig, argv, remember_file, prog="opd up")
    if files[0] is None:
        raise ConfigError("--config: opd up needs a config file (every service reads its section of it)")
    return cfg, files[0].resolve()
