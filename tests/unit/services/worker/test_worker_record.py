"""Worker logic without servers: record assembly from plain response objects, seeds, error classes, config."""

import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from opd_teacher_client import ScoredRows
from opd_teacher_client.v1 import teacher_pb2, teacher_pb2_grpc

from experiments.tiny_models import STUDENT_EOS, TEACHER_EOS, build_char_tokenizer
from services.common.config import ConfigError, build_config, load
from services.common.experience import decode, encode
from services.common.prompts import Prompt
from services.common.redis_server import free_port
from services.common.verifiers import completion_text
from services.rollout.client import RolloutError
from services.rollout.protocol import GenerateResponse, Sample
from services.worker.config import WorkerConfig
from services.worker.loop import RolloutWorker
from services.worker.main import main
from services.worker.record import BadPromptError, build_record, request_seed, scorable
from services.worker.retry import Stopped as _Stopped
from services.worker.retry import classify_error

K, C = 4, 3


def make_response(rng, lengths=(3, 0, 5), top=False, versions=None) -> GenerateResponse:
    """`versions`: (first, last) token versions per sample (default: all 12)."""
    versions = versions or [(12, 12)] * len(lengths)
    samples = []
    for n, (first, last) in zip(lengths, versions, strict=True):
        s = Sample(
            prompt_index=0,
            token_ids=rng.integers(0, 60, n).tolist(),
            logprobs=(-rng.random(n)).tolist(),
            finish_reason="stop" if n == 3 else "length",
            first_token_version=first,
            last_token_version=last,
            top_ids=rng.integers(0, 60, (n, C)).tolist() if top else None,
            top_logprobs=(-rng.random((n, C))).tolist() if top else None,
        )
        samples.append(s)
    oldest = min(first for first, _ in versions)
    return GenerateResponse(policy_version=oldest, prompt_ids=[[1, 7, 8, 9]], samples=samples)


def make_scores(rng, samples, candidates=False) -> list[ScoredRows]:
    out = []
    for s in samples:
        n = len(s.token_ids)
        out.append(
            ScoredRows(
                topk_ids=rng.integers(0, 60, (n, K)).astype(np.int32),
                topk_logprobs=-rng.random((n, K)).astype(np.float32),
                target_logprobs=-rng.random(n).astype(np.float32),
                candidate_logprobs=-rng.random((n, C)).astype(np.float32) if candidates else None,
            )
        )
    return out


PROMPT = Prompt(row=5, text="7+8=", answer="15")


def test_build_record_carries_every_array():
    rng = np.random.default_rng(0)
    response = make_response(rng)
    samples = scorable(response)
    assert [len(s.token_ids) for s in samples] == [3, 5]  # the empty completion cannot be scored
    scores = make_scores(rng, samples)
    rec = build_record("w0-ab-3", PROMPT, response, scores, "teacher-m", task="toy", rewards=[1.0, 0.0])
    assert (rec.record_id, rec.policy_version, rec.task) == ("w0-ab-3", 12, "toy")
    assert (rec.prompt_text, rec.answer) == ("7+8=", "15")
    np.testing.assert_array_equal(rec.prompt_ids, [1, 7, 8, 9])
    assert rec.prompt_ids.dtype == np.int32
    # Round trip through the wire format: the trainer sees exactly the generated and scored values.
    got = decode(encode(rec))
    assert len(got.samples) == 2
    for g, s, sc, reward in zip(got.samples, samples, scores, [1.0, 0.0], strict=True):
        np.testing.assert_array_equal(g.completion_ids, s.token_ids)
        np.testing.assert_array_equal(g.behaviour_logprobs, np.float32(s.logprobs))
        np.testing.assert_array_equal(g.teacher_topk_ids, sc.topk_ids)
        np.testing.assert_array_equal(g.teacher_topk_logprobs, sc.topk_logprobs)
        np.testing.assert_array_equal(g.teacher_target_logprobs, sc.target_logprobs)
        assert g.finish_reason == s.finish_reason
        assert g.teacher_model_id == "teacher-m"
        assert g.reward == reward
        assert g.teacher_candidate_ids is None and g.behaviour_top_ids is None


def test_build_record_version_is_the_oldest_token_of_its_samples():
    """A sample spans versions when a swap lands mid-generation: the record (one policy_version, which the
    trainer's staleness rule reads) takes the oldest token version of the samples it holds."""
    rng = np.random.default_rng(3)
    response = make_response(rng, lengths=(3, 4, 5), versions=[(7, 9), (8, 8), (6, 9)])
    rec = build_record("r", PROMPT, response, make_scores(rng, scorable(response)), "t")
    assert rec.policy_version == 6
    # an unscorable (empty) sample is not in the record, so its version does not count
    response = make_response(rng, lengths=(3, 0), versions=[(7, 9), (5, 5)])
    assert response.policy_version == 5
    rec = build_record("r", PROMPT, response, make_scores(rng, scorable(response)), "t")
    assert rec.policy_version == 7


