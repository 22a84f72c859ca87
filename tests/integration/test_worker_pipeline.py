"""Rollout worker end to end on loopback: a real redis-server, the real teacher gRPC server and the real
rollout HTTP service (hf backend, tiny random Llamas); the records in the stream are checked against the
services called again and against the models' own log-softmax recomputed with transformers."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from opd_teacher_client import TeacherClient

from experiments.tiny_models import build_char_tokenizer
from services.common.experience import decode
from services.common.hf_models import load_causal_lm
from services.common.prompts import Prompt, cycle_prompts
from services.common.redis_keys import CONSUMER_GROUP, RECORD_FIELD, connect, experience_stream
from services.common.redis_server import free_port
from services.common.verifiers import completion_text, ends_with_own_marker, exact_match, own_end_ids
from services.rollout.protocol import GREEDY_TOP_P, GenerateRequest
from services.teacher.config import TeacherConfig
from services.teacher.server import run_server
from services.worker.config import WorkerConfig
from services.worker.loop import RolloutWorker
from services.worker.record import request_seed
from tests.integration.stack import loopback_stack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [("12+34=", "46"), ("5+7=", "12"), ("90+9=", "99"), ("1+1=", "2"), ("33+44=", "77"), ("8+8=", "16")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Models, prompt file, Redis, teacher and rollout servers shared by the module's tests."""
    with loopback_stack(tmp_path_factory.mktemp("worker"), prompts=PROMPTS) as s:
        yield s


def make_worker(stack, run: str, **kw) -> RolloutWorker:
    cfg = WorkerConfig(
        run=run,
        redis_url=stack.redis_url,
        rollout_url=stack.rollout_url,
        teacher=[stack.teacher_address],
        prompts=str(stack.prompts),
        **kw,
    )
    return RolloutWorker(cfg, stack.rollout, stack.teacher_client, connect(stack.redis_url))


def read_records(stack, run: str, task: str = ""):
    r = connect(stack.redis_url)
    return [decode(fields[RECORD_FIELD]) for _, fields in r.xrange(experience_stream(run, task))]


