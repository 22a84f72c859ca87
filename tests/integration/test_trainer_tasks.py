"""Two tasks end to end on loopback: a prompt task and an environment task, each with its own teacher
server (real gRPC, different model ids), one rollout service, real workers writing to per-task Redis
streams, and the trainer alternating the tasks batch by batch with per-task metrics and eval. Then the
mixed schedule and a resume whose pending entries have the same ids in both streams (synthetic records)."""

from __future__ import annotations

import threading

import pytest
from opd_teacher_client import TeacherClient

from experiments.synthetic import synthetic_records
from services.common import redis_keys
from services.common.experience import decode, encode
from services.common.hf_models import load_causal_lm
from services.worker.config import load_config as parse_worker_config
from services.worker.envs.rooms import RoomsEnv
from services.worker.episode import observation_text
from services.worker.loop import RolloutWorker
from tests.integration.stack import loopback_stack
from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.metrics import read_metrics
from trainer.schedule import TaskSchedule
from trainer.train import run

pytestmark = pytest.mark.integration

MATH = [("12+34=", "46"), ("5+7=", "12"), ("90+9=", "99"), ("1+1=", "2"), ("33+44=", "77"), ("8+8=", "16")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    teachers = {"math_teacher": {"model_id": "math-teacher"}, "rooms_teacher": {"model_id": "rooms-teacher"}}
    with loopback_stack(tmp_path_factory.mktemp("tasks"), prompts=MATH, teachers=teachers) as s:
        yield s


def _config(stack, run_name: str) -> str:
    """The run's TOML file: the worker section shared by both tasks, and the two task tables."""
    path = stack.root / f"{run_name}.toml"
    path.write_text(
        f"""
[worker]
run = "{run_name}"
tokenizer = "{stack.student}"
group_size = 2
max_new_tokens = 6
top_k = 4
concurrency = 2
max_backlog = 64
max_records = 6
retry_timeout_s = 30

[tasks.math]
prompts = "{stack.prompts}"
verifier = "exact_match"
teacher = ["{stack.handles["math_teacher"].address}"]
eval_file = "{stack.prompts}"

[tasks.rooms]
env = "rooms"
env_options = {{num_receptacles = 2, num_objects = 1}}
max_turns = 2
teacher = ["{stack.handles["rooms_teacher"].address}"]
eval_episodes = 2
[tasks.rooms.worker]
max_new_tokens = 5
shuffle_prompts = false  # env seeds in order: 0, 1, 2, ...
"""
    )
    return str(path)


def _run_workers(stack, path: str) -> None:
    """One worker per task, concurrently, each until its max_records are written."""
    errors: list[BaseException] = []

    def work(task: str) -> None:
        try:
            cfg = parse_worker_config(
                ["--config", path, "--task", task, "--redis-url", stack.redis.url]
                + ["--rollout-url", stack.rollout_url]
            )
            with TeacherClient(cfg.teacher) as teacher:
                summary = RolloutWorker(cfg, stack.rollout, teacher, redis_keys.connect(cfg.redis_url)).run()
            assert summary["records"] == 6, summary
        except BaseException as e:  # surfaced in the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in ("math", "rooms")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def test_two_tasks_alternate_with_their_own_teachers_and_metrics(stack):
    run_name = "alt"
    path = _config(stack, run_name)
    _run_workers(stack, path)

    client = redis_keys.connect(stack.redis.url)
    record_ids = {}
    for task, teacher_id in (("math", "math-teacher"), ("rooms", "rooms-teacher")):
        entries = client.xrange(redis_keys.experience_stream(run_name, task))
        records = [decode(fields[redis_keys.RECORD_FIELD]) for _, fields in entries]
        assert len(records) == 6
        # Tagged with the task, scored by the task's own teacher (its model id travels in the record).
        assert {r.task for r in records} == {task}
        assert {s.teacher_model_id for r in records for s in r.samples} == {teacher_id}
        if task == "rooms":  # episodes: environment tokens are marked, rewards are success flags
            assert any(len(s.env_positions) > 0 for r in records for s in r.samples)
            assert {s.reward for r in records for s in r.samples} <= {0.0, 1.0}
            # The worker's "rows" are env seeds 0, 1, 2, ...: one record per seed, from that seed's reset.
            env = RoomsEnv(num_receptacles=2, num_objects=1)
            assert {r.prompt_text for r in records} == {
                observation_text(env.reset(seed)) for seed in range(6)
            }
        record_ids[task] = {r.record_id for r in records}
    assert not client.exists(redis_keys.experience_stream(run_name))  # nothing in the single-task stream

    cfg = TrainerConfig(
        model=str(stack.student),
        device="cpu",
        redis_url=stack.redis.url,
        run=run_name,
        tasks_file=path,
        batch_size=4,
        mini_batch_size=2,
        top_k=4,
        lr=1e-3,
        max_policy_lag=5,
        push_every=0,
        read_block_ms=100,
        idle_timeout_s=5.0,
        max_batches=4,
        checkpoint_dir=str(stack.root / run_name / "ckpt"),
        progress=False,
        tensorboard=False,
        eval_every=2,
        eval_url=stack.rollout_url,
        eval_max_new_tokens=6,
    )
    state = run(cfg)
    assert state.batch == 4

    rows = read_metrics(cfg.metrics_dir)
    train_rows = [r for r in rows if "train/task_index" in r]
    assert [r["train/task_index"] for r in train_rows] == [0.0, 1.0, 0.0, 1.0]
    for row in train_rows:
        task, other = ("math", "rooms") if row["train/task_index"] == 0 else ("rooms", "math")
        # Every training metric again under the batch's task, none under the other task.
        assert row[f"task/{task}/loss/lsm"] == row["loss/lsm"]
        assert row[f"task/{task}/train/tokens"] == row["train/tokens"]
        assert row[f"task/{task}/rollout/policy_lag"] == row["rollout/policy_lag"]
        assert f"task/{other}/loss/lsm" not in row
        assert {f"task/{t}/queue/backlog" for t in ("math", "rooms")} <= set(row)
    assert [r["task/math/train/batches"] for r in train_rows if "task/math/train/batches" in r] == [1.0, 2.0]
    assert "task/rooms/reward/mean" in train_rows[1] and 0.0 <= train_rows[1]["reward/mean"] <= 1.0
    eval_rows = [r for r in rows if "task/math/eval/pass@1" in r]
    assert [r["batch"] for r in eval_rows] == [0, 2, 4]  # before training, then every eval_every batches
    for r in eval_rows:
        assert 0.0 <= r["task/math/eval/pass@1"] <= 1.0 and 0.0 <= r["task/rooms/eval/success_rate"] <= 1.0

    # The commit log names each batch's task, and its records came from that task's stream.
    lines = ckpt.read_commit_log(cfg.checkpoint_dir)
    assert [line["task"] for line in lines] == ["math", "rooms", "math", "rooms"]
    for line in lines:
        assert line["records"] and set(line["records"]) <= record_ids[line["task"]]
    # Committed entries are gone from their streams; the rest wait in them.
    for task in ("math", "rooms"):
        left = {
            decode(f[redis_keys.RECORD_FIELD]).record_id
            for _, f in client.xrange(redis_keys.experience_stream(run_name, task))
        }
        trained = {rid for line in lines if line["task"] == task for rid in line["records"]}
        assert left == record_ids[task] - trained and len(trained) == 4


def test_mix_schedule_and_resume_with_colliding_entry_ids(stack, tmp_path):
    """Both streams hold entries with the same ids; a resume must tell them apart by task."""
    run_name = "mix"
    path = tmp_path / "mix.toml"
    path.write_text('[tasks.a]\nprompts = "unused.jsonl"\nweight = 3\n[tasks.b]\nprompts = "unused.jsonl"\n')
    student = load_causal_lm(stack.student)
    teacher = load_causal_lm(stack.teachers["math_teacher"])
    client = redis_keys.connect(stack.redis.url)
    ids = {}
    for task, n, seed in (("a", 12, 0), ("b", 6, 1)):
        records = synthetic_records(
            student, teacher, n_records=n, group_size=2, top_k=4, behaviour_top_k=4, seed=seed, run_tag=task
        )
        redis_keys.ensure_group(client, run_name, task)
        stream = redis_keys.experience_stream(run_name, task)
        for i, rec in enumerate(records, 1):
            client.xadd(stream, {redis_keys.RECORD_FIELD: encode(rec)}, id=f"{i}-0")  # same ids in a and b
        ids[task] = {r.record_id for r in records}

    def cfg(max_batches: int, resume: bool) -> TrainerConfig:
        return TrainerConfig(
            model=str(stack.student),
            device="cpu",
            redis_url=stack.redis.url,
            run=run_name,
            tasks_file=str(path),
            task_schedule="mix",
            batch_size=4,
            mini_batch_size=4,
            top_k=4,
            max_policy_lag=5,
            push_every=0,
            read_block_ms=100,
            idle_timeout_s=3.0,
            max_batches=max_batches,
            checkpoint_dir=str(tmp_path / "ckpt"),
            progress=False,
            tensorboard=False,
            resume=resume,
        )

    run(cfg(3, resume=False))
    # Make b's next entries pending for this consumer, as a crash between read and checkpoint would.
    # Their ids equal entries of a that are already committed: only the task on the commit line tells them
    # apart, and they must be trained, not acked as if committed.
    delivered = client.xreadgroup(
        redis_keys.CONSUMER_GROUP, "trainer-0", {redis_keys.experience_stream(run_name, "b"): ">"}, count=2
    )
    pending_ids = [e.decode() for e, _ in delivered[0][1]]
    a_committed = {
        e for line in ckpt.read_commit_log(tmp_path / "ckpt") if line["task"] == "a" for e in line["entries"]
    }
    assert set(pending_ids) <= a_committed
    run(cfg(8, resume=True))

    lines = ckpt.read_commit_log(tmp_path / "ckpt")
    schedule = TaskSchedule([3.0, 1.0], "mix")
    expected = ["ab"[schedule.next()] for _ in range(8)]
    assert [line["task"] for line in lines] == expected
    assert expected.count("a") == 6 and expected.count("b") == 2  # 3:1
    for task in ("a", "b"):
        trained = [rid for line in lines if line["task"] == task for rid in line["records"]]
        assert len(trained) == len(set(trained))  # exactly once
        assert set(trained) <= ids[task]
    b_entries = [e for line in lines if line["task"] == "b" for e in line["entries"]]
    # b's first batch (run 1) took 1-0 and 2-0; the recovered entries are trained next, not acked unseen.
    assert b_entries == ["1-0", "2-0", *pending_ids]
    rows = [r for r in read_metrics(tmp_path / "ckpt" / "logs") if "train/task_index" in r]
    assert [int(r["train/task_index"]) for r in rows] == [0 if t == "a" else 1 for t in expected]
