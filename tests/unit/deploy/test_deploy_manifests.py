"""Deployment manifests: the kustomize overlays render and every object validates against Kubernetes' own
schemas; docker-compose.yml validates against the Compose Specification; and nothing has drifted from the
typed config classes: ports, service names, environment variables, TOML keys and secret files in compose
and Kubernetes are read back through the config classes and the real container entrypoint, and checked
against each other (a worker must reach the teacher on the port the teacher listens on, and so on).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml

from experiments.toy.prepare import ToyConfig, ToyPaths
from launcher.cli import COMMANDS
from launcher.cli import main as opd_main
from services.common.config import ConfigError, add_arguments, build_config, env_name
from services.common.redis_keys import REDIS_PASSWORD_FILE_ENV, redis_password
from services.rollout.config import WEIGHTS_TOKEN_ENV, RolloutConfig
from services.teacher.config import TeacherConfig
from services.teacher.metrics import TeacherMetrics
from services.worker.config import WorkerConfig
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE_SCHEMA = DEPLOY / "schema" / "compose-spec.json"
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
OVERLAYS = ("cpu-dev", "gpu-prod")
# Every overlay, the multitask and teacher-only ones included (tests/unit/deploy/test_deploy_multitask.py,
# the teacher-only tests below): what the checks of all overlays run over.
ALL_OVERLAYS = ("cpu-dev", "gpu-prod", "multitask-gpu", "teacher-only")
# Objects of CRDs (Prometheus Operator, Gateway API): kubernetes-validate has no schema for them.
CRD_KINDS = {"PodMonitor", "GRPCRoute"}
PROFILES = {"cpu": "cpu-dev", "gpu": "gpu-prod"}  # compose profile -> the overlay whose opd.toml it mounts
CONFIG_CLASSES: dict[tuple[str, ...], type] = {
    ("teacher", "serve"): TeacherConfig,
    ("rollout", "serve"): RolloutConfig,
    ("rollout", "work"): WorkerConfig,
    ("train",): TrainerConfig,
    ("toy", "prepare"): ToyConfig,
}
COMPONENT = {
    ("teacher", "serve"): "teacher",
    ("rollout", "serve"): "rollout",
    ("rollout", "work"): "worker",
    ("train",): "trainer",
    ("toy", "prepare"): "toy-prepare",
}
PROCESSES = {"teacher", "rollout", "worker", "trainer"}
# Per deployment, the config file's sections: one per process, and cpu-dev's toy preparation.
SECTIONS = {"cpu-dev": {"teacher", "rollout", "worker", "trainer", "toy"}, "gpu-prod": PROCESSES}
IMAGE_TARGETS = {
    "opd-teacher": "teacher",
    "opd-rollout": "rollout",
    "opd-worker": "worker",
    "opd-trainer": "trainer",
}
CONFIG_MOUNT = "/etc/opd/opd.toml"
SECRETS_DIR = "/run/secrets/opd"
SECRET_KEYS = {"teacher_token", "weights_token", "redis_password"}
WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]"}
# Variables the manifests may set that are not `<ENV_PREFIX><FIELD>`: read by opd-entrypoint, by code, by
# opd-healthcheck, or by the Hugging Face libraries (the hub token, the shared model cache's settings).
EXTRA_ENV = {
    REDIS_PASSWORD_FILE_ENV,
    WEIGHTS_TOKEN_ENV,
    "OPD_HEALTHCHECK_TLS_CA_FILE",
    "OPD_HEALTHCHECK_TLS_SERVER_NAME",
    "HF_TOKEN",
    "HF_HUB_OFFLINE",
    "HF_MODULES_CACHE",
}
# The one variable that comes from a Secret by reference (huggingface_hub reads it from the environment);
# optional, so that a Secret without the key still starts every pod.
HF_TOKEN_REF = {"secretKeyRef": {"name": "opd-secrets", "key": "hf_token", "optional": True}}
REDIS_PORT = 6379
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: cannot render kustomize"
)


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"opd_deploy_{name}", DEPLOY / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


entrypoint = _load_script("entrypoint")
model_cache = _load_script("model_cache")


# ---------------------------------------------------------------- reading the manifests


@functools.cache
def image_entrypoints() -> dict[str, list[str]]:
    """Dockerfile stage name -> its ENTRYPOINT (exec form)."""
    out, stage = {}, None
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd.upper() == "FROM":
            stage = cmd.value[2] if len(cmd.value) == 3 and cmd.value[1].upper() == "AS" else cmd.value[0]
        elif cmd.cmd.upper() == "ENTRYPOINT":
            assert cmd.json, f"stage {stage}: ENTRYPOINT must use the exec (JSON) form"
            out[stage] = list(cmd.value)
    return out


@functools.cache
def _rendered(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.load_all(out, Loader=yaml.CSafeLoader) if d]


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects, as `kubectl apply -k` would send them (a fresh copy per call)."""
    return copy.deepcopy(_rendered(overlay))


def find(objs: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def find_prefixed(objs: list[dict], kind: str, name: str) -> dict:
    """A generated object (ConfigMap/Secret) whose name carries kustomize's hash suffix."""
    matches = [
        o for o in objs if o["kind"] == kind and re.fullmatch(f"{name}(-[a-z0-9]+)?", o["metadata"]["name"])
    ]
    assert len(matches) == 1, f"expected one {kind} {name}-<hash>, found {len(matches)}"
    return matches[0]


def compose_interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose variable interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""
    pattern = re.compile(
        r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
    )

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2) or m.group(5), m.group(3), m.group(4)
        unset = name not in env or (op is not None and op.startswith(":") and env[name] == "")
        if not unset:
            return env[name]
        if op in (":?", "?"):
            raise ValueError(f"${{{name}}} is required: {arg}")
        return arg if op in (":-", "-") else ""

    if isinstance(value, str):
        return pattern.sub(one, value)
    if isinstance(value, list):
        return [compose_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: compose_interpolate(v, env) for k, v in value.items()}
    return value


