"""Several teacher deployments: the two-task overlay deploy/k8s/overlays/multitask-gpu and the compose
override deploy/compose/multitask-gpu.yml render and validate, each task's workers reach that task's own
teacher (the model it serves is the task's `teacher_model`), the Services and disruption budgets of the two
teachers never select each other's pods, and the deployment's config is configs/paper_math_alfworld.toml
plus deployment settings. Reuses the readers of tests/unit/deploy/test_deploy_manifests.py."""

from __future__ import annotations

import argparse
import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import tests.unit.deploy.test_deploy_manifests as dm
from services.common.config import add_arguments, build_config
from services.common.tasks import load_tasks
from services.teacher.config import TeacherConfig
from trainer.config import TrainerConfig

OVERLAY = "multitask-gpu"
OVERLAY_TOML = dm.DEPLOY / "k8s" / "overlays" / OVERLAY / "opd.toml"
COMPOSE_OVERRIDE = dm.DEPLOY / "compose" / "multitask-gpu.yml"
PAPER = dm.ROOT / "configs" / "paper_math_alfworld.toml"
TASKS = ("math", "alfworld")
# Task keys a deployment decides (where its files and services are), besides dm.DEPLOYMENT_KEYS.
TASK_DEPLOYMENT_KEYS = {"teacher", "prompts", "eval_file"}