@torch.no_grad()
def log_softmax_rows(model_dir: Path, prompt_ids, completion_ids) -> torch.Tensor:
    """[L, V] log-probabilities of each completion position given everything before it (temperature 1)."""
    model = load_causal_lm(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model(ids).logits[0].float()
    p = len(prompt_ids)
    return torch.log_softmax(logits[p - 1 : -1], dim=-1)  # row t predicts token p + t


def test_records_are_what_was_generated_and_scored(stack):
    g, k = 3, 5
    worker = make_worker(
        stack,
        "exact",
        group_size=g,
        max_new_tokens=8,
        top_k=k,
        max_records=4,
        concurrency=2,
        tokenizer=str(stack.student),
        verifier="exact_match",
        task="arith",
        seed=11,
    )
    summary = worker.run()
    assert summary["records"] == 4 and summary["bad_prompts"] == 0 and summary["dropped"] == 0
    records = read_records(stack, "exact", "arith")  # a task's records go to the task's own stream
    assert len(records) == 4
    assert len({r.record_id for r in records}) == 4
    # The first 4 prompts of the worker's shuffled order (seed 11, worker 0, epoch 0), once each.
    shuffled = cycle_prompts([Prompt(row=i, text=p) for i, (p, _) in enumerate(PROMPTS)], 1, "11:0")
    assert {r.prompt_text for r in records} == {p.text for p in list(shuffled)[:4]}
    tok, rollout, teacher = stack.tok, stack.rollout, stack.teacher_client
    rows = {p: i for i, (p, _) in enumerate(PROMPTS)}
    checked_models = False
    for rec in records:
        row = rows[rec.prompt_text]
        assert rec.answer == PROMPTS[row][1] and rec.task == "arith" and rec.policy_version == 0
        assert rec.prompt_ids.tolist() == tok(rec.prompt_text)["input_ids"]
        assert len(rec.samples) == g
        # The rollout service gives the same samples for the same seed: the record holds exactly those
        # (sample j: an n = 1 request with the group's seed and first_sample_index j, i.e. n = G's sample j).
        again = [
            rollout.generate(
                GenerateRequest(
                    texts=[rec.prompt_text],
                    n=1,
                    max_new_tokens=8,
                    temperature=1.0,
                    top_p=0.9,
                    seed=request_seed(11, row, 0),
                    first_sample_index=j,
                )
            ).samples[0]
            for j in range(g)
        ]
        group = rollout.generate(
            GenerateRequest(texts=[rec.prompt_text], n=g, max_new_tokens=8, seed=request_seed(11, row, 0))
        )
        for s, ref, whole in zip(rec.samples, again, group.samples, strict=True):
            assert s.completion_ids.tolist() == whole.token_ids  # the same samples as one n = G request
            assert s.completion_ids.tolist() == ref.token_ids
            np.testing.assert_allclose(s.behaviour_logprobs, ref.logprobs, atol=1e-5)
            assert s.finish_reason == ref.finish_reason
            assert s.teacher_model_id == teacher.model_id
            # Strict reward: right AND ended with the student's own end marker.
            right = exact_match(completion_text(tok, ref.token_ids), rec.answer)
            assert s.reward == (right if ends_with_own_marker(tok, ref.token_ids, own_end_ids(tok)) else 0.0)
            # The teacher, asked again for this sequence, returns the stored arrays.
            (scored,) = teacher.score(
                [rec.prompt_ids.tolist() + s.completion_ids.tolist()],
                score_from=[len(rec.prompt_ids)],
                top_k=k,
            )
            np.testing.assert_array_equal(s.teacher_topk_ids, scored.topk_ids)
            np.testing.assert_allclose(s.teacher_topk_logprobs, scored.topk_logprobs, atol=1e-5)
            np.testing.assert_allclose(s.teacher_target_logprobs, scored.target_logprobs, atol=1e-5)
            assert s.teacher_candidate_ids is None
        if not checked_models:
            # Independent reference: both models' own log-softmax, recomputed with transformers.
            s = rec.samples[0]
            student_lp = log_softmax_rows(stack.student, rec.prompt_ids, s.completion_ids)
            idx = torch.as_tensor(s.completion_ids, dtype=torch.long)[:, None]
            np.testing.assert_allclose(
                s.behaviour_logprobs, student_lp.gather(1, idx)[:, 0].numpy(), atol=1e-4
            )
            teacher_lp = log_softmax_rows(stack.teacher, rec.prompt_ids, s.completion_ids)
            top_v, top_i = teacher_lp.topk(k, dim=-1)
            np.testing.assert_array_equal(s.teacher_topk_ids, top_i.numpy())
            np.testing.assert_allclose(s.teacher_topk_logprobs, top_v.numpy(), atol=1e-4)
            np.testing.assert_allclose(
                s.teacher_target_logprobs, teacher_lp.gather(1, idx)[:, 0].numpy(), atol=1e-4
            )
            checked_models = True


def test_student_topk_records_carry_behaviour_top_ids_as_candidates(stack):
    k = 4
    worker = make_worker(
        stack, "stopk", group_size=2, max_new_tokens=6, top_k=k, max_records=1, support="student_topk"
    )
    assert worker.run()["records"] == 1
    (rec,) = read_records(stack, "stopk")
    teacher_lp = None
    for s in rec.samples:
        n = len(s)
        assert s.behaviour_top_ids.shape == (n, k) and s.teacher_candidate_ids.shape == (n, k)
        np.testing.assert_array_equal(s.teacher_candidate_ids, s.behaviour_top_ids)
        # Behaviour top-k = the student's own top-k; candidate logprobs = the teacher's at those ids.
        student_lp = log_softmax_rows(stack.student, rec.prompt_ids, s.completion_ids)
        top_v, top_i = student_lp.topk(k, dim=-1)
        np.testing.assert_array_equal(s.behaviour_top_ids, top_i.numpy())
        np.testing.assert_allclose(s.behaviour_top_logprobs, top_v.numpy(), atol=1e-4)
        teacher_lp = log_softmax_rows(stack.teacher, rec.prompt_ids, s.completion_ids)
        at_candidates = teacher_lp.gather(1, torch.as_tensor(s.teacher_candidate_ids, dtype=torch.long))
        np.testing.assert_allclose(s.teacher_candidate_logprobs, at_candidates.numpy(), atol=1e-4)


def test_full_stream_blocks_the_worker_until_consumed(stack):
    run, total, metrics_port = "backlog", 5, free_port()
    worker = make_worker(
        stack,
        run,
        group_size=2,
        max_new_tokens=4,
        top_k=3,
        max_records=total,
        concurrency=3,
        max_backlog=2,
        metrics_port=metrics_port,
    )
    thread = threading.Thread(target=worker.run)
    thread.start()
    r, stream = connect(stack.redis_url), experience_stream(run)
    try:
        deadline = time.monotonic() + 60
        while r.xlen(stream) < 2:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        # Full: the worker keeps its finished records and waits; the stream stays at the bound.
        for _ in range(20):
            assert r.xlen(stream) == 2
            time.sleep(0.1)
        assert thread.is_alive() and worker.totals["records"] == 2
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert "opd_worker_records_total 2.0" in metrics
        assert re.search(r"opd_worker_completion_tokens_total [1-9]", metrics)
        # A trainer consumes (group read, ack, delete): the worker resumes until all records are written.
        consumed = []
        while len(consumed) < total:
            assert time.monotonic() < deadline + 60
            assert r.xlen(stream) <= 2
            got = r.xreadgroup(CONSUMER_GROUP, "trainer-0", {stream: ">"}, count=1, block=200)
            for _, entries in got:
                for entry_id, fields in entries:
                    consumed.append(decode(fields[RECORD_FIELD]).record_id)
                    r.xack(stream, CONSUMER_GROUP, entry_id)
                    r.xdel(stream, entry_id)
        thread.join(30)
        assert not thread.is_alive()
        assert len(set(consumed)) == total and worker.totals["records"] == total
        assert r.xlen(stream) == 0
    finally:
        worker.stop()
        thread.join(30)


def test_sigterm_finishes_in_flight_prompts_and_writes_only_whole_records(stack):
    run = "sigterm"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'proto'}", OPD_LOG_LEVEL="INFO")
    argv = [
        sys.executable,
        "-m",
        "launcher.cli",
        "rollout",
        "work",
        "--run",
        run,
        "--redis-url",
        stack.redis_url,
        "--rollout-url",
        stack.rollout_url,
        "--teacher",
        stack.teacher_address,
        "--prompts",
        str(stack.prompts),
        "--group-size",
        "2",
        "--max-new-tokens",
        "12",
        "--top-k",
        "3",
        "--concurrency",
        "2",
        "--log-interval-s",
        "1",
    ]  # epochs 0, max_records 0: runs until stopped
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    r, stream = connect(stack.redis_url), experience_stream(run)
    try:
        deadline = time.monotonic() + 90
        while r.xlen(stream) < 1:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no record within 90 s"
            time.sleep(0.05)
        at_signal = r.xlen(stream)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    done = re.search(r"done: records=(\d+) samples=(\d+) tokens=\d+ bad_prompts=0 dropped=(\d+)", out)
    assert done, out
    written, dropped = int(done.group(1)), int(done.group(3))
    records = read_records(stack, run)
    assert len(records) == written and dropped == 0
    # In-flight prompts were finished, and no new one was started after the signal: with per-sample
    # pipelining up to concurrency x G = 4 samples are in flight, each of a different prompt at most.
    assert at_signal <= written <= at_signal + 4
    for rec in records:  # every entry decodes to a whole record of G fully scored samples
        assert len(rec.samples) == 2
        for s in rec.samples:
            assert s.teacher_topk_ids.shape == (len(s), 3) and s.behaviour_logprobs.shape == (len(s),)