@functools.cache
def _compose_raw() -> dict[str, Any]:
    return yaml.load(COMPOSE_FILE.read_text(), Loader=yaml.CSafeLoader)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml after YAML merge keys and interpolation (as `docker compose config` sees it)."""
    return compose_interpolate(_compose_raw(), env or {})


def compose_services(doc: dict, profile: str) -> dict[str, dict]:
    return {n: s for n, s in doc["services"].items() if not s.get("profiles") or profile in s["profiles"]}


@dataclass
class Proc:
    """One `opd` container of a deployment, as its process will see itself."""

    where: str
    name: str  # k8s workload / compose service name
    component: str  # teacher | rollout | worker | trainer | (other, e.g. toy-prepare)
    argv: list[str]  # entrypoint + arguments
    command: tuple[str, ...]  # the `opd` command, e.g. ("rollout", "work")
    args: list[str]  # after the command
    env: dict[str, str]
    ports: set[int]  # container ports it declares
    secret_files: set[str]  # files under /run/secrets/opd it gets
    toml_text: str | None  # the file mounted at CONFIG_MOUNT
    spec: dict  # the k8s container (or compose service)
    pod: dict | None = None  # the k8s pod spec


def split_opd(argv: list[str], where: str) -> tuple[tuple[str, ...], list[str]]:
    assert argv and argv[0] == "opd-entrypoint", f"{where}: {argv} does not start through opd-entrypoint"
    assert "opd" in argv, f"{where}: {argv} runs no `opd` command"
    rest = argv[argv.index("opd") + 1 :]
    for n in (2, 1):
        if tuple(rest[:n]) in COMMANDS:
            return tuple(rest[:n]), rest[n:]
    raise AssertionError(f"{where}: `opd {' '.join(rest[:2])}` is not a command of launcher/cli.py")


def k8s_procs(overlay: str) -> list[Proc]:
    objs = render(overlay)
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    procs = []
    for obj in objs:
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = obj["spec"]["template"]["spec"]
        if obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "model-download":
            continue  # opd-model-cache on the teacher image, no `opd` process (test_model_cache_is_shared)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            image = c["image"].split(":")[0].rsplit("/", 1)[-1]
            if image not in IMAGE_TARGETS:
                continue
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            argv = list(c.get("command") or image_entrypoints()[IMAGE_TARGETS[image]]) + list(
                c.get("args", [])
            )
            command, args = split_opd(argv, where)
            env = {}
            for e in c.get("env", []):
                if e["name"] == "HF_TOKEN":
                    ref = copy.deepcopy(e["valueFrom"])
                    ref["secretKeyRef"]["name"] = re.sub(r"-[a-z0-9]{10}$", "", ref["secretKeyRef"]["name"])
                    assert ref == HF_TOKEN_REF, f"{where}: HF_TOKEN must be {HF_TOKEN_REF}"
                    continue
                assert "value" in e, f"{where}: env {e['name']} must be a plain value (secrets come as files)"
                env[e["name"]] = e["value"]
            secret_files, toml_text = set(), None
            for m in c.get("volumeMounts", []):
                v = volumes[m["name"]]
                if "secret" in v:
                    name = v["secret"]["secretName"]
                    if "items" in v["secret"]:
                        keys = {item["path"] for item in v["secret"]["items"]}
                    else:
                        keys = set(secrets[name]["data"]) if name in secrets else set(SECRET_KEYS)
                    secret_files |= {f"{m['mountPath']}/{k}" for k in keys}
                if "configMap" in v and m["mountPath"] == str(Path(CONFIG_MOUNT).parent):
                    toml_text = configmaps[v["configMap"]["name"]]["data"][Path(CONFIG_MOUNT).name]
            procs.append(
                Proc(
                    where=where,
                    name=obj["metadata"]["name"],
                    component=obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"],
                    argv=argv,
                    command=command,
                    args=args,
                    env=env,
                    ports={p["containerPort"] for p in c.get("ports", [])},
                    secret_files=secret_files,
                    toml_text=toml_text,
                    spec=c,
                    pod=pod,
                )
            )
    return procs


def _container_port(spec: str) -> int:
    """The container side of a compose short port spec ("127.0.0.1:50051-50058:50051" -> 50051)."""
    return int(str(spec).split("/")[0].rsplit(":", 1)[-1].split("-")[0])


def compose_procs(profile: str) -> list[Proc]:
    doc = compose()
    procs = []
    for name, svc in compose_services(doc, profile).items():
        image = svc.get("image", "").split(":")[0]
        if image not in IMAGE_TARGETS:
            continue
        where = f"compose --profile {profile}: {name}"
        target = svc["build"]["target"]
        assert IMAGE_TARGETS[image] == target, f"{where}: image {image} is built from target {target}"
        argv = list(svc.get("entrypoint") or image_entrypoints()[target]) + list(svc.get("command") or [])
        command, args = split_opd(argv, where)
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{where}: write `environment` as a mapping"
        secret_files = set()
        for s in svc.get("secrets", []):
            secret_files.add(s["target"] if isinstance(s, dict) else f"/run/secrets/{s}")
        toml_text = None
        for c in svc.get("configs", []):
            if isinstance(c, dict) and c.get("target") == CONFIG_MOUNT:
                toml_text = (ROOT / doc["configs"][c["source"]]["file"]).read_text()
        procs.append(
            Proc(
                where=where,
                name=name,
                component=COMPONENT.get(command, name),
                argv=argv,
                command=command,
                args=args,
                env={k: str(v) for k, v in env.items()},
                ports={_container_port(p) for p in svc.get("ports", [])},
                secret_files=secret_files,
                toml_text=toml_text,
                spec=svc,
            )
        )
    return procs


def deployment_procs(target: str) -> list[Proc]:
    return compose_procs(target.split(":")[1]) if target.startswith("compose:") else k8s_procs(target)


TARGETS = [pytest.param(o, marks=needs_kubectl) for o in OVERLAYS] + [f"compose:{p}" for p in PROFILES]


# ---------------------------------------------------------------- effective configs


def stand_in_value(key: str) -> str:
    """A distinct, URL-safe value for each secret key."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def stand_in_secrets(tmp_path: Path) -> dict[str, Path]:
    """Local files standing in for the mounted secrets: container path -> local file."""
    files = {}
    for key in sorted(SECRET_KEYS):
        path = tmp_path / "secrets" / key
        path.parent.mkdir(exist_ok=True)
        path.write_text(stand_in_value(key) + "\n")
        files[f"{SECRETS_DIR}/{key}"] = path
    return files


