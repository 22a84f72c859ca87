"""Teacher gRPC service on loopback with a tiny Llama: numbers, status codes, concurrency, replicas, security.

All servers share one HFScorer (one model load); each has its own gRPC server, batcher and limits.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opd_teacher_client import TeacherClient, build_sequence
from opd_teacher_client.v1 import teacher_pb2, teacher_pb2_grpc

from experiments.tiny_models import make_tiny_llama
from services.common.hf_models import load_causal_lm
from services.common.redis_server import free_port
from services.teacher.config import TeacherConfig
from services.teacher.scorer import HFScorer
from services.teacher.server import run_server

pytestmark = pytest.mark.integration
SERVICE = "opd.teacher.v1.TeacherService"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("teacher") / "llama", seed=5)
    model = load_causal_lm(path)
    with torch.no_grad():  # spread the logits so the top-K order is not a near-tie everywhere
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference_model(model_dir):
    return load_causal_lm(model_dir).eval()


@pytest.fixture(scope="module")
def scorer(model_dir):
    return HFScorer(str(model_dir), device="cpu", dtype="float32")


def config(model_dir, **kw) -> TeacherConfig:
    return TeacherConfig(model=str(model_dir), port=0, device="cpu", **kw)


@pytest.fixture(scope="module")
def server(model_dir, scorer):
    metrics_port = free_port()
    with run_server(config(model_dir, metrics_port=metrics_port, max_top_k=32), scorer=scorer) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    with TeacherClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield teacher_pb2_grpc.TeacherServiceStub(channel)
    channel.close()


def reference_rows(model, ids, score_from: int, temperature: float = 1.0) -> np.ndarray:
    """float32 [rows, V]: row t = log_softmax(logits_{t-1} / T), t = score_from .. n-1."""
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)[score_from - 1 : len(ids) - 1].numpy()


def assert_matches(rows, ids, score_from, ref_R_V: np.ndarray, k: int, atol: float = 1e-4) -> None:
    """top-K values by rank, each id's own logprob, and the target logprobs equal the reference."""
    assert rows.topk_ids.shape == (len(ids) - score_from, k)
    np.testing.assert_allclose(rows.topk_logprobs, -np.sort(-ref_R_V, axis=1)[:, :k], atol=atol)
    np.testing.assert_allclose(
        np.take_along_axis(ref_R_V, rows.topk_ids.astype(np.int64), 1), rows.topk_logprobs, atol=atol
    )
    target = ref_R_V[np.arange(len(ids) - score_from), np.asarray(ids[score_from:])]
    np.testing.assert_allclose(rows.target_logprobs, target, atol=atol)


def random_batch(seed: int, vocab: int, count: int, max_len: int = 30):
    rng = np.random.default_rng(seed)
    seqs, starts = [], []
    for _ in range(count):
        n = int(rng.integers(2, max_len))
        seqs.append(rng.integers(0, vocab, n).tolist())
        starts.append(int(rng.integers(1, n)))
    return seqs, starts


# -- numbers ---------------------------------------------------------------------------------------------


def test_score_equals_direct_log_softmax_top_k(client, reference_model):
    vocab = client.info().vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, p).tolist() for p in (5, 1, 12, 3)]
    completions = [rng.integers(0, vocab, c).tolist() for c in (9, 20, 1, 30)]
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    starts = [len(p) for p in prompts]  # score exactly the completions
    out = client.score(seqs, starts, top_k=16, request_id="numbers")
    assert len(out) == 4
    for rows, ids, s, c in zip(out, seqs, starts, completions, strict=True):
        assert rows.topk_ids.shape == (len(c), 16) and rows.topk_ids.dtype == np.int32
        assert rows.candidate_logprobs is None
        assert_matches(rows, ids, s, reference_rows(reference_model, ids, s), k=16)


def test_candidates_and_temperature_equal_direct_computation(client, reference_model):
    vocab = client.info().vocab_size
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, vocab, n).tolist() for n in (14, 6, 9)]
    starts = [4, 1, 8]
    cands = [
        rng.integers(0, vocab, (10, 3)).astype(np.int32),  # [rows, per_row]
        np.array([0, 7, vocab - 1], dtype=np.int32),  # [per_row], every row
        None,
    ]
    out = client.score(seqs, starts, top_k=5, candidates=cands, temperature=0.6)
    for rows, ids, s, cand in zip(out, seqs, starts, cands, strict=True):
        ref = reference_rows(reference_model, ids, s, temperature=0.6)
        assert_matches(rows, ids, s, ref, k=5)
        if cand is None:
            assert rows.candidate_logprobs is None
        else:
            expected = np.take_along_axis(
                ref, np.broadcast_to(cand, (len(ids) - s, cand.shape[-1])).astype(np.int64), 1
            )
            np.testing.assert_allclose(rows.candidate_logprobs, expected, atol=1e-4)


