"""Task config (services/common/tasks.py): parsing, validation errors, the alternate/mix schedule, and how
the worker, the trainer and `opd up` read the file's [tasks.<name>] tables."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from launcher.pipeline import PipelineConfig, check_sections
from launcher.plans import check_task_overrides, task_workers, teacher_plans
from services.common.config import ConfigError
from services.common.redis_keys import experience_stream
from services.common.tasks import EVAL_SEED_BASE, load_tasks, parse_tasks
from services.worker.config import WorkerConfig
from services.worker.config import load_config as parse_worker_config
from trainer.config import TrainerConfig
from trainer.schedule import TaskSchedule
from trainer.tasks import eval_env

TWO_TASKS = """
[up]
teacher_replicas = 2

[teacher]
model = "base-teacher"
max_top_k = 64

[worker]
prompts = "default.jsonl"
tokenizer = "tok"
group_size = 4
max_backlog = 8
top_k = 16

[trainer]
model = "student"
batch_size = 16
mini_batch_size = 8
top_k = 16

[tasks.math]
prompts = "math.jsonl"
verifier = "toy_arith"
teacher_model = "math-teacher"
eval_file = "math_eval.jsonl"
weight = 3

[tasks.rooms]
env = "rooms"
env_options = {num_receptacles = 3}
max_turns = 6
teacher_model = "agent-teacher"
teacher_replicas = 1
eval_episodes = 5
eval_env_options = {num_objects = 1}
teacher_service = {max_top_k = 32}
[tasks.rooms.worker]
max_new_tokens = 12
num_workers = 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_tasks_parse_in_file_order_with_their_values(tmp_path):
    math, rooms = load_tasks(write(tmp_path, TWO_TASKS))
    assert (math.name, rooms.name) == ("math", "rooms")
    assert math.weight == 3.0 and math.prompts == "math.jsonl" and not math.is_env
    assert rooms.is_env and rooms.env_options == {"num_receptacles": 3} and rooms.max_turns == 6
    assert rooms.eval_seeds() == [EVAL_SEED_BASE + i for i in range(5)]
    env = eval_env(rooms)  # env_options with the eval overrides over them
    assert (env.num_receptacles, env.num_objects) == (3, 1)
    assert math.resolved_eval_verifier == "toy_arith"
    assert rooms.worker_values() == {
        "task": "rooms",
        "max_new_tokens": 12,
        "num_workers": 3,
        "prompts": "",
        "verifier": None,
        "env": "rooms",
        "env_options": {"num_receptacles": 3},
        "max_turns": 6,
    }
    assert load_tasks(None) == [] and parse_tasks({}) == []


@pytest.mark.parametrize(
    "table, message",
    [
        ({"Bad Name": {"prompts": "p"}}, "must match"),
        ({"a": {}}, "exactly one of `prompts`"),
        ({"a": {"prompts": "p", "env": "rooms", "max_turns": 2}}, "exactly one of `prompts`"),
        ({"a": {"env": "rooms"}}, "max_turns: 0 < 1"),
        ({"a": {"env": "rooms", "max_turns": 2, "verifier": "exact_match"}}, "prompt tasks"),
        ({"a": {"prompts": "p", "max_turns": 3}}, "need `env`"),
        ({"a": {"prompts": "p", "eval_env_options": {"split": "x"}}}, "need `env`"),
        ({"a": {"prompts": "p", "weight": 0}}, "weight: 0"),
        ({"a": {"prompts": "p", "wieght": 1}}, "unknown keys ['wieght']"),
        ({"a": {"prompts": "p", "worker": {"prompts": "q"}}}, "set in the task table itself"),
        ({"a": {"prompts": "p", "name": "b"}}, "differs from the table name"),
        ({"a": {"prompts": 3}}, "tasks.a.prompts: expected str"),
        ({"a": "not a table"}, "expected tables"),
    ],
)
def test_bad_task_tables_name_the_problem(table, message):
    with pytest.raises(ConfigError) as e:
        parse_tasks(table)
    assert message in str(e.value)