def effective_config(proc: Proc, secret_files: dict[str, Path]) -> Any:
    """The config `proc` builds in its container: flags over the environment after opd-entrypoint over the
    mounted TOML section, with the secret files it references checked to be mounted."""
    cls = CONFIG_CLASSES[proc.command]
    parser = argparse.ArgumentParser(prog=" ".join(proc.command))
    add_arguments(parser, cls)
    ns, unknown = parser.parse_known_args(proc.args)
    assert not unknown, f"{proc.where}: flags {unknown} are not fields of {cls.__name__}"
    cli = vars(ns)
    assert str(cli.pop("config")) == CONFIG_MOUNT, f"{proc.where}: must run with --config {CONFIG_MOUNT}"
    assert proc.toml_text is not None, f"{proc.where}: nothing is mounted at {CONFIG_MOUNT}"

    def local(where: str, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(SECRETS_DIR + "/"):
            assert value in proc.secret_files, f"{proc.where}: {where} = {value!r}, which is not mounted"
            return str(secret_files[value])
        return value

    section = tomllib.loads(proc.toml_text).get(cls.SECTION, {})
    section = {k: local(f"[{cls.SECTION}] {k}", v) for k, v in section.items()}
    env = container_env(proc, secret_files)
    return build_config(cls, section, env=env, cli=cli)


def container_env(proc: Proc, secret_files: dict[str, Path]) -> dict[str, str]:
    """`proc`'s environment after opd-entrypoint, with the secret file paths it names checked to be mounted
    and mapped to the stand-in files."""

    def local(where: str, value: str) -> str:
        if value.startswith(SECRETS_DIR + "/"):
            assert value in proc.secret_files, f"{proc.where}: {where} = {value!r}, which is not mounted"
            return str(secret_files[value])
        return value

    is_file = lambda k: k.endswith(entrypoint.FROM_FILE_SUFFIX) or k == REDIS_PASSWORD_FILE_ENV  # noqa: E731
    env = {k: local(k, v) if is_file(k) else v for k, v in proc.env.items()}
    return entrypoint.resolve_environment(env)


@pytest.fixture(params=TARGETS)
def deployment(request, tmp_path) -> tuple[str, dict[str, Proc], dict[str, Any]]:
    """(target, component -> Proc, component -> effective config) for one overlay or compose profile."""
    secrets = stand_in_secrets(tmp_path)
    procs = {p.component: p for p in deployment_procs(request.param) if p.command in CONFIG_CLASSES}
    assert PROCESSES <= set(procs) <= PROCESSES | {"toy-prepare"}, f"{request.param}: {sorted(procs)}"
    return request.param, procs, {c: effective_config(p, secrets) for c, p in procs.items()}


# ---------------------------------------------------------------- networking: who reaches what


def k8s_network(overlay: str) -> dict[str, tuple[str, dict[int, int], bool]]:
    """Service name -> (component it selects, service port -> container port, headless)."""
    objs = render(overlay)
    pods = {}
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            pods[o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]] = o
    net = {}
    for svc in (o for o in objs if o["kind"] == "Service"):
        component = svc["spec"]["selector"]["app.kubernetes.io/component"]
        named = {
            p["name"]: p["containerPort"]
            for c in pods[component]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        ports = {}
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            ports[p["port"]] = named[target] if isinstance(target, str) else target
        net[svc["metadata"]["name"]] = (component, ports, svc["spec"].get("clusterIP") == "None")
    return net


def compose_network(profile: str) -> dict[str, tuple[str, None, bool]]:
    """Name (service or alias) -> (component, None = every container port, DNS lists every replica)."""
    net = {}
    for proc in compose_procs(profile):
        aliases = ((proc.spec.get("networks") or {}).get("default") or {}).get("aliases", [])
        for name in [proc.name, *aliases]:
            assert name not in net, f"compose --profile {profile}: {name} names two services"
            net[name] = (proc.component, None, True)
    for name, svc in compose_services(compose(), profile).items():
        if svc.get("image", "").startswith("redis:"):
            net[name] = ("redis", None, True)
    return net


def reaches(target: str, host: str, port: int) -> tuple[str, int, bool]:
    """(component, container port, headless) that `host:port` reaches inside the deployment."""
    if target.startswith("compose:"):
        net = compose_network(target.split(":")[1])
        assert host in net, f"{target}: no service or alias named {host!r}"
        component, _, headless = net[host]
        return component, port, headless
    net = k8s_network(target)
    assert host in net, f"{target}: no Service named {host!r}"
    component, ports, headless = net[host]
    assert port in ports, f"{target}: Service {host} has no port {port} (has {sorted(ports)})"
    return component, ports[port], headless


def grpc_target_host_port(target: str) -> tuple[str, int]:
    """("teacher", 50051) from "dns:///teacher:50051" or "teacher:50051"."""
    address = target.removeprefix("dns:///").removeprefix("dns:")
    host, _, port = address.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------- validation


def validate_objects(objs: list[dict], where: str) -> None:
    """Every object against Kubernetes' own schemas; CRD objects (no schema there) by their API group."""
    version = kubernetes_validate.latest_version()
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            group = {"PodMonitor": "monitoring.coreos.com/v1", "GRPCRoute": "gateway.networking.k8s.io/v1"}
            assert obj["apiVersion"] == group[obj["kind"]], f"{where}: {obj['kind']}"
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{where}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version}: {e}"
            )


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay) -> None:
    objs = render(overlay)
    assert len(objs) >= 15
    validate_objects(objs, overlay)
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    assert namespaces == {"opd-dev" if overlay == "cpu-dev" else "opd"}


@needs_kubectl
def test_kubernetes_validation_rejects_a_broken_object() -> None:
    """The validator is live: a typo'd field and a wrongly typed one are both caught."""
    version = kubernetes_validate.latest_version()
    teacher = find(render("cpu-dev"), "Deployment", "teacher")
    typo = copy.deepcopy(teacher)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    wrong = copy.deepcopy(teacher)
    wrong["spec"]["replicas"] = "two"
    for obj in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(obj, version, strict=True)


def test_vendored_compose_schema_is_the_recorded_one() -> None:
    assert hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest() == COMPOSE_SCHEMA_SHA256
    assert COMPOSE_SCHEMA_SHA256 in (DEPLOY / "schema" / "README.md").read_text()
    assert (DEPLOY / "schema" / "LICENSE.compose-spec").is_file()