def test_build_record_student_topk_candidates():
    rng = np.random.default_rng(1)
    response = make_response(rng, lengths=(4, 2), top=True)
    samples = scorable(response)
    scores = make_scores(rng, samples, candidates=True)
    got = decode(encode(build_record("r", PROMPT, response, scores, "t", with_candidates=True)))
    for g, s, sc in zip(got.samples, samples, scores, strict=True):
        np.testing.assert_array_equal(g.behaviour_top_ids, s.top_ids)
        np.testing.assert_array_equal(g.behaviour_top_logprobs, np.float32(s.top_logprobs))
        np.testing.assert_array_equal(g.teacher_candidate_ids, s.top_ids)  # candidates = behaviour top ids
        np.testing.assert_array_equal(g.teacher_candidate_logprobs, sc.candidate_logprobs)
        assert g.reward is None


def test_build_record_rejects_inconsistent_inputs():
    rng = np.random.default_rng(2)
    response = make_response(rng, lengths=(3, 5))
    scores = make_scores(rng, scorable(response))
    with pytest.raises(ValueError, match="1 teacher results for 2 samples"):
        build_record("r", PROMPT, response, scores[:1], "t")
    with pytest.raises(ValueError, match="sample 1: teacher returned 3 rows for 5 tokens"):
        build_record("r", PROMPT, response, [scores[0], scores[0]], "t")
    with pytest.raises(ValueError, match="needs behaviour top ids"):
        build_record("r", PROMPT, response, scores, "t", with_candidates=True)
    with pytest.raises(ValueError, match="1 rewards for 2 samples"):
        build_record("r", PROMPT, response, scores, "t", rewards=[1.0])


def test_request_seed():
    assert request_seed(0, 5, 0) == request_seed(0, 5, 0)
    seeds = {request_seed(b, r, e) for b in range(3) for r in range(20) for e in range(3)}
    assert len(seeds) == 3 * 20 * 3
    assert all(0 <= s < 2**63 for s in seeds)


def test_completion_text_stops_at_the_first_special_token():
    tok = build_char_tokenizer()
    ids = tok("=12", add_special_tokens=False)["input_ids"]
    tail = tok("34", add_special_tokens=False)["input_ids"]
    for marker in (STUDENT_EOS, TEACHER_EOS):
        assert completion_text(tok, ids + [tok.convert_tokens_to_ids(marker)] + tail) == "=12"
    assert completion_text(tok, ids + tail) == "=1234"
    assert completion_text(tok, []) == ""


def http_error(status: int) -> RolloutError:
    return RolloutError(status, "reason")


def real_grpc_error(timeout: float) -> grpc.RpcError:
    """An error from a real call to a port where nothing listens."""
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        try:
            stub.GetInfo(teacher_pb2.GetInfoRequest(), timeout=timeout, wait_for_ready=timeout < 1)
        except grpc.RpcError as e:
            return e
    raise AssertionError("the call succeeded")


def test_classify_error():
    assert classify_error(http_error(503)) == "retry"
    assert classify_error(http_error(429)) == "retry"
    assert classify_error(http_error(422)) == "bad_input"
    assert classify_error(http_error(401)) == "fatal"
    assert classify_error(httpx.ConnectError("refused")) == "retry"
    assert classify_error(httpx.ReadTimeout("slow")) == "retry"
    assert classify_error(ConnectionRefusedError()) == "retry"
    assert classify_error(BadPromptError("empty")) == "bad_input"
    assert classify_error(ValueError("bug")) == "fatal"
    unavailable = real_grpc_error(5.0)
    assert unavailable.code() == grpc.StatusCode.UNAVAILABLE
    assert classify_error(unavailable) == "retry"
    deadline = real_grpc_error(0.2)
    assert deadline.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert classify_error(deadline) == "retry"


def make_worker(**kw) -> RolloutWorker:
    import redis

    # A client object only; these tests never send it a command.
    return RolloutWorker(WorkerConfig(prompts="p.jsonl", **kw), None, None, redis.Redis(port=free_port()))