def test_teacher_down_at_start_is_retried(stack):
    """The worker starts before its teacher: calls fail with UNAVAILABLE, back off, and succeed once the
    teacher is up on the configured address."""
    port = free_port()
    # No client-side retries: UNAVAILABLE reaches the worker, whose own backoff is under test.
    with TeacherClient([f"127.0.0.1:{port}"], timeout_s=10.0, max_retries=0) as late_teacher:
        cfg = WorkerConfig(
            run="late",
            redis_url=stack.redis_url,
            rollout_url=stack.rollout_url,
            teacher=[f"127.0.0.1:{port}"],
            prompts=str(stack.prompts),
            group_size=2,
            max_new_tokens=4,
            top_k=3,
            max_records=1,
        )
        worker = RolloutWorker(cfg, stack.rollout, late_teacher, connect(stack.redis_url))
        result = {}
        thread = threading.Thread(target=lambda: result.update(worker.run()))
        thread.start()
        time.sleep(2.0)
        assert thread.is_alive() and not read_records(stack, "late")
        with run_server(TeacherConfig(model=str(stack.teacher), backend="hf", port=port)):
            thread.join(120)
        assert not thread.is_alive()
    assert result["records"] == 1
    assert worker.metrics.retries.labels("teacher_info")._value.get() >= 1  # it did fail and back off
    (rec,) = read_records(stack, "late")
    assert len(rec.samples) == 2


