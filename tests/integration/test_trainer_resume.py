"""kill -9 the trainer (a real `opd train` subprocess, real redis-server, real checkpoint dir) in the middle
of a run, restart it with --resume, and check exactly-once consumption from the commit log: every record
produced is in exactly one committed batch or one committed stale list, batches/steps/versions continue,
and the final model equals an uninterrupted run's on the same stream.

Also the two crash windows around the commit point, made deterministic: entries pending after their
checkpoint was committed (crash before the ack) are acked without training; entries pending whose commit
line has no renamed checkpoint (crash before the rename) are trained again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.synthetic import synthetic_records, write_records
from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common import redis_keys
from services.common.hf_models import load_causal_lm
from services.common.redis_server import EmbeddedRedis
from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.train import run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOK = build_char_tokenizer()
SPECIAL = sorted(set(TOK.all_special_ids))
N_RECORDS = 24
# Record i as an on-policy worker would stamp it (2 records per batch, version = batch index), except
# every 5th one, which is 3 versions old and so stale under max_policy_lag = 1 once the trainer passes 4.
VERSIONS = [max(0, i // 2 - 3) if i % 5 == 4 else i // 2 for i in range(N_RECORDS)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    student_dir = make_tiny_llama(root / "student", seed=0, tokenizer=TOK)
    teacher_dir = make_tiny_llama(root / "teacher", seed=1, tokenizer=TOK)
    student = load_causal_lm(student_dir)
    teacher = load_causal_lm(teacher_dir)
    records = synthetic_records(
        student,
        teacher,
        n_records=N_RECORDS,
        group_size=2,
        top_k=4,
        behaviour_top_k=4,
        special_ids=SPECIAL,
        eos_id=TOK.eos_token_id,
        policy_versions=VERSIONS,
        completion_len=(8, 24),
    )
    with EmbeddedRedis() as server:
        yield dict(root=root, student_dir=student_dir, records=records, redis=server)


def _args(env, run_name: str, **kw) -> dict:
    base = dict(
        model=str(env["student_dir"]),
        device="cpu",
        redis_url=env["redis"].url,
        run=run_name,
        batch_size=4,
        mini_batch_size=2,
        top_k=4,
        lr=1e-3,
        max_policy_lag=1,
        read_block_ms=100,
        idle_timeout_s=1.5,
        checkpoint_dir=str(env["root"] / run_name),
        tensorboard=False,
        progress=False,
        push_every=1,
        diagnostics_every=0,
    )
    return {**base, **kw}


def _argv(args: dict) -> list[str]:
    out = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def _spawn(args: dict, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'proto'}", OMP_NUM_THREADS="1")
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "train", *_argv(args)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _model_after(env, ckpt_dir) -> torch.nn.Module:
    model = load_causal_lm(env["student_dir"])
    ckpt.load_latest(ckpt_dir, model, restore_rng=False)
    return model


@pytest.mark.parametrize(
    "every",
    [
        pytest.param({"checkpoint_every": 1, "checkpoint_async": False}, id="every-batch-sync"),
        # background checkpoints every 3 batches: a kill loses up to 3 trained batches, whose entries were
        # not acked (they wait for the checkpoint that covers them) and are trained again after the resume
        pytest.param({"checkpoint_every": 3, "checkpoint_async": True}, id="every-3-async"),
    ],
)
def test_kill_9_and_resume_is_exactly_once(env, every):
    client = redis_keys.connect(env["redis"].url)
    records = env["records"]
    tag = str(every["checkpoint_every"])

    # The reference: the same stream, uninterrupted, in-process.
    ref_args = _args(env, "reference" + tag, **every)
    write_records(client, ref_args["run"], records)
    torch.set_num_threads(1)
    ref_state = run(TrainerConfig(**ref_args))
    ref_lines = ckpt.read_commit_log(ref_args["checkpoint_dir"])
    assert ref_state.dropped_stale > 0 and ref_state.batch >= 8

    # The crash: two thirds of the stream is there when the trainer starts; kill -9 after two commits.
    args = _args(env, "crash" + tag, idle_timeout_s=120.0, **every)
    produced = write_records(client, args["run"], records[:16])
    log_path = env["root"] / "crash.log"
    proc = _spawn(args, log_path)
    deadline = time.monotonic() + 180
    try:
        while len(ckpt.read_commit_log(args["checkpoint_dir"])) < 2:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "trainer made no progress"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    committed_at_kill = len(ckpt.read_commit_log(args["checkpoint_dir"]))
    assert committed_at_kill < 8  # the kill landed mid-run (16 records make 8 batches)
    stream = redis_keys.experience_stream(args["run"])
    pending_at_kill = client.xpending(stream, redis_keys.CONSUMER_GROUP)["pending"]
    assert pending_at_kill > 0 or client.xlen(stream) > 0

    # Restart with --resume while the rest of the stream arrives; it waits for more (no idle timeout) until
    # SIGTERM, which makes it finish cleanly.
    produced += write_records(client, args["run"], records[16:])
    proc = _spawn({**args, "resume": True, "idle_timeout_s": 0.0}, log_path)
    try:
        deadline = time.monotonic() + 240
        # Every entry read; with checkpoint_every > 1 the last batches stay pending (unacked) until the
        # checkpoint that covers them, which SIGTERM's final checkpoint writes.
        while client.xlen(stream) > (
            client.xpending(stream, redis_keys.CONSUMER_GROUP)["pending"]
            if every["checkpoint_every"] > 1
            else 0
        ):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "resumed trainer made no progress"
            time.sleep(0.05)
        time.sleep(0.3 if every["checkpoint_every"] == 1 else 3.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    lines = ckpt.read_commit_log(args["checkpoint_dir"])
    trained = [e for ln in lines for e in ln["entries"]]
    stale = [e for ln in lines for e in ln["stale_entries"]]
    # exactly once: every produced entry is trained once or dropped stale once, nothing else
    assert len(trained) + len(stale) == len(set(trained) | set(stale))
    assert sorted(trained + stale) == sorted(produced)
    assert len(stale) == ref_state.dropped_stale
    # batches, steps and versions continue across the crash
    batches = [ln["batch"] for ln in lines if ln["entries"]]
    assert batches == list(range(1, len(batches) + 1)) == list(range(1, ref_state.batch + 1))
    assert [ln["step"] for ln in lines if ln["entries"]] == [2 * b for b in batches]
    assert [ln["policy_version"] for ln in lines if ln["entries"]] == batches
    assert int(client.get(redis_keys.policy_version_key(args["run"]))) == ref_state.policy_version
    assert client.xlen(stream) == 0 and client.xpending(stream, redis_keys.CONSUMER_GROUP)["pending"] == 0
    # the same batches as the uninterrupted run, hence the same model
    assert [ln["records"] for ln in lines] == [ln["records"] for ln in ref_lines]
    ref_model, model = (
        _model_after(env, ref_args["checkpoint_dir"]),
        _model_after(env, args["checkpoint_dir"]),
    )
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # The restart reports recovering pending entries exactly when the kill left some (it can land between
    # an ack and the next read, leaving none).
    assert ("recovered" in log_path.read_text()) == (pending_at_kill > 0)


def test_crash_windows_around_the_commit_point(env):
    """Commit line + renamed checkpoint but no ack (crash before the ack) -> acked, not retrained.
    Commit line without its renamed checkpoint (crash before the rename) -> line dropped, entries retrained."""
    from trainer.consumer import StreamConsumer

    client = redis_keys.connect(env["redis"].url)
    records = env["records"][:6]
    run_name = "windows"
    stream = redis_keys.experience_stream(run_name)
    args = _args(env, run_name, push_every=0)  # versions stay 0: nothing is stale here
    ids = write_records(client, run_name, records)
    state = run(TrainerConfig(**args, max_batches=1))
    assert state.batch == 1 and ckpt.read_commit_log(args["checkpoint_dir"])[0]["entries"] == ids[:2]

    # Batch 2 as a trainer that died right after its commit point: entries delivered (pending), commit
    # line written, checkpoint renamed, no ack.
    consumer = StreamConsumer(client, run_name, "trainer-0")
    consumer.read(10, 100)  # whatever the first run did not read ahead
    assert [e.entry_id for e in consumer.pending()] == ids[2:6]
    model = _model_after(env, args["checkpoint_dir"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = ckpt.load_latest(args["checkpoint_dir"], model, opt).state
    state.batch, state.step = 2, 4
    line = {
        "batch": 2,
        "step": 4,
        "policy_version": 0,
        "entries": ids[2:4],
        "records": ["x", "y"],
        "stale_entries": [],
        "stale_records": [],
    }
    ckpt.save_checkpoint(args["checkpoint_dir"], model, opt, state, [line])
    # Batch 3 as a trainer that died after writing its commit line but before renaming its checkpoint.
    ckpt.append_commits(args["checkpoint_dir"], [{**line, "batch": 3, "step": 6, "entries": ids[4:6]}])
    assert client.xpending(stream, redis_keys.CONSUMER_GROUP)["pending"] == 4

    state = run(TrainerConfig(**args, resume=True, max_batches=3))
    lines = ckpt.read_commit_log(args["checkpoint_dir"])
    assert [ln["batch"] for ln in lines] == [1, 2, 3]
    assert lines[1]["records"] == ["x", "y"]  # committed before the crash: acked, not trained again
    assert lines[2]["entries"] == ids[4:6]  # the orphan line was dropped and its entries trained for real
    assert lines[2]["records"] == [r.record_id for r in records[4:6]]
    assert (state.batch, state.step) == (3, 6)
    assert client.xlen(stream) == 0 and client.xpending(stream, redis_keys.CONSUMER_GROUP)["pending"] == 0