@functools.cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("env", [{}, {"OPD_TEACHER_REPLICAS": "3", "OPD_TRAINER_GPU_IDS": "2,3,4,5,6,7"}])
def test_compose_validates_against_the_compose_spec(env) -> None:
    errors = sorted(compose_validator().iter_errors(compose(env)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_validation_rejects_a_broken_file() -> None:
    doc = compose()
    doc["services"]["teacher"]["deploy"]["replicaz"] = 2
    doc["services"]["redis"]["healthcheck"]["retries"] = [5]
    assert len(list(compose_validator().iter_errors(doc))) >= 2


def test_compose_profiles_and_persistence() -> None:
    doc = compose({"OPD_TEACHER_REPLICAS": "3"})
    services = doc["services"]
    assert sorted(services["redis"]["profiles"]) == sorted(PROFILES), "Redis runs with the pipeline profiles"
    redis_cmd = " ".join(services["redis"]["entrypoint"])
    assert "--appendonly yes" in redis_cmd, "Redis must persist with AOF"
    assert "--maxmemory 3gb --maxmemory-policy noeviction" in redis_cmd
    assert "--requirepass" not in redis_cmd and "redis-cli -a" not in str(services["redis"]["healthcheck"])
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for profile in PROFILES:
        components = sorted(p.component for p in compose_procs(profile))
        expected = sorted(PROCESSES | ({"toy-prepare"} if profile == "cpu" else set()))
        assert components == expected, profile
    # CPU teachers scale by replicas; GPU services reserve GPUs by index (checked in test_compose_gpus_*).
    assert services["teacher"]["deploy"]["replicas"] == "3"
    for name in ("teacher-gpu", "rollout-gpu", "trainer-gpu"):
        assert "replicas" not in services[name]["deploy"], f"{name}: copies would share its GPUs"
    for name in ("teacher", "rollout", "worker", "trainer"):
        assert "deploy" not in services[name] or "resources" not in services[name]["deploy"], name
    # Secrets come from files, never inline.
    assert doc["secrets"] and all(set(s) == {"file"} for s in doc["secrets"].values())
    assert {Path(s["file"]).name for s in doc["secrets"].values()} == SECRET_KEYS


# ---------------------------------------------------------------- no drift between manifests and configs


def test_toml_files_have_exactly_the_process_sections() -> None:
    assert {cls.SECTION for cls in CONFIG_CLASSES.values()} == SECTIONS["cpu-dev"]
    for overlay in OVERLAYS:
        data = tomllib.loads((DEPLOY / "k8s" / "overlays" / overlay / "opd.toml").read_text())
        assert set(data) == SECTIONS[overlay], overlay


# Settings a deployment decides for itself (addresses, paths, secrets, ports); all others are the run's.
DEPLOYMENT_KEYS = {
    "host",
    "port",
    "metrics_port",
    "token",
    "token_file",
    "weights_token_file",
    "redis_url",
    "teacher",
    "rollout_url",
    "rollout_urls",
    "prompts",
    "eval_file",
    "checkpoint_dir",
    "log_dir",
    "shared_weights_dir",
    "push_mode",
    "resume",
    "resume_from",
    "weights_dir",
    "progress",
    "concurrency",
}


def test_gpu_prod_runs_the_paper_configuration() -> None:
    """gpu-prod's opd.toml is configs/paper_math.toml plus deployment settings, nothing else changed."""
    paper = tomllib.loads((ROOT / "configs" / "paper_math.toml").read_text())
    prod = tomllib.loads((DEPLOY / "k8s" / "overlays" / "gpu-prod" / "opd.toml").read_text())
    for section, values in paper.items():
        for key, value in values.items():
            if key not in DEPLOYMENT_KEYS:
                got = prod.get(section, {}).get(key)
                assert got == value, (
                    f"[{section}] {key}: gpu-prod has {got!r}, configs/paper_math.toml {value!r}"
                )


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_is_generated_from_the_cli_config_file(overlay) -> None:
    cm = find_prefixed(render(overlay), "ConfigMap", "opd-config")
    assert cm["data"] == {"opd.toml": (DEPLOY / "k8s" / "overlays" / overlay / "opd.toml").read_text()}
    # compose mounts the very same file in the matching profile.
    profile = next(p for p, o in PROFILES.items() if o == overlay)
    texts = {p.toml_text for p in compose_procs(profile) if p.command in CONFIG_CLASSES}
    assert texts == {cm["data"]["opd.toml"]}
    # Each process of the overlay reads its section from it (toy-prepare included).
    sections = {CONFIG_CLASSES[p.command].SECTION for p in k8s_procs(overlay) if p.command in CONFIG_CLASSES}
    assert sections == SECTIONS[overlay]


def unknown_env(proc: Proc) -> list[str]:
    """Variables `proc` sets that are neither `<ENV_PREFIX><FIELD>` (or its `_FROM_FILE`) nor EXTRA_ENV."""
    cls = CONFIG_CLASSES[proc.command]
    fields = {env_name(cls, f.name) for f in dataclasses.fields(cls)}
    return [
        n
        for n in proc.env
        if n.removesuffix(entrypoint.FROM_FILE_SUFFIX) not in fields and n not in EXTRA_ENV
    ]


def test_environment_names_are_config_fields(deployment) -> None:
    target, procs, _ = deployment
    for proc in procs.values():
        assert not unknown_env(proc), f"{proc.where}: {unknown_env(proc)} are not fields of the config class"


def test_drift_checks_catch_a_rename(tmp_path) -> None:
    """The checks above are live: a renamed variable, TOML key, secret path or port is reported."""
    secrets = stand_in_secrets(tmp_path)
    worker = next(p for p in compose_procs("cpu") if p.component == "worker")
    effective_config(worker, secrets)  # the unchanged one builds

    renamed_env = copy.deepcopy(worker)
    renamed_env.env["OPD_WORKER_REDIS_URI"] = renamed_env.env.pop("OPD_WORKER_REDIS_URL")
    assert unknown_env(renamed_env) == ["OPD_WORKER_REDIS_URI"]

    renamed_key = copy.deepcopy(worker)
    renamed_key.toml_text = renamed_key.toml_text.replace("metrics_port =", "metric_port =")
    with pytest.raises(ConfigError, match="unknown key 'metric_port'"):
        effective_config(renamed_key, secrets)

    unmounted = copy.deepcopy(worker)
    unmounted.secret_files.discard(f"{SECRETS_DIR}/teacher_token")
    with pytest.raises(AssertionError, match="not mounted"):
        effective_config(unmounted, secrets)

    if KUBECTL is not None:
        with pytest.raises(AssertionError, match="has no port 50052"):
            reaches("cpu-dev", "teacher", 50052)


def test_ports_match_the_configs(deployment) -> None:
    target, procs, cfgs = deployment
    teacher, rollout, worker = cfgs["teacher"], cfgs["rollout"], cfgs["worker"]
    for name in ("teacher", "rollout"):
        assert cfgs[name].host in WILDCARD_HOSTS, f"{target}: {name} binds {cfgs[name].host}, unreachable"
    assert teacher.metrics_port > 0 and worker.metrics_port > 0, (
        f"{target}: autoscaling needs teacher metrics"
    )
    expected = {"teacher": {teacher.port, teacher.metrics_port}, "rollout": {rollout.port}}
    if not target.startswith("compose:"):
        expected["worker"] = {worker.metrics_port}
    for name, ports in expected.items():
        if target.startswith("compose:"):
            assert procs[name].ports <= ports, (
                f"{target}: {name} publishes {procs[name].ports}, serves {ports}"
            )
        else:
            assert procs[name].ports == ports, (
                f"{target}: {name} declares {procs[name].ports}, serves {ports}"
            )
    # Images document the same ports (EXPOSE), whatever the deployment.
    exposed = {}
    stage = None
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd.upper() == "FROM":
            stage = cmd.value[-1]
        elif cmd.cmd.upper() == "EXPOSE":
            exposed[stage] = {int(p.split("/")[0]) for p in cmd.value}
    assert exposed.get("teacher") == expected["teacher"]
    assert exposed.get("rollout") == expected["rollout"]
    assert exposed.get("worker") == {worker.metrics_port}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_scraping_use_the_configured_ports(overlay, tmp_path) -> None:
    secrets = stand_in_secrets(tmp_path)
    procs = {p.component: p for p in k8s_procs(overlay) if p.command in CONFIG_CLASSES}
    teacher_cfg = effective_config(procs["teacher"], secrets)
    rollout_cfg = effective_config(procs["rollout"], secrets)
    worker_cfg = effective_config(procs["worker"], secrets)

    t = procs["teacher"].spec
    # opd-healthcheck probes the port the teacher's config names, over TLS when the config has TLS
    # (tests/unit/deploy/test_deploy_images.py runs it against a real TLS teacher).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert t[probe]["exec"]["command"] == ["opd-healthcheck"], f"{overlay}: teacher {probe}"
        assert t[probe]["timeoutSeconds"] >= 10, f"{overlay}: teacher {probe} starts a Python process"
    assert t["startupProbe"]["periodSeconds"] * t["startupProbe"]["failureThreshold"] >= 900
    # The pod leaves DNS (preStop) and then drains for grace_s, all within the termination grace period.
    pod = procs["teacher"].pod
    pre_stop = t["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + teacher_cfg.grace_s + 5
    assert teacher_cfg.max_connection_age_s > 0, "clients only see new teacher pods if connections age out"

    r = procs["rollout"].spec
    named = {p["name"]: p["containerPort"] for p in r["ports"]}
    assert r["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert r["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert named.get(r[probe]["httpGet"]["port"], r[probe]["httpGet"]["port"]) == rollout_cfg.port

    objs = render(overlay)
    annotations = {
        c: o["spec"]["template"]["metadata"].get("annotations", {})
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet")
        for c in [o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]]
    }
    assert annotations["teacher"]["prometheus.io/port"] == str(teacher_cfg.metrics_port)
    assert annotations["rollout"]["prometheus.io/port"] == str(rollout_cfg.port)
    assert annotations["worker"]["prometheus.io/port"] == str(worker_cfg.metrics_port)


def test_processes_reach_each_other(deployment, tmp_path) -> None:
    """Every address a process dials leads to the right process, on the port that process listens on."""
    target, procs, cfgs = deployment
    secrets = stand_in_secrets(tmp_path)
    teacher, rollout, worker, trainer = (cfgs[c] for c in ("teacher", "rollout", "worker", "trainer"))

    for address in worker.teacher:
        assert address.startswith("dns:///"), f"{target}: {address}: use dns:/// so every replica is balanced"
        host, port = grpc_target_host_port(address)
        component, container_port, headless = reaches(target, host, port)
        assert (component, container_port) == ("teacher", teacher.port), f"{target}: worker -> {address}"
        assert headless, f"{target}: {host} must be headless so that DNS lists every teacher pod"
    for url in [worker.rollout_url, *trainer.rollout_urls]:
        u = urlsplit(url)
        assert reaches(target, u.hostname, u.port)[:2] == ("rollout", rollout.port), f"{target}: {url}"
    for name, cfg in (("worker", worker), ("trainer", trainer)):
        u = urlsplit(cfg.redis_url)
        assert reaches(target, u.hostname, u.port)[:2] == ("redis", REDIS_PORT), f"{target}: {name} redis"
        # the password comes from the secret file, never from the URL
        assert u.password is None, f"{target}: {name}: the Redis URL must not carry the password"
        password = redis_password(container_env(procs[name], secrets))
        assert password == stand_in_value("redis_password"), (
            f"{target}: {name} must use the redis_password secret"
        )

    # Tokens: each pair of ends reads the same secret.
    assert worker.teacher_token == teacher.bearer_token() == stand_in_value("teacher_token"), target
    assert trainer.resolve_token() == rollout.resolve_token() == stand_in_value("weights_token"), target


def test_toy_task_is_where_the_processes_look(deployment) -> None:
    """cpu deployments: the models and files toy-prepare makes are the ones the processes load."""
    target, procs, cfgs = deployment
    if "toy-prepare" not in cfgs:
        assert target in ("gpu-prod", "compose:gpu")
        return
    toy = ToyPaths(Path(cfgs["toy-prepare"].out))
    assert cfgs["teacher"].model == str(toy.teacher)
    assert cfgs["rollout"].model == cfgs["trainer"].model == str(toy.student)
    assert cfgs["worker"].prompts == str(toy.train) and cfgs["trainer"].eval_file == str(toy.eval)
    if target.startswith("compose:"):
        for name in ("teacher", "rollout"):
            condition = procs[name].spec["depends_on"]["toy-prepare"]["condition"]
            assert condition == "service_completed_successfully", f"{target}: {name}"
    else:
        for name in PROCESSES:
            (init,) = procs[name].pod["initContainers"]
            assert str(toy.meta) in " ".join(init["command"]), f"{target}: {name} must wait for meta.json"


def test_process_settings_agree(deployment) -> None:
    """Settings two processes must share: one stream, a support the records can hold, scorable lengths."""
    target, _, cfgs = deployment
    teacher, rollout, worker, trainer = (cfgs[c] for c in ("teacher", "rollout", "worker", "trainer"))
    assert worker.run == trainer.run, f"{target}: the worker writes a stream the trainer does not read"
    assert worker.support == trainer.support, target
    assert trainer.top_k <= worker.top_k <= teacher.max_top_k, target
    assert rollout.max_model_len and rollout.max_model_len <= teacher.max_sequence_tokens, (
        f"{target}: the rollout can produce sequences the teacher refuses"
    )
    assert trainer.resume, f"{target}: a restarted trainer must resume from its checkpoint"


# ---------------------------------------------------------------- Kubernetes objects


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_teacher_scales_independently(overlay) -> None:
    objs = render(overlay)
    teacher = find(objs, "Deployment", "teacher")
    service = find(objs, "Service", "teacher")
    assert service["spec"]["clusterIP"] == "None"
    labels = teacher["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = find(objs, "PodDisruptionBudget", "teacher")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = find(objs, "HorizontalPodAutoscaler", "teacher")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "teacher"}
    (metric,) = hpa["spec"]["metrics"]
    gauges = {m.name for m in TeacherMetrics().registry.collect()}
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in gauges
    assert metric["pods"]["metric"]["name"] == "opd_teacher_queue_depth"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_and_redis(overlay) -> None:
    objs = render(overlay)

    def sources(policy: str) -> set[str]:
        spec = find(objs, "NetworkPolicy", policy)["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        return {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for rule in spec["ingress"]
            for peer in rule["from"]
        }

    assert sources("rollout") == {"trainer", "worker"}
    assert sources("redis") == {"trainer", "worker"}
    # Only the trainer gets the weight-update token among the rollout's clients.
    mounted = {p.component: p.secret_files for p in k8s_procs(overlay)}
    assert f"{SECRETS_DIR}/weights_token" in mounted["trainer"]
    assert f"{SECRETS_DIR}/weights_token" not in mounted["worker"]

    redis = find(objs, "StatefulSet", "redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "redis-data"
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    args = " ".join(c["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    # The password reaches Redis through a file, never a command line or a variable.
    assert "requirepass" not in args and "-a " not in str(c["readinessProbe"]) and not c.get("env")
    assert f"{SECRETS_DIR}/redis_password" in c["command"][2]
    assert any(p["containerPort"] == REDIS_PORT for p in c["ports"])


@needs_kubectl
def test_secrets_dev_generated_prod_external() -> None:
    dev = render("cpu-dev")
    secret = find_prefixed(dev, "Secret", "opd-secrets")
    assert set(secret["data"]) == SECRET_KEYS
    prod = render("gpu-prod")
    assert not [o for o in prod if o["kind"] == "Secret"], "production secrets must not come from the repo"
    names = {
        v["secret"]["secretName"]
        for o in prod
        if o["kind"] in ("Deployment", "StatefulSet", "Job")
        for v in o["spec"]["template"]["spec"].get("volumes", [])
        if "secret" in v
    }
    assert names == {"opd-secrets"}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_restricted(overlay) -> None:
    for obj in render(overlay):
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = obj["spec"]["template"]["spec"]
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["automountServiceAccountToken"] is False, where
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
        gpus = {
            c["name"]: c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            for c in pod["containers"]
        }
        if overlay == "gpu-prod" and obj["metadata"]["name"] in ("teacher", "rollout", "trainer"):
            assert all(gpus.values()), f"{where}: no GPU"
        else:
            assert not any(gpus.values()), f"{where}: unexpected GPU"


# ---------------------------------------------------------------- every container command exists


def all_container_commands() -> list[tuple[str, tuple[str, ...]]]:
    found = [(p.where, p.command) for profile in PROFILES for p in compose_procs(profile)]
    if KUBECTL is not None:
        found += [(p.where, p.command) for overlay in OVERLAYS for p in k8s_procs(overlay)]
    return found


@pytest.mark.parametrize("command", sorted({c for _, c in all_container_commands()}), ids=" ".join)
def test_container_commands_exist_in_the_cli(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        opd_main([*command, "--help"])
    assert exit_info.value.code == 0, f"opd {' '.join(command)} --help failed"
    assert "usage:" in capsys.readouterr().out


# ---------------------------------------------------------------- scaling, Redis memory, model cache


def _mem_bytes(value: str) -> int:
    """Redis (2gb, 256mb) or Kubernetes (3Gi, 512Mi) memory quantities in bytes."""
    m = re.fullmatch(r"(\d+)(gb|mb|Gi|Mi)", value)
    assert m, value
    return int(m.group(1)) * {"gb": 1 << 30, "mb": 1 << 20, "Gi": 1 << 30, "Mi": 1 << 20}[m.group(2)]


def worker_samples_in_flight(worker: WorkerConfig) -> int:
    """The most samples (one teacher Score call each) a worker has in flight (services/worker/loop.py)."""
    if worker.max_tokens_in_flight == 0:
        return worker.concurrency * worker.group_size
    return max(1, worker.max_tokens_in_flight // (worker.max_new_tokens + 1))


def record_bytes(worker: WorkerConfig) -> int:
    """The largest experience record: G samples of max_new_tokens positions, each with K top-K entries of
    8 bytes (int32 id + float32 logprob) and 12 bytes of per-position arrays."""
    return worker.group_size * worker.max_new_tokens * (worker.top_k * 8 + 12)


@needs_kubectl
@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_the_autoscaler_owns_the_teacher_replicas(overlay) -> None:
    """No `replicas` on a Deployment an HPA scales (every apply would reset it); Prometheus Operator scrapes
    the teachers where the overlay has it (PodMonitor on the metrics port)."""
    objs = render(overlay)
    for hpa in (o for o in objs if o["kind"] == "HorizontalPodAutoscaler"):
        target = find(objs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], f"{overlay}: {target['metadata']['name']} fights its HPA"
    monitors = [o for o in objs if o["kind"] == "PodMonitor"]
    assert bool(monitors) == (overlay != "cpu-dev"), overlay
    for monitor in monitors:
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
        for d in (o for o in objs if o["kind"] == "Deployment"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            selected = monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
            assert selected == (labels["app.kubernetes.io/component"] == "teacher"), d["metadata"]["name"]
            if selected:
                (c,) = d["spec"]["template"]["spec"]["containers"]
                assert "metrics" in {p["name"] for p in c["ports"]}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_can_reach_max_replicas(overlay, tmp_path) -> None:
    """The HPA asks for ceil(Q / target) pods when Q Score calls wait over the teachers; Q is at most the
    worker's samples in flight, so maxReplicas is reachable only if target x (maxReplicas - 1) < that
    bound; and the target must be below what one teacher admits (max_queue)."""
    secrets = stand_in_secrets(tmp_path)
    procs = {p.component: p for p in k8s_procs(overlay) if p.command in CONFIG_CLASSES}
    worker = effective_config(procs["worker"], secrets)
    teacher = effective_config(procs["teacher"], secrets)
    hpa = find(render(overlay), "HorizontalPodAutoscaler", "teacher")
    (metric,) = hpa["spec"]["metrics"]
    target = int(metric["pods"]["target"]["averageValue"])
    assert worker.max_tokens_in_flight > 0, f"{overlay}: set max_tokens_in_flight explicitly"
    assert worker.max_tokens_in_flight >= worker.group_size * worker.max_new_tokens, overlay
    samples = worker_samples_in_flight(worker)
    assert target * (hpa["spec"]["maxReplicas"] - 1) < samples, (
        f"{overlay}: {samples} samples in flight can never ask for {hpa['spec']['maxReplicas']} teachers"
    )
    assert target < teacher.max_queue, overlay


@needs_kubectl
@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu-prod", "multitask-gpu"])
def test_redis_memory_holds_the_backlog(overlay, tmp_path) -> None:
    """maxmemory (noeviction) holds every stream's max_backlog records of the largest size, and the
    container's memory limit holds maxmemory."""
    import tests.unit.deploy.test_deploy_multitask as mt

    secrets = stand_in_secrets(tmp_path)
    config = mt.task_config if overlay == mt.OVERLAY else effective_config
    workers = [config(p, secrets) for p in k8s_procs(overlay) if p.command == ("rollout", "work")]
    streams = sum(w.max_backlog * record_bytes(w) for w in workers)
    (c,) = find(render(overlay), "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    maxmemory = _mem_bytes(args[args.index("--maxmemory") + 1])
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert streams <= maxmemory / 2, (
        f"{overlay}: streams take {streams / 1e6:.0f} MB of {maxmemory / 1e6:.0f}"
    )
    limit = _mem_bytes(c["resources"]["limits"]["memory"])
    assert _mem_bytes(c["resources"]["requests"]["memory"]) == limit >= maxmemory, overlay


@needs_kubectl
def test_redis_container_script_keeps_the_password_off_the_command_line(tmp_path) -> None:
    """Runs Redis's container command (from the render) with a real redis-server: the password from the
    secret file is required, maxmemory is set, and no process's command line carries the password."""
    import redis as redis_lib

    from services.common.redis_server import free_port

    (c,) = find(render("gpu-prod"), "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    secret_dir, run_dir, data = tmp_path / "secrets", tmp_path / "run", tmp_path / "data"
    for d in (secret_dir, run_dir, data):
        d.mkdir()
    (secret_dir / "redis_password").write_text("s3cret-pw\n")
    script = c["command"][2].replace(SECRETS_DIR, str(secret_dir)).replace("/run/redis", str(run_dir))
    args = [str(data) if a == "/data" else a for a in c["args"]]
    port = free_port()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    proc = subprocess.Popen(
        [*c["command"][:2], script, c["command"][3], *args, "--port", str(port), "--save", ""],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis_lib.Redis(port=port, password="s3cret-pw", socket_connect_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis_lib.ConnectionError:
                assert proc.poll() is None, "redis-server exited"
                time.sleep(0.1)
        assert client.config_get("maxmemory")["maxmemory"] == str(2 << 30)
        with pytest.raises(redis_lib.AuthenticationError):
            redis_lib.Redis(port=port).ping()
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"s3cret-pw" not in cmdline and b"redis-server" in cmdline
        assert (run_dir / "auth.conf").stat().st_mode & 0o077 == 0, "the config file is the owner's only"
    finally:
        proc.terminate()
        proc.wait(10)


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu-prod", "multitask-gpu", "teacher-only"])
def test_model_cache_is_shared(overlay, tmp_path, monkeypatch) -> None:
    """Every teacher reads HF_HOME from the one ReadWriteMany claim, read-only and offline; the download
    Job writes it and downloads every teacher model the config names; the hub token is optional."""
    objs = render(overlay)
    claim = find(objs, "PersistentVolumeClaim", "opd-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    teachers = [
        o
        for o in objs
        if o["kind"] == "Deployment"
        and o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "teacher"
    ]
    assert teachers
    for d in teachers:
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/cache/huggingface"]
        assert mount["readOnly"] is True, d["metadata"]["name"]
        assert set(volumes[mount["name"]]) == {"name", "persistentVolumeClaim"}
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "opd-model-cache"
        env = {e["name"]: e for e in c["env"]}
        assert (
            env["HF_HUB_OFFLINE"]["value"] == "1" and env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"]
        )
    job = find(objs, "Job", "model-download")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/cache/huggingface"]
    assert not mount.get("readOnly") and volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == (
        "opd-model-cache"
    )
    # Each teacher pod waits in an init container for the models the Job marks ready, on the same claim.
    for d in teachers:
        pod = d["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["command"] == ["opd-model-cache", "wait", "--config", CONFIG_MOUNT]
        mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
        assert mounts["/cache/huggingface"]["readOnly"] is True
        pod_volumes = {v["name"]: v for v in pod["volumes"]}
        assert pod_volumes[mounts["/cache/huggingface"]["name"]]["persistentVolumeClaim"] == {
            "claimName": "opd-model-cache",
            "readOnly": True,
        }
    # The Job, run on the overlay's config with snapshot_download recorded: each teacher's model, marked.
    assert c["command"] == ["opd-model-cache", "fill", "--config", CONFIG_MOUNT]
    cm = find_prefixed(objs, "ConfigMap", "opd-config")["data"]["opd.toml"]
    (tmp_path / "opd.toml").write_text(cm)
    downloaded: list[str] = []
    hub = type(sys)("huggingface_hub")
    hub.snapshot_download = lambda model: downloaded.append(model) or str(tmp_path)
    hub.list_repo_files = lambda model: ["opd.toml"]  # a file the fake snapshot (tmp_path) holds
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert model_cache.main(["fill", "--config", str(tmp_path / "opd.toml")]) == 0
    served = set()
    for d in teachers:
        (tc,) = d["spec"]["template"]["spec"]["containers"]
        override = {e["name"]: e.get("value") for e in tc.get("env", [])}.get("OPD_TEACHER_MODEL")
        served.add(override or tomllib.loads(cm)["teacher"]["model"])
    # what the init container waits for is exactly what the Job marked: it returns without a poll
    assert model_cache.wait(model_cache.teacher_models(tomllib.loads(cm)), sleep=pytest.fail) == 0
    assert set(downloaded) == served, overlay


# ---------------------------------------------------------------- a teacher alone


@needs_kubectl
def test_teacher_only_overlay() -> None:
    """The teacher component alone: no pipeline object and no data claim; a ClusterIP Service and a
    GRPCRoute reach the teacher's gRPC port; the config has the [teacher] section only."""
    objs = render("teacher-only")
    validate_objects(objs, "teacher-only")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert not {n for k, n in kinds if n in ("redis", "rollout", "worker", "trainer")}
    assert {n for k, n in kinds if k == "PersistentVolumeClaim"} == {"opd-model-cache"}
    assert {o["metadata"]["namespace"] for o in objs} == {"opd-teacher"}
    teacher = find(objs, "Deployment", "teacher")
    pod = teacher["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"opd-model-cache"}
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    grpc_port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
    service = find(objs, "Service", "teacher-grpc")
    assert service["spec"]["type"] == "ClusterIP" and service["spec"].get("clusterIP") != "None"
    assert service["spec"]["selector"].items() <= teacher["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "grpc" and port["appProtocol"] == "grpc"
    route = find(objs, "GRPCRoute", "teacher")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": "teacher-grpc", "port": port["port"]}]
    assert {"service": "opd.teacher.v1.TeacherService"} in [m["method"] for m in rule["matches"]]
    cm = find_prefixed(objs, "ConfigMap", "opd-config")["data"]["opd.toml"]
    assert set(tomllib.loads(cm)) == {"teacher"}
    cfg = build_config(TeacherConfig, tomllib.loads(cm)["teacher"], env={}, cli={})
    assert cfg.port == grpc_port and cfg.host in WILDCARD_HOSTS
    assert cfg.token_file and cfg.token_file.startswith(SECRETS_DIR)
    # the same teacher as gpu-prod's
    prod = tomllib.loads((DEPLOY / "k8s" / "overlays" / "gpu-prod" / "opd.toml").read_text())["teacher"]
    assert tomllib.loads(cm)["teacher"] == prod


def test_compose_teacher_profile_binds_where_asked() -> None:
    for env, bind in (({}, "127.0.0.1"), ({"OPD_TEACHER_BIND": "0.0.0.0"}, "0.0.0.0")):
        services = compose_services(compose(env), "teacher")
        assert set(services) == {"teacher-solo"}, "a teacher alone: no Redis, no pipeline"
        (spec,) = services["teacher-solo"]["ports"]
        assert spec == f"{bind}:50051:50051"
        for name in ("teacher", "teacher-gpu"):
            assert all(p.startswith(f"{bind}:") for p in compose(env)["services"][name]["ports"]), name
    (solo,) = compose_procs("teacher")
    assert solo.toml_text == (DEPLOY / "k8s" / "overlays" / "teacher-only" / "opd.toml").read_text()
    assert "teacher" in solo.spec["networks"]["default"]["aliases"]
    assert not any(v.startswith("opd-data") for v in solo.spec["volumes"]), "needs no data volume"


def compose_gpus(doc: dict, profile: str) -> dict[str, set[str]]:
    """Service -> the GPU indices it reserves (device_ids; `count` would give every service GPU 0)."""
    out = {}
    for name, svc in compose_services(doc, profile).items():
        for d in svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
            assert "count" not in d and d["driver"] == "nvidia", f"{name}: reserve GPUs by device_ids"
            out[name] = {i for ids in d["device_ids"] for i in str(ids).split(",")}
    return out


@pytest.mark.parametrize("extra", [None, "more-teachers.yml", "multitask-gpu.yml"])
def test_compose_gpus_are_disjoint(extra, monkeypatch) -> None:
    """Each GPU service of the gpu profile gets its own GPUs by index, with the files' defaults and when
    the variables move them; more teachers are more services, each answering to `teacher`."""
    import tests.unit.deploy.test_deploy_multitask as mt

    raw = _compose_raw()
    if extra:
        raw = mt.merge_compose(
            raw, yaml.load((DEPLOY / "compose" / extra).read_text(), Loader=yaml.CSafeLoader)
        )
    for env in ({}, {"OPD_TEACHER_GPU": "7", "OPD_ROLLOUT_GPU": "6", "OPD_TRAINER_GPU_IDS": "0,1,2,3"}):
        doc = compose_interpolate(raw, env)
        assert not list(compose_validator().iter_errors(doc))
        gpus = compose_gpus(doc, "gpu")
        assert {"teacher-gpu", "rollout-gpu", "trainer-gpu"} <= set(gpus)
        if env:
            assert gpus["teacher-gpu"] == {"7"} and gpus["trainer-gpu"] == {"0", "1", "2", "3"}
        elif extra:
            used = [i for g in gpus.values() for i in g]
            assert len(used) == len(set(used)), f"{extra}: two services share a GPU: {gpus}"
        if not env:
            assert len(gpus["trainer-gpu"]) == 4
    if extra == "more-teachers.yml":
        doc = compose_interpolate(raw, {})
        teachers = [
            n
            for n, s in compose_services(doc, "gpu").items()
            if "teacher" in ((s.get("networks") or {}).get("default") or {}).get("aliases", [])
        ]
        assert len(teachers) == 3