def test_shard_epochs_and_chat_prompts(stack, tmp_path):
    """Worker 1 of 2 over `messages` rows for 2 epochs: its rows (1, 3, 5) twice, each prompt rendered with
    the chat template and sent as token ids, which the records keep."""
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    tok.save_pretrained(tmp_path / "chat_tok")
    rows = [{"messages": [{"role": "user", "content": p}], "answer": a} for p, a in PROMPTS]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = WorkerConfig(
        run="chat",
        redis_url=stack.redis_url,
        rollout_url=stack.rollout_url,
        teacher=[stack.teacher_address],
        prompts=str(tmp_path / "chat.jsonl"),
        tokenizer=str(tmp_path / "chat_tok"),
        worker_index=1,
        num_workers=2,
        epochs=2,
        group_size=1,
        max_new_tokens=3,
        top_k=2,
    )
    worker = RolloutWorker(cfg, stack.rollout, stack.teacher_client, connect(stack.redis_url))
    assert worker.run()["records"] == 6
    records = read_records(stack, "chat")
    expected = {f"<s>user: {PROMPTS[i][0]}\n" for i in (1, 3, 5)}
    texts = [r.prompt_text for r in records]
    assert sorted(texts) == sorted(list(expected) * 2)
    vocab = tok.get_vocab()
    for rec in records:
        body = rec.prompt_text[len("<s>") :]
        assert rec.prompt_ids.tolist() == [vocab["<s>"]] + [vocab[c] for c in body]
        assert rec.answer == dict(PROMPTS)[rec.prompt_text[len("<s>user: ") : -1]]


