"""The trainer loop in-process against a real redis-server: batches of whole records, optimizer steps per
batch, stale drops counted and committed, poison entries dead-lettered, acks only after checkpoints,
policy version in Redis, the metrics file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.synthetic import synthetic_records, write_records
from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common import redis_keys
from services.common.hf_models import load_causal_lm
from services.common.redis_server import EmbeddedRedis
from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.metrics import read_metrics
from trainer.train import run

pytestmark = pytest.mark.integration

TOK = build_char_tokenizer()
SPECIAL = sorted(set(TOK.all_special_ids))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    student_dir = make_tiny_llama(root / "student", seed=0, tokenizer=TOK)
    teacher_dir = make_tiny_llama(root / "teacher", seed=1, tokenizer=TOK)
    student = load_causal_lm(student_dir)
    teacher = load_causal_lm(teacher_dir)
    with EmbeddedRedis() as server:
        yield dict(root=root, student_dir=student_dir, student=student, teacher=teacher, redis=server)


def _records(env, versions, seed=0, top_k=4):
    return synthetic_records(
        env["student"],
        env["teacher"],
        n_records=len(versions),
        group_size=2,
        top_k=top_k,
        behaviour_top_k=4,
        special_ids=SPECIAL,
        eos_id=TOK.eos_token_id,
        policy_versions=versions,
        seed=seed,
    )


def _cfg(env, run_name, **kw):
    base = dict(
        model=str(env["student_dir"]),
        device="cpu",
        redis_url=env["redis"].url,
        run=run_name,
        batch_size=4,
        mini_batch_size=2,
        top_k=4,
        lr=1e-3,
        max_policy_lag=0,
        read_block_ms=100,
        idle_timeout_s=1.0,
        checkpoint_dir=str(env["root"] / run_name),
        progress=False,
        tensorboard=False,
        grad_variance_every=2,
        grad_variance_micro=2,
    )
    return TrainerConfig(**{**base, **kw})


def test_batches_steps_stale_dead_and_acks(env):
    client = redis_keys.connect(env["redis"].url)
    run_name = "loop"
    stream = redis_keys.experience_stream(run_name)
    # batch 1 at version 0: r0 r1 | batch 2 at version 1: r2 (r3 is v0: stale) r4 | batch 3 at v2: r5 r6
    # then a trailing stale r7 (v0) that never fills a batch
    recs = _records(env, [0, 0, 1, 0, 1, 2, 2, 0])
    short_k = _records(env, [0], seed=9, top_k=2)[0]  # teacher K = 2 < the trainer's top_k = 4
    short_k.record_id = "short-k"
    ids = write_records(client, run_name, recs[:1])
    ids.append(client.xadd(stream, {redis_keys.RECORD_FIELD: b"\x08\x01garbage"}).decode())
    ids += write_records(client, run_name, [short_k])
    ids += write_records(client, run_name, recs[1:])
    entry = dict(
        zip(
            [r.record_id for r in recs[:1]] + ["garbage", "short-k"] + [r.record_id for r in recs[1:]],
            ids,
            strict=True,
        )
    )

    cfg = _cfg(env, run_name)
    state = run(cfg)

    assert (state.batch, state.step, state.policy_version) == (3, 6, 3)
    assert state.dropped_stale == 2 and state.dead == 2 and state.records_trained == 6
    lines = ckpt.read_commit_log(cfg.checkpoint_dir)
    assert [ln["records"] for ln in lines] == [
        ["synth-0", "synth-1"],
        ["synth-2", "synth-4"],
        ["synth-5", "synth-6"],
        [],
    ]
    assert [ln["stale_records"] for ln in lines] == [[], ["synth-3"], [], ["synth-7"]]
    assert [ln["batch"] for ln in lines] == [1, 2, 3, 3] and [ln["step"] for ln in lines] == [2, 4, 6, 6]
    assert lines[1]["stale_entries"] == [entry["synth-3"]]
    assert lines[0]["entries"] == [entry["synth-0"], entry["synth-1"]]

    # everything acked and deleted; the two poison entries are in the dead-letter stream with reasons
    assert client.xlen(stream) == 0
    assert client.xpending(stream, redis_keys.CONSUMER_GROUP)["pending"] == 0
    dead = client.xrange(redis_keys.dead_letter_stream(run_name))
    reasons = {f[b"entry_id"].decode(): f[b"reason"].decode() for _, f in dead}
    assert reasons.keys() == {entry["garbage"], entry["short-k"]}
    assert "ExperienceDecodeError" in reasons[entry["garbage"]]
    assert "teacher top-k has 2 ids, the trainer needs top_k=4" in reasons[entry["short-k"]]
    assert int(client.get(redis_keys.policy_version_key(run_name))) == 3

    # one optimizer step per mini-batch: AdamW's own step counter agrees
    restored = load_causal_lm(cfg.model)
    opt = torch.optim.AdamW(restored.parameters())
    ckpt.load_latest(cfg.checkpoint_dir, restored, opt, restore_rng=False)
    assert {int(s["step"]) for s in opt.state.values()} == {6}

    metrics = read_metrics(cfg.metrics_dir)
    assert [m["batch"] for m in metrics] == [1, 2, 3]
    for key in (
        "loss/lsm",
        "grad/norm",
        "student/entropy",
        "teacher/gap_mean",
        "support/teacher_mass",
        "support/student_mass",
        "response/length",
        "queue/backlog",
        "queue/dropped_stale",
        "queue/dead",
        "rollout/policy_lag",
        "perf/tokens_per_s",
        "time/read",
        "time/loss",
        "time/optim",
        "time/push",
    ):
        assert all(np.isfinite(m[key]) for m in metrics), key
    assert "grad/variance" in metrics[1] and "grad/variance" not in metrics[0]
    assert [m["queue/dropped_stale"] for m in metrics] == [0, 1, 1]
    assert [m["rollout/policy_lag"] for m in metrics] == [0, 0, 0]
    assert metrics[-1]["queue/dead"] == 2
    assert all(m["loss/lsm"] > 0 for m in metrics)

    # the trained weights differ from the start and were checkpointed
    start = load_causal_lm(env["student_dir"])
    trained = load_causal_lm(env["student_dir"])
    ckpt.load_latest(cfg.checkpoint_dir, trained, restore_rng=False)
    assert not torch.equal(start.lm_head.weight, trained.lm_head.weight)


def test_fresh_start_refuses_a_used_checkpoint_dir(env):
    from services.common.config import ConfigError

    cfg = _cfg(env, "loop")  # the directory the test above filled
    with pytest.raises(ConfigError, match="pass --resume"):
        run(cfg)


def test_stale_drops_are_committed_while_the_stream_is_quiet(env):
    """Stale entries count in XLEN until acked. A stream holding only stale entries must not wait for a batch
    that cannot fill (the workers would block on max_backlog and never send the fresh records that fill
    it): once the stream goes quiet the stale drops are committed and acked, and the trainer reads on."""
    import threading
    import time

    from trainer.train import StopFlag

    client = redis_keys.connect(env["redis"].url)
    run_name = "quiet"
    stream = redis_keys.experience_stream(run_name)
    cfg = _cfg(env, run_name, max_policy_lag=1, idle_timeout_s=0.0, grad_variance_every=0)
    stop, result = StopFlag(), {}
    thread = threading.Thread(target=lambda: result.update(state=run(cfg, stop)))
    write_records(client, run_name, _records(env, [0, 0, 1, 1]))  # batches 1 and 2 -> version 2
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while len(ckpt.read_commit_log(cfg.checkpoint_dir)) < 2:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        stale_ids = write_records(client, run_name, _records(env, [0, 0, 0], seed=3))  # 2 versions old
        while client.xlen(stream) > 0:  # committed and acked with no fresh record in sight
            assert thread.is_alive() and time.monotonic() < deadline, "stale entries held back"
            time.sleep(0.05)
        lines = ckpt.read_commit_log(cfg.checkpoint_dir)
        assert [ln["stale_entries"] for ln in lines] == [[], [], stale_ids]
        assert lines[-1]["entries"] == [] and lines[-1]["batch"] == 2
        # a fresh record still makes a batch afterwards
        write_records(client, run_name, _records(env, [2, 2], seed=4))
        while len(ckpt.read_commit_log(cfg.checkpoint_dir)) < 4:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stop.stop = True
        thread.join(60)
    assert result["state"].dropped_stale == 3 and result["state"].batch == 3