def merge_compose(base: Any, override: Any) -> Any:
    """`docker compose -f base -f override` for these files: mappings merge key by key (environment
    included), anything else is replaced by the override's value."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge_compose(base[key], value) if key in base else value
        return out
    return copy.deepcopy(override)


@pytest.fixture
def compose_multitask(monkeypatch):
    raw = merge_compose(
        yaml.load(dm.COMPOSE_FILE.read_text(), Loader=yaml.CSafeLoader),
        yaml.load(COMPOSE_OVERRIDE.read_text(), Loader=yaml.CSafeLoader),
    )
    monkeypatch.setattr(dm, "_compose_raw", lambda: raw)
    return raw


def task_config(proc: dm.Proc, secret_files: dict[str, Path]) -> Any:
    """dm.effective_config plus what the process takes from the file's tasks, as its main does: a worker
    [tasks.<OPD_WORKER_TASK>] over [worker], the trainer the file as its tasks_file."""
    if proc.command not in (("rollout", "work"), ("train",)):
        return dm.effective_config(proc, secret_files)
    cls = dm.CONFIG_CLASSES[proc.command]
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    cli = vars(parser.parse_args(proc.args))
    cli.pop("config")
    section = {
        k: str(secret_files[v]) if isinstance(v, str) and v.startswith(dm.SECRETS_DIR + "/") else v
        for k, v in tomllib.loads(proc.toml_text).get(cls.SECTION, {}).items()
    }
    env = dm.entrypoint.resolve_environment(
        {
            k: str(secret_files[v]) if k.endswith(dm.entrypoint.FROM_FILE_SUFFIX) else v
            for k, v in proc.env.items()
        }
    )
    path = secret_files[f"{dm.SECRETS_DIR}/teacher_token"].parent / f"{proc.name}.toml"
    path.write_text(proc.toml_text)  # the mounted file, where this test can read it
    if cls is TrainerConfig:
        return build_config(cls, {**section, "tasks_file": str(path)}, env=env, cli=cli)
    (spec,) = [t for t in load_tasks(path) if t.name == env["OPD_WORKER_TASK"]]
    return build_config(cls, {**section, **spec.worker_values()}, env=env, cli=cli)


def _check_each_task_reaches_its_teacher(procs: list[dm.Proc], teacher_of_host, tmp_path: Path) -> None:
    secrets = dm.stand_in_secrets(tmp_path)
    toml_texts = {p.toml_text for p in procs if p.command in dm.CONFIG_CLASSES}
    assert toml_texts == {OVERLAY_TOML.read_text()}, "every process must mount the multitask file"
    tasks = {t.name: t for t in load_tasks(OVERLAY_TOML)}
    workers = [task_config(p, secrets) for p in procs if p.command == ("rollout", "work")]
    assert sorted(w.task for w in workers) == sorted(TASKS), "one worker set per task"
    served = set()
    for worker in workers:
        for address in worker.teacher:
            assert address.startswith("dns:///"), address
            host, port = dm.grpc_target_host_port(address)
            teacher_proc = teacher_of_host(host)
            teacher = dm.effective_config(teacher_proc, secrets)
            assert isinstance(teacher, TeacherConfig) and teacher.port == port, f"{worker.task} -> {address}"
            assert teacher.model == tasks[worker.task].teacher_model, (
                f"{worker.task}'s workers reach {teacher_proc.where}, which serves {teacher.model}"
            )
            served.add(teacher.model)
        if worker.task == "alfworld":
            assert worker.env == "alfworld" and worker.max_turns == 50 and not worker.prompts
        else:
            assert worker.prompts and not worker.env
    assert len(served) == 2, "the two tasks must be scored by two different teachers"
    (trainer_proc,) = [p for p in procs if p.command == ("train",)]
    trainer = task_config(trainer_proc, secrets)
    assert [t.name for t in trainer.tasks] == list(TASKS) and trainer.run == workers[0].run == workers[1].run


@dm.needs_kubectl
def test_overlay_renders_and_validates() -> None:
    objs = dm.render(OVERLAY)
    dm.validate_objects(objs, OVERLAY)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        assert {(kind, "teacher"), (kind, "teacher-alfworld")} <= names, kind
    assert {("Deployment", "worker"), ("Deployment", "worker-alfworld")} <= names


@dm.needs_kubectl
def test_teacher_services_select_only_their_own_pods() -> None:
    objs = dm.render(OVERLAY)
    deployments = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}

    def selected(selector: dict[str, str]) -> set[str]:
        return {
            name
            for name, d in deployments.items()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        }

    for name in ("teacher", "teacher-alfworld"):
        service = dm.find(objs, "Service", name)
        assert service["spec"]["clusterIP"] == "None"
        assert selected(service["spec"]["selector"]) == {name}
        pdb = dm.find(objs, "PodDisruptionBudget", name)
        assert selected(pdb["spec"]["selector"]["matchLabels"]) == {name}
        d = deployments[name]
        assert selected(d["spec"]["selector"]["matchLabels"]) == {name}, f"{name}'s ReplicaSets adopt others"
        hpa = dm.find(objs, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, f"{name}: one GPU per teacher replica"
    for name in ("worker", "worker-alfworld"):  # both workers are admitted by the rollout/Redis policies
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == "worker"


@dm.needs_kubectl
def test_k8s_each_task_reaches_its_own_teacher(tmp_path) -> None:
    procs = dm.k8s_procs(OVERLAY)
    objs = dm.render(OVERLAY)

    def teacher_of_host(host: str) -> dm.Proc:
        service = dm.find(objs, "Service", host)
        matches = [
            p
            for p in procs
            if p.command == ("teacher", "serve")
            and service["spec"]["selector"].items()
            <= dm.find(objs, "Deployment", p.name)["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {host} selects {[p.name for p in matches]}"
        return matches[0]

    _check_each_task_reaches_its_teacher(procs, teacher_of_host, tmp_path)


def test_compose_override_validates(compose_multitask) -> None:
    doc = dm.compose({"OPD_ALFWORLD_TEACHER_GPU": "7"})
    errors = list(dm.compose_validator().iter_errors(doc))
    assert not errors, [e.message for e in errors]
    teachers = [p for p in dm.compose_procs("gpu") if p.component == "teacher"]
    assert sorted(p.name for p in teachers) == ["teacher-alfworld-gpu", "teacher-gpu"]
    assert dm.compose_gpus(doc, "gpu")["teacher-alfworld-gpu"] == {"7"}


@dm.needs_kubectl
def test_alfworld_is_in_the_images_that_need_it(compose_multitask) -> None:
    """The workers and the trainer run images built with alfworld (EXTRA_PACKAGES), in compose and k8s;
    the teachers and the rollout service do not need it."""
    services = dm.compose()["services"]
    for name in ("worker-gpu", "worker-alfworld-gpu", "trainer-gpu"):
        svc = services[name]
        assert svc["image"].endswith(":gpu-alfworld"), name
        assert svc["build"]["args"]["EXTRA_PACKAGES"].startswith("alfworld=="), name
    tags = {
        o["spec"]["template"]["spec"]["containers"][0]["image"]
        for o in dm.render(OVERLAY)
        if o["kind"] in ("Deployment", "Job")
    }
    assert {"opd-worker:gpu-alfworld", "opd-trainer:gpu-alfworld", "opd-teacher:gpu"} <= tags
    assert "opd-worker:gpu" not in tags and "opd-trainer:gpu" not in tags


def test_compose_each_task_reaches_its_own_teacher(compose_multitask, tmp_path) -> None:
    procs = dm.compose_procs("gpu")

    def teacher_of_host(host: str) -> dm.Proc:
        matches = [
            p
            for p in procs
            if p.component == "teacher"
            and host in [p.name, *((p.spec.get("networks") or {}).get("default") or {}).get("aliases", [])]
        ]
        assert len(matches) == 1, f"{host} names {[p.name for p in matches]}"
        return matches[0]

    _check_each_task_reaches_its_teacher(procs, teacher_of_host, tmp_path)


def test_multitask_deployment_runs_the_paper_configuration() -> None:
    """The overlay's file is configs/paper_math_alfworld.toml plus deployment settings."""
    paper = tomllib.loads(PAPER.read_text())
    prod = tomllib.loads(OVERLAY_TOML.read_text())
    assert set(prod) == {"teacher", "rollout", "worker", "trainer", "tasks"}
    for section in ("teacher", "rollout", "worker", "trainer"):
        for key, value in paper[section].items():
            if key not in dm.DEPLOYMENT_KEYS:
                assert prod[section].get(key) == value, f"[{section}] {key}"
    assert list(prod["tasks"]) == list(paper["tasks"]) == list(TASKS)
    for task, table in paper["tasks"].items():
        for key, value in table.items():
            if key in TASK_DEPLOYMENT_KEYS:
                continue
            got = prod["tasks"][task].get(key)
            if key == "env_options":  # where the games are is the deployment's
                got = {k: v for k, v in got.items() if k != "data_dir"}
            assert got == value, f"[tasks.{task}] {key}: {got!r} != {value!r}"


def test_gpu_settings_are_gpu_prods() -> None:
    for name in ("gpu.yaml", "storage.yaml"):
        ours = (dm.DEPLOY / "k8s" / "overlays" / OVERLAY / name).read_text()
        assert ours == (dm.DEPLOY / "k8s" / "overlays" / "gpu-prod" / name).read_text(), name


@dm.needs_kubectl
def test_every_config_and_secret_reference_resolves() -> None:
    """The added Deployments name the generated ConfigMap by its hashed name, like the base ones."""
    objs = dm.render(OVERLAY)
    configmaps = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
    for o in objs:
        if o["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for v in o["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, (
                    f"{o['metadata']['name']}: {v['configMap']['name']}"
                )
            if "secret" in v:
                assert v["secret"]["secretName"] == "opd-secrets", o["metadata"]["name"]