def test_unknown_override_keys_are_caught_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks.a.worker: unknown keys \['group_sise'\]"):
        check_task_overrides(
            load_tasks(write(tmp_path, '[tasks.a]\nprompts = "p"\nworker = {group_sise = 2}\n'))
        )
    with pytest.raises(ConfigError, match=r"tasks.a.teacher_service: unknown keys \['modle'\]"):
        check_task_overrides(
            load_tasks(write(tmp_path, '[tasks.a]\nprompts = "p"\nteacher_service = {modle = "x"}\n'))
        )
    path = write(tmp_path, '[tasks.a]\nprompts = "p"\nworker = {group_sise = 2}\n')
    with pytest.raises(ConfigError, match="group_sise"):  # opd up checks the file before it starts a child
        check_sections(path)
    with pytest.raises(ConfigError, match="group_sise"):  # and a worker started alone refuses it too
        parse_worker_config(["--config", str(path), "--task", "a"])


def test_alternate_schedule_takes_tasks_in_turn_and_resumes_in_place():
    s = TaskSchedule([5.0, 1.0, 1.0], "alternate")
    assert [s.next() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]  # weights do not matter
    resumed = TaskSchedule([5.0, 1.0, 1.0], "alternate", start_batch=7)
    assert [resumed.next() for _ in range(3)] == [1, 2, 0]


@pytest.mark.parametrize("weights", [[3.0, 1.0], [1.0, 1.0], [0.5, 0.3, 0.2], [2.0, 7.0, 1.0]])
def test_mix_schedule_follows_the_weights_at_every_prefix(weights):
    s = TaskSchedule(weights, "mix")
    picks = [s.next() for _ in range(400)]
    total = sum(weights)
    counts = Counter()
    for b, task in enumerate(picks, 1):
        counts[task] += 1
        for i, w in enumerate(weights):
            # Smooth weighted round-robin: never more than one batch away from the exact share.
            assert abs(counts[i] - b * w / total) <= 1.0 + 1e-9, (b, i, counts)
    # ... and interleaved, not in runs: with 3:1 no task runs 4 batches in a row.
    if weights == [3.0, 1.0]:
        assert picks[:8] == [0, 0, 1, 0, 0, 0, 1, 0] or max(_runs(picks)) <= 3


def _runs(picks):
    out, run = [], 1
    for a, b in zip(picks, picks[1:], strict=False):
        run = run + 1 if a == b else 1
        out.append(run)
    return out


def test_mix_schedule_resumes_where_it_stopped():
    full = TaskSchedule([2.0, 1.0, 1.0], "mix")
    picks = [full.next() for _ in range(20)]
    resumed = TaskSchedule([2.0, 1.0, 1.0], "mix", start_batch=11)
    assert [resumed.next() for _ in range(9)] == picks[11:]


def test_bad_schedules_are_rejected():
    with pytest.raises(ConfigError, match="task_schedule"):
        TaskSchedule([1.0], "round_robin")
    with pytest.raises(ConfigError, match="weights must be > 0"):
        TaskSchedule([1.0, 0.0], "mix")


def test_each_task_has_its_own_stream():
    assert experience_stream("r") == "opd:r:experience"
    assert experience_stream("r", "math") == "opd:r:experience:math"


# ------------------------------------------------------------------------------------ processes


def test_worker_takes_its_tasks_values_over_the_worker_section(tmp_path, monkeypatch):
    path = write(tmp_path, TWO_TASKS)
    monkeypatch.delenv("OPD_WORKER_TASK", raising=False)
    math = parse_worker_config(["--config", str(path), "--task", "math"])
    assert (math.task, math.prompts, math.verifier, math.env, math.group_size) == (
        "math",
        "math.jsonl",
        "toy_arith",
        "",
        4,
    )
    monkeypatch.setenv("OPD_WORKER_TASK", "rooms")
    rooms = parse_worker_config(["--config", str(path), "--max-new-tokens", "9"])
    assert (rooms.task, rooms.env, rooms.prompts, rooms.max_turns) == ("rooms", "rooms", "", 6)
    assert rooms.env_options == {"num_receptacles": 3}
    assert rooms.max_new_tokens == 9  # flags still override the task's values
    monkeypatch.delenv("OPD_WORKER_TASK")
    with pytest.raises(ConfigError, match="name this worker's"):
        parse_worker_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="not one of the configured tasks"):
        parse_worker_config(["--config", str(path), "--task", "chess"])