def test_get_info(client, scorer):
    info = client.info()
    assert info.model_id == client.model_id == scorer.info.model_id
    assert info.vocab_size == scorer.info.vocab_size and info.backend == "hf"
    assert info.max_top_k == 32 and info.max_sequence_tokens == 8192 and info.max_request_tokens == 65536
    assert info.supports_candidates and info.supports_temperature and info.max_candidates == 256
    assert len(info.tokenizer_sha256) == 64 and list(info.special_token_ids) == list(
        scorer.info.special_token_ids
    )


def test_concurrent_clients_get_their_own_results(server, reference_model):
    vocab = server.servicer.info.vocab_size
    jobs = [random_batch(100 + j, vocab, count=1 + j % 4) for j in range(24)]
    expected = [
        [reference_rows(reference_model, ids, s) for ids, s in zip(*job, strict=True)] for job in jobs
    ]

    def run(j: int):
        with TeacherClient(server.address) as c:
            seqs, starts = jobs[j]
            return c.score(seqs, starts, top_k=4 + j % 5, request_id=f"job{j}")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(run, range(len(jobs))))
    for j, answer in enumerate(answers):
        seqs, starts = jobs[j]
        for rows, ids, s, ref in zip(answer, seqs, starts, expected[j], strict=True):
            assert_matches(rows, ids, s, ref, k=4 + j % 5)
    batches = server.metrics.registry.get_sample_value("opd_teacher_batch_sequences_count")
    assert batches < sum(len(job[0]) for job in jobs)  # requests shared forwards


# -- status codes ----------------------------------------------------------------------------------------


def valid_request() -> teacher_pb2.ScoreRequest:
    return teacher_pb2.ScoreRequest(sequences=[build_sequence([1, 2, 3, 4], 2)], top_k=3)


def bad_requests(vocab: int) -> list[tuple[teacher_pb2.ScoreRequest, str]]:
    ok = build_sequence([5, 6, 7], 1)
    cand_zero = build_sequence([5, 6, 7], 1)
    cand_zero.candidates.per_row = 0
    cand_bytes = build_sequence([5, 6, 7], 1)
    cand_bytes.candidates.per_row, cand_bytes.candidates.ids = 1, b"\x00\x01"
    return [
        (teacher_pb2.ScoreRequest(top_k=3), "request has no sequences"),
        (teacher_pb2.ScoreRequest(sequences=[ok, teacher_pb2.Sequence()], top_k=3), "sequence 1: empty"),
        (
            teacher_pb2.ScoreRequest(sequences=[build_sequence([1, vocab], 1)], top_k=3),
            f"sequence 0: token id {vocab} at position 1 outside [0, {vocab})",
        ),
        (
            teacher_pb2.ScoreRequest(
                sequences=[teacher_pb2.Sequence(token_ids=[1, -3], score_from=1)], top_k=3
            ),
            "sequence 0: token id -3 at position 1",
        ),
        (
            teacher_pb2.ScoreRequest(sequences=[ok, build_sequence([1, 2, 3], 3)], top_k=3),
            "sequence 1: score_from=3 outside [1, 3)",
        ),
        (
            teacher_pb2.ScoreRequest(sequences=[build_sequence([1, 2, 3], 0)], top_k=3),
            "sequence 0: score_from=0 outside [1, 3)",
        ),
        (teacher_pb2.ScoreRequest(sequences=[ok], top_k=0), "top_k=0 outside [1, 32]"),
        (teacher_pb2.ScoreRequest(sequences=[ok], top_k=33), "top_k=33 outside [1, 32]"),
        (teacher_pb2.ScoreRequest(sequences=[ok], top_k=3, temperature=-2), "temperature=-2.0"),
        (
            teacher_pb2.ScoreRequest(sequences=[ok, build_sequence([1] * 8193, 1)], top_k=3),
            "sequence 1: 8193 tokens, over max_sequence_tokens=8192",
        ),
        (
            teacher_pb2.ScoreRequest(sequences=[build_sequence([1] * 8000, 1)] * 9, top_k=3),
            "request has 72000 tokens in 9 sequences, over max_request_tokens=65536",
        ),
        (
            teacher_pb2.ScoreRequest(sequences=[ok, cand_zero], top_k=3),
            "sequence 1: candidates.per_row must be >= 1",
        ),
        (teacher_pb2.ScoreRequest(sequences=[cand_bytes], top_k=3), "sequence 0: candidates.ids has 2 bytes"),
        (
            teacher_pb2.ScoreRequest(
                sequences=[build_sequence([5, 6, 7], 1, np.zeros((3, 2), np.int32))], top_k=3
            ),
            "sequence 0: candidates.ids holds 6 ids; expected per_row=2 or rows*per_row=2*2=4",
        ),
        (
            teacher_pb2.ScoreRequest(sequences=[build_sequence([5, 6, 7], 1, np.array([vocab]))], top_k=3),
            f"sequence 0: candidate id {vocab} outside",
        ),
        (
            teacher_pb2.ScoreRequest(
                sequences=[build_sequence([5, 6, 7], 1, np.zeros((2, 300), np.int32))], top_k=3
            ),
            "sequence 0: candidates.per_row=300 over max_candidates=256",
        ),
    ]