class _Rollout:
    """The stack's rollout client, with a hook around generate: `delay(request)` seconds of sleep after the
    real call (a slow sample), and the peak number of generate calls in flight."""

    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0
        self.finished: dict[tuple[int, int], float] = {}  # (seed, sample index) -> when its generate returned

    def generate(self, request):
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            out = self.inner.generate(request)
            time.sleep(self.delay(request))
            self.finished[request.seed, request.first_sample_index] = time.monotonic()
            return out
        finally:
            with self.lock:
                self.in_flight -= 1

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _TimedWorker(RolloutWorker):
    """Records when each teacher score call returned, per record id."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.scored: list[tuple[str, list[int], float]] = []

    def _score(self, record_id, prompt_ids, samples, candidates):
        out = super()._score(record_id, prompt_ids, samples, candidates)
        self.scored.append((record_id, list(samples[0].token_ids), time.monotonic()))
        return out


def _worker(stack, cls, rollout, run, **kw):
    cfg = WorkerConfig(
        run=run,
        redis_url=stack.redis_url,
        rollout_url=stack.rollout_url,
        teacher=[stack.teacher_address],
        prompts=str(stack.prompts),
        **kw,
    )
    return cls(cfg, rollout, stack.teacher_client, connect(stack.redis_url))


def test_a_finished_sample_is_scored_before_its_groups_slowest_finishes(stack):
    g, seed = 3, 5
    slow = (request_seed(seed, 0, 0), g - 1)  # row 0's last sample
    rollout = _Rollout(stack.rollout, lambda req: 2.0 if (req.seed, req.first_sample_index) == slow else 0.0)
    worker = _worker(
        stack,
        _TimedWorker,
        rollout,
        "early",
        group_size=g,
        max_new_tokens=6,
        top_k=3,
        max_records=1,
        seed=seed,
        shuffle_prompts=False,  # row 0 first: the row whose last sample is slow
    )
    assert worker.run()["records"] == 1
    (rec,) = read_records(stack, "early")
    assert len(rec.samples) == g and rec.prompt_text == PROMPTS[0][0]
    slow_done = rollout.finished[slow]
    times = {tuple(c): t for rid, c, t in worker.scored if rid == rec.record_id}
    assert len(worker.scored) == g  # one teacher call per sample
    early = [times[tuple(s.completion_ids.tolist())] for s in rec.samples[: g - 1]]
    assert all(t < slow_done for t in early), (early, slow_done)  # scored while the slow one generated
    assert times[tuple(rec.samples[-1].completion_ids.tolist())] > slow_done


def test_pipelined_records_equal_whole_group_records(stack):
    """Greedy decoding (deterministic whatever the seeds): the pipelined records (G requests of n = 1, one
    teacher call per sample) hold what the whole-group path (one n = G request, one teacher call) makes."""
    kw = dict(group_size=2, max_new_tokens=6, top_k=4, top_p=GREEDY_TOP_P, concurrency=2)
    worker = make_worker(stack, "same", max_records=3, **kw)
    assert worker.run()["records"] == 3
    reference = make_worker(stack, "same-ref", **kw)
    rows = {p: i for i, (p, _) in enumerate(PROMPTS)}
    for rec in read_records(stack, "same"):
        row = rows[rec.prompt_text]
        ref = reference.run_one(Prompt(row=row, text=rec.prompt_text, answer=PROMPTS[row][1]))
        assert rec.prompt_ids.tolist() == ref.prompt_ids.tolist() and rec.answer == ref.answer
        assert rec.policy_version == ref.policy_version and len(rec.samples) == len(ref.samples) == 2
        for s, r in zip(rec.samples, ref.samples, strict=True):
            assert s.completion_ids.tolist() == r.completion_ids.tolist()
            assert s.finish_reason == r.finish_reason
            np.testing.assert_allclose(s.behaviour_logprobs, r.behaviour_logprobs, atol=1e-5)
            np.testing.assert_array_equal(s.teacher_topk_ids, r.teacher_topk_ids)
            np.testing.assert_allclose(s.teacher_topk_logprobs, r.teacher_topk_logprobs, atol=1e-5)
            np.testing.assert_allclose(s.teacher_target_logprobs, r.teacher_target_logprobs, atol=1e-5)


def test_token_budget_bounds_samples_in_flight(stack):
    """Each sample counts prompt + max_new_tokens: a budget for two samples keeps at most two generates in
    flight, whatever `concurrency` x group_size would allow."""
    m = 8
    # A sample's cost: the prompt's UTF-8 bytes until its first response, its token count after.
    costs = [n + m for p, _ in PROMPTS for n in (len(p.encode()), len(stack.tok(p)["input_ids"]))]
    budget = 2 * max(costs)
    assert 3 * min(costs) > budget
    rollout = _Rollout(stack.rollout, lambda req: 0.3)
    worker = _worker(
        stack,
        RolloutWorker,
        rollout,
        "budget",
        group_size=3,
        max_new_tokens=m,
        top_k=3,
        max_records=3,
        concurrency=4,
        max_tokens_in_flight=budget,
    )
    assert worker.run()["records"] == 3
    assert rollout.peak == 2
    records = read_records(stack, "budget")
    assert len(records) == 3 and all(len(r.samples) == 3 for r in records)
    assert len({r.prompt_text for r in records}) == 3


def test_a_rejected_prompt_is_skipped_once_and_the_others_are_written(stack):
    """Every sample of a prompt the rollout service rejects (a token id outside the vocabulary) fails: the
    prompt is counted once, its record is not written, and the prompts around it are."""
    worker = make_worker(stack, "rejected", group_size=3, max_new_tokens=4, top_k=3, concurrency=1)
    prompts = [
        Prompt(row=0, text=PROMPTS[0][0]),
        Prompt(row=1, text="?", token_ids=(10**6,)),
        Prompt(row=2, text=PROMPTS[2][0]),
    ]
    summary = worker.run(prompts)
    assert summary["records"] == 2 and summary["bad_prompts"] == 1 and summary["dropped"] == 0
    records = read_records(stack, "rejected")
    assert [r.prompt_text for r in records] == [PROMPTS[0][0], PROMPTS[2][0]]
    assert all(len(r.samples) == 3 for r in records)