def test_worker_config_env_rules():
    cfg = WorkerConfig(env="rooms", max_turns=4, tokenizer="tok")
    assert cfg.prompts == "" and cfg.env_seeds > 0
    with pytest.raises(ConfigError, match="exactly one"):
        WorkerConfig()
    with pytest.raises(ConfigError, match="exactly one"):
        WorkerConfig(prompts="p.jsonl", env="rooms", max_turns=2, tokenizer="tok")
    with pytest.raises(ConfigError, match="max_turns >= 1"):
        WorkerConfig(env="rooms", tokenizer="tok")
    with pytest.raises(ConfigError, match="no verifier"):
        WorkerConfig(env="rooms", max_turns=2, tokenizer="tok", verifier="exact_match")
    with pytest.raises(ConfigError, match="a tokenizer"):
        WorkerConfig(env="rooms", max_turns=2)


def test_trainer_reads_the_tasks_and_checks_their_eval(tmp_path):
    path = write(tmp_path, TWO_TASKS)
    cfg = TrainerConfig(model="s", tasks_file=str(path), task_schedule="mix")
    assert [t.name for t in cfg.tasks] == ["math", "rooms"]
    assert TrainerConfig(model="s").tasks == []
    # eval with tasks needs no trainer eval_file, only a rollout service and a task that can be evaluated
    TrainerConfig(model="s", tasks_file=str(path), eval_every=2, rollout_urls=["http://x"])
    with pytest.raises(ConfigError, match="task_schedule"):
        TrainerConfig(model="s", tasks_file=str(path), task_schedule="interleave")
    no_eval = write(tmp_path, '[tasks.a]\nprompts = "p"\n')
    with pytest.raises(ConfigError, match="no task has eval_file or eval_episodes"):
        TrainerConfig(model="s", tasks_file=str(no_eval), eval_every=2, rollout_urls=["http://x"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[tasks.a]\nprompts = "p"\neval_file = "e"\neval_verifier = "vibes"\n')
    with pytest.raises(ConfigError, match="eval_verifier"):
        TrainerConfig(model="s", tasks_file=str(bad))


def test_opd_train_main_uses_the_config_file_as_tasks_file(tmp_path, monkeypatch):
    import trainer.train as train_mod

    path = write(tmp_path, TWO_TASKS)
    seen = {}
    monkeypatch.setattr(train_mod, "run", lambda cfg, stop: seen.setdefault("cfg", cfg))
    monkeypatch.setattr(train_mod.StopFlag, "install", lambda self: None)
    assert train_mod.main(["--config", str(path)]) == 0
    assert seen["cfg"].tasks_file == str(path) and [t.name for t in seen["cfg"].tasks] == ["math", "rooms"]


def test_opd_up_plans_one_teacher_deployment_per_task(tmp_path):
    path = write(tmp_path, TWO_TASKS)
    plans = teacher_plans(load_tasks(path), PipelineConfig(teacher_replicas=2).teacher_replicas)
    assert [(p.task, p.child_name) for p in plans] == [
        ("math", "teacher-math-0"),
        ("math", "teacher-math-1"),  # [up] teacher_replicas
        ("rooms", "teacher-rooms-0"),  # the task's own teacher_replicas
    ]
    assert plans[0].env == {"OPD_TEACHER_MODEL": "math-teacher"}
    assert plans[2].env == {"OPD_TEACHER_MAX_TOP_K": "32", "OPD_TEACHER_MODEL": "agent-teacher"}
    single = teacher_plans([], 2)
    assert [(p.task, p.child_name, p.env) for p in single] == [("", "teacher-0", {}), ("", "teacher-1", {})]
    tasks = load_tasks(path)
    assert (task_workers(tasks, "math", 2), task_workers(tasks, "rooms", 2), task_workers([], "", 2)) == (
        2,
        3,
        2,
    )


def test_opd_up_checks_each_tasks_backlog_against_the_batch(tmp_path):
    check_sections(write(tmp_path, TWO_TASKS))  # 8 records x 4 >= 16 sequences for both tasks
    small = TWO_TASKS.replace("[tasks.rooms.worker]\n", "[tasks.rooms.worker]\nmax_backlog = 3\n")
    with pytest.raises(ConfigError, match=r"max_backlog \(3 records"):
        check_sections(write(tmp_path, small))


def test_the_paper_config_parses_for_every_process(monkeypatch):
    path = Path(__file__).resolve().parents[4] / "configs" / "paper_math_alfworld.toml"
    monkeypatch.delenv("OPD_WORKER_TASK", raising=False)
    check_sections(path)
    math, alfworld = load_tasks(path)
    assert (math.teacher_model, alfworld.teacher_model) == (
        "open-thoughts/OpenThinker3-7B",
        "langfeng01/GiGPO-Qwen2.5-7B-Instruct-ALFWorld",
    )
    assert alfworld.env == "alfworld" and alfworld.eval_env_options == {"split": "valid_unseen"}
    trainer = TrainerConfig(model="Qwen/Qwen2.5-7B-Instruct", tasks_file=str(path))
    assert trainer.tasks and trainer.task_schedule == "alternate"
    workers = {t: parse_worker_config(["--config", str(path), "--task", t]) for t in ("math", "alfworld")}
    assert workers["math"].max_new_tokens == 15360 and workers["math"].prompts
    assert workers["alfworld"].max_turns == 50 and workers["alfworld"].max_new_tokens == 512
    assert workers["alfworld"].teacher == ["dns:///teacher-alfworld:50051"]
    plans = teacher_plans([math, alfworld], load_section_up(path).teacher_replicas)
    assert {p.env["OPD_TEACHER_MODEL"] for p in plans} == {math.teacher_model, alfworld.teacher_model}


def load_section_up(path: Path) -> PipelineConfig:
    from services.common.config import load_section

    return load_section(PipelineConfig, path)


@pytest.mark.parametrize("variant", ["sampled-token-opd", "lsm", "lsm-mask"])
def test_multitask_toy_config_builds_every_experiment_variant(tmp_path, monkeypatch, variant):
    """configs/multitask_toy.toml with each `opd experiment multitask` variant is a valid run for every
    process, and its rooms settings are those the toy agents were trained with."""
    import tomllib

    import tomli_w

    from experiments import paper as experiments
    from experiments.toy.multitask import MultiToyConfig

    base_path = Path(__file__).resolve().parents[4] / "configs" / "multitask_toy.toml"
    base = tomllib.loads(base_path.read_text())
    (v,) = [v for v in experiments.EXPERIMENTS["multitask"] if v.slug == variant]
    cfg = experiments.build_variant_config(
        base, v, run_name=f"mt-{v.slug}-s1", runs_dir=tmp_path, seed=1, batches=6
    )
    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps(cfg))
    monkeypatch.delenv("OPD_WORKER_TASK", raising=False)
    check_sections(path)
    trainer = TrainerConfig(**{**cfg["trainer"], "tasks_file": str(path), "rollout_urls": ["http://x"]})
    assert [t.name for t in trainer.tasks] == ["math", "rooms"] and trainer.max_batches == 6
    assert (trainer.objective, trainer.special_token_masking) == (
        v.overrides["trainer"]["objective"],
        v.overrides["trainer"]["special_token_masking"],
    )
    rooms = parse_worker_config(["--config", str(path), "--task", "rooms"])
    math = parse_worker_config(["--config", str(path), "--task", "math"])
    assert math.seed == rooms.seed == 1 and math.verifier == "toy_arith" and rooms.env == "rooms"
    toy = MultiToyConfig(**base["toy_multi"])
    assert rooms.env_options == toy.env_options() and rooms.max_turns == toy.max_turns
    assert rooms.max_new_tokens == toy.action_max_new_tokens and rooms.max_context_tokens == toy.max_positions
    plans = teacher_plans(load_tasks(path), load_section_up(path).teacher_replicas)
    assert [p.env["OPD_TEACHER_MODEL"].rsplit("/", 1)[1] for p in plans] == ["math_teacher", "agent_teacher"]