def test_invalid_argument_names_the_sequence_and_the_server_stays_up(stub, server):
    vocab = server.servicer.info.vocab_size
    for req, message in bad_requests(vocab):
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, err.value.details())
        assert message in err.value.details()
        assert len(stub.Score(valid_request(), timeout=30).results) == 1  # the next valid request is answered
    errors = server.metrics.registry.get_sample_value(
        "opd_teacher_requests_total", {"code": "INVALID_ARGUMENT"}
    )
    assert errors >= len(bad_requests(vocab))


def test_unimplemented_when_the_backend_lacks_a_feature(model_dir, scorer):
    """The servicer's UNIMPLEMENTED path, through a real server whose scorer reports no candidates/temperature
    support (the vLLM test checks the same against the real vllm backend)."""

    class NoExtras:
        info = dataclasses.replace(scorer.info, supports_candidates=False, supports_temperature=False)
        score = staticmethod(scorer.score)

    with run_server(config(model_dir), scorer=NoExtras()) as handle, TeacherClient(handle.address) as c:
        assert not c.info().supports_candidates and not c.info().supports_temperature
        with pytest.raises(grpc.RpcError) as err:
            c.score([[1, 2, 3], [4, 5]], [1, 1], top_k=2, candidates=[None, np.array([1])])
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "sequence 1: candidates are not supported" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            c.score([[1, 2, 3]], [1], top_k=2, temperature=0.5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "temperature" in err.value.details()
        assert c.score([[1, 2, 3]], [1], top_k=2, temperature=1.0)[0].topk_ids.shape == (2, 2)


def test_resource_exhausted_deadline_and_retry(model_dir, scorer):
    slow = config(model_dir, max_queue=1, batch_window_ms=1500)
    with run_server(slow, scorer=scorer) as handle:
        channel = grpc.insecure_channel(handle.address)
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        first = stub.Score.future(valid_request(), timeout=30)  # waits out the 1.5 s window in the queue
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(valid_request(), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in err.value.details()
        assert len(first.result().results) == 1
        # a deadline that passes in the queue: DEADLINE_EXCEEDED, and the slot is released
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(valid_request(), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 5
        while handle.batcher.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handle.batcher.depth == 0
        channel.close()

    # With retries, callers that find the queue full back off and all get through.
    retrying = config(model_dir, max_queue=1, batch_window_ms=100)
    with run_server(retrying, scorer=scorer) as handle, TeacherClient(handle.address, max_retries=5) as c:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda i: c.score([[1, 2, 3 + i]], [1], top_k=2), range(3)))
        assert all(a[0].topk_ids.shape == (2, 2) for a in answers)
        exhausted = handle.metrics.registry.get_sample_value(
            "opd_teacher_requests_total", {"code": "RESOURCE_EXHAUSTED"}
        )
        assert exhausted and exhausted >= 1


def test_drain_finishes_in_flight_work_and_answers_unavailable(model_dir, scorer):
    class SlowScorer:  # the real scorer behind a 1 s delay, so a forward is in flight while we drain
        info = scorer.info

        def score(self, items):
            time.sleep(1.0)
            return scorer.score(items)

    with run_server(config(model_dir, batch_window_ms=0, grace_s=10), scorer=SlowScorer()) as handle:
        channel = grpc.insecure_channel(handle.address)
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        check = lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
        assert check() == health_pb2.HealthCheckResponse.SERVING
        in_flight = stub.Score.future(valid_request(), timeout=30)
        time.sleep(0.2)
        drainer = threading.Thread(target=handle.drain)
        drainer.start()
        time.sleep(0.2)
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(valid_request(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(in_flight.result().results) == 1  # in-flight work finished
        drainer.join(15)
        assert not drainer.is_alive()
        channel.close()


# -- replicas --------------------------------------------------------------------------------------------


def test_client_splits_batches_over_replicas_and_fails_over(model_dir, scorer, reference_model):
    small = dict(max_request_tokens=64, max_sequence_tokens=64, max_batch_tokens=64)
    with (
        run_server(config(model_dir, **small), scorer=scorer) as a,
        run_server(config(model_dir, **small), scorer=scorer) as b,
    ):
        seqs, starts = random_batch(7, scorer.info.vocab_size, count=20, max_len=30)
        with TeacherClient([a.address, b.address], max_retries=2) as c:
            out = c.score(seqs, starts, top_k=3)
            for rows, ids, s in zip(out, seqs, starts, strict=True):
                assert_matches(rows, ids, s, reference_rows(reference_model, ids, s), k=3)
            served = [
                h.metrics.registry.get_sample_value("opd_teacher_requests_total", {"code": "OK"})
                for h in (a, b)
            ]
            assert all(served) and sum(served) >= sum(len(s) for s in seqs) / 64
            a.drain(grace_s=1)
            again = c.score(seqs[:6], starts[:6], top_k=3)  # every request lands on b
            for x, y in zip(again, out[:6], strict=True):
                np.testing.assert_array_equal(x.topk_ids, y.topk_ids)


# -- health, reflection, metrics ---------------------------------------------------------------------------


def test_health_reflection_and_metrics(server, client):
    client.score([[1, 2, 3, 4, 5]], [2], top_k=2)
    channel = grpc.insecure_channel(server.address)
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    channel.close()
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).text
    for name in (
        "opd_teacher_queue_depth",
        "opd_teacher_batch_sequences_bucket",
        "opd_teacher_scored_tokens_total",
        "opd_teacher_request_latency_seconds_bucket",
    ):
        assert name in text
    scored = [line for line in text.splitlines() if line.startswith("opd_teacher_scored_tokens_total")]
    assert float(scored[0].split()[-1]) >= 3


def test_a_groups_shared_prompt_is_computed_once(server, client, reference_model):
    def counters() -> tuple[float, float]:
        text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).text
        values = dict(line.split() for line in text.splitlines() if line.startswith("opd_teacher_prompt_"))
        return (
            float(values["opd_teacher_prompt_tokens_requested_total"]),
            float(values["opd_teacher_prompt_tokens_computed_total"]),
        )

    rng = np.random.default_rng(21)
    G, P = 4, 30
    prompt = rng.integers(0, 50, P).tolist()
    seqs = [prompt + rng.integers(0, 50, int(n)).tolist() for n in rng.integers(5, 40, G)]
    requested0, computed0 = counters()
    got = client.score(seqs, [P] * G, top_k=4)
    requested1, computed1 = counters()
    assert (requested1 - requested0, computed1 - computed0) == (G * P, P)  # prompt cost / G per sample
    for seq, g in zip(seqs, got, strict=True):
        assert_matches(g, seq, P, reference_rows(reference_model, seq, P), k=4)


# -- auth and TLS ----------------------------------------------------------------------------------------


def test_bearer_token_and_tls(model_dir, scorer, tls_files, caplog):
    cert, key, ca = tls_files.cert_file, tls_files.key_file, tls_files.ca_file
    token = "t0ken-" + "x" * 20
    cfg = config(model_dir, token=token, tls_cert_file=cert, tls_key_file=key)
    with run_server(cfg, scorer=scorer) as handle:
        address = f"localhost:{handle.port}"
        with TeacherClient(address, token=token, tls_ca_file=ca) as c:
            assert c.score([[1, 2, 3]], [1], top_k=2)[0].topk_ids.shape == (2, 2)
        for wrong in (None, "nope", token + "x"):
            with TeacherClient(address, token=wrong, tls_ca_file=ca, max_retries=0) as c:
                for call in (c.info, lambda: c.score([[1, 2, 3]], [1], top_k=2)):
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health probes carry no metadata and stay open
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(open(ca, "rb").read()))
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        # plaintext against the TLS port fails
        with TeacherClient(address, token=token, max_retries=0, timeout_s=3) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.info()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert token not in caplog.text