class Flaky:
    """A call that fails `failures` times with `error`, then returns 'ok'."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_retry_backs_off_then_succeeds():
    worker = make_worker()
    flaky = Flaky(2, httpx.ConnectError("refused"))
    t0 = time.monotonic()
    assert worker._retry(flaky, "rollout_generate") == "ok"
    assert flaky.calls == 3
    assert time.monotonic() - t0 >= 0.5 + 1.0  # exponential backoff 0.5 s, 1 s
    assert worker.metrics.retries.labels("rollout_generate")._value.get() == 2


def test_retry_gives_up():
    worker = make_worker(retry_timeout_s=0.0)
    flaky = Flaky(1, http_error(503))
    with pytest.raises(RolloutError):
        worker._retry(flaky, "x")  # past its time budget: the error propagates
    not_transient = Flaky(1, http_error(422))
    with pytest.raises(RolloutError):
        make_worker()._retry(not_transient, "x")
    assert not_transient.calls == 1


def test_a_call_that_ran_long_before_failing_still_gets_its_retries():
    """The retry budget counts from the first failure: a generate that took longer than the budget (a long
    chain of thought hitting its own timeout) is retried instead of ending the worker."""
    worker = make_worker(retry_timeout_s=1.0)
    slow = Flaky(1, httpx.ReadTimeout("timed out"))

    def call():
        if slow.calls == 0:
            time.sleep(1.5)  # longer than the whole retry budget
        return slow()

    assert worker._retry(call, "rollout_generate") == "ok" and slow.calls == 2


def test_stop_interrupts_a_retry_wait():
    worker = make_worker()
    flaky = Flaky(100, httpx.ConnectError("refused"))
    threading.Timer(0.2, worker.stop).start()
    with pytest.raises(_Stopped):
        worker._retry(flaky, "x")
    assert flaky.calls <= 2


def test_record_ids_are_unique_across_workers_and_restarts():
    a, b = make_worker(), make_worker()
    ids = [a.next_record_id() for _ in range(3)] + [b.next_record_id() for _ in range(3)]
    assert len(set(ids)) == 6
    assert ids[0].startswith("w0-") and ids[0].endswith("-0") and ids[2].endswith("-2")


def test_config_validation_names_the_field():
    base = dict(prompts="p.jsonl")
    for bad, field in [
        (dict(group_size=0), "group_size"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=0.0), "temperature"),
        (dict(support="both"), "support"),
        (dict(worker_index=2, num_workers=2), "worker_index"),
        (dict(max_backlog=0), "max_backlog"),
        (dict(max_records=-1), "max_records"),
        (dict(max_tokens_in_flight=-1), "max_tokens_in_flight"),
        (dict(verifier="exact_match"), "verifier"),  # needs a tokenizer
        (dict(run="a:b"), "run"),
        (dict(prompts=""), "prompts"),
    ]:
        with pytest.raises(ConfigError, match=field):
            WorkerConfig(**{**base, **bad})


def test_config_from_env_and_flags():
    env = {"OPD_WORKER_PROMPTS": "p.jsonl", "OPD_WORKER_TEACHER": "a:1, b:2", "OPD_WORKER_GROUP_SIZE": "8"}
    cfg = build_config(WorkerConfig, env=env, cli={"support": "student_topk"})
    assert cfg.teacher == ["a:1", "b:2"] and cfg.group_size == 8 and cfg.support == "student_topk"
    assert (cfg.top_p, cfg.temperature, cfg.top_k, cfg.tokenizer) == (0.9, 1.0, 32, None)
    cfg = load(WorkerConfig, ["--prompts", "x.parquet", "--teacher", "dns:///teacher:50051"])
    assert cfg.teacher == ["dns:///teacher:50051"] and cfg.prompts == "x.parquet"


def test_cli_help_and_bad_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--max-backlog" in capsys.readouterr().out
    assert main(["--prompts", "p.jsonl", "--group-size", "0"]) == 2
    assert "group_size: 0 < 1" in capsys.readouterr().err


def test_worker_rewards_are_strict_and_metrics_keep_the_lenient_score(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    worker = make_worker(tokenizer=str(tmp_path / "tok"), verifier="toy_arith")
    worker.teacher_model_id = "teacher-m"

    def ids(text: str, end: str | None) -> list[int]:
        body = tok(text, add_special_tokens=False)["input_ids"]
        return body + ([tok.convert_tokens_to_ids(end)] if end else [])

    # Right and ended by the student's own marker; right but ended by the teacher's marker (served alone
    # the student would run on); right but cut by the length limit; wrong with the own marker.
    completions = [
        ids("=15", STUDENT_EOS),
        ids("=15", TEACHER_EOS),
        ids("=15", None),
        ids("=14", STUDENT_EOS),
    ]
    samples = [
        Sample(
            prompt_index=0,
            token_ids=c,
            logprobs=[-0.5] * len(c),
            finish_reason="stop",
            first_token_version=0,
            last_token_version=0,
        )
        for c in completions
    ]
    response = GenerateResponse(policy_version=0, prompt_ids=[[1, 7, 8, 9]], samples=samples)
    rng = np.random.default_rng(0)
    rec = worker._assemble("w0-ab-1", PROMPT, response, make_scores(rng, samples), None)
    assert [s.reward for s in rec.samples] == [1.0, 0.0, 0.0, 0.0]
    assert worker.metrics.reward._sum.get() == 1.0
    assert worker.metrics.reward_lenient._sum.get() == 3.0
