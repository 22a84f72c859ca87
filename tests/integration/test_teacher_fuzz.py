"""Fuzzing the teacher's gRPC API on a real server (hf backend, tiny model): hypothesis-generated
ScoreRequests (random sizes, negative and huge ids, top_k 0 and huge, score_from out of range, candidates of
the wrong length, NaN/inf temperatures) and random bytes as the raw request. Every answer is OK or one of
the documented codes (teacher.proto header), never INTERNAL/UNKNOWN; an OK answer is well formed; the server
stays up and answers a valid request exactly as before the fuzz. Oversized messages: RESOURCE_EXHAUSTED."""

from __future__ import annotations

import math
from collections import Counter

import grpc
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from opd_teacher_client import build_sequence
from opd_teacher_client.v1 import teacher_pb2, teacher_pb2_grpc

from experiments.tiny_models import make_tiny_llama
from services.teacher.config import TeacherConfig
from services.teacher.scorer import HFScorer
from services.teacher.server import message_limits, run_server

pytestmark = pytest.mark.integration

LIMITS = dict(
    max_top_k=16, max_candidates=8, max_sequence_tokens=48, max_request_tokens=160, max_batch_tokens=160
)
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
SCORE = "/opd.teacher.v1.TeacherService/Score"
I32_MIN, I32_MAX, U32_MAX = -(2**31), 2**31 - 1, 2**32 - 1
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
tally: Counter[str] = Counter()  # (test, status) -> count, for the report at the end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("fuzz") / "m", seed=3)
    scorer = HFScorer(str(path), device="cpu", dtype="float32")
    cfg = TeacherConfig(model=str(path), port=0, device="cpu", batch_window_ms=0, **LIMITS)
    with run_server(cfg, scorer=scorer) as handle:
        yield handle
    scorer.close()


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.address)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return teacher_pb2_grpc.TeacherServiceStub(channel)


@pytest.fixture(scope="module")
def vocab(stub) -> int:
    return stub.GetInfo(teacher_pb2.GetInfoRequest(), timeout=30).vocab_size


def valid_request() -> teacher_pb2.ScoreRequest:
    return teacher_pb2.ScoreRequest(
        sequences=[
            build_sequence([1, 5, 9, 2, 7, 3], 2),
            build_sequence([4, 4, 8], 1, candidates=np.array([[1, 2], [3, 4]])),
        ],
        top_k=4,
        temperature=1.0,
    )


@pytest.fixture(scope="module")
def before_fuzz(stub) -> teacher_pb2.ScoreResponse:
    return stub.Score(valid_request(), timeout=30)


# ---------------------------------------------------------------- strategies

ids = st.one_of(
    st.integers(0, 60),  # mostly inside the vocabulary of the tiny model (> 60 ids) ...
    st.integers(I32_MIN, I32_MAX),  # ... and anywhere in int32, negative and huge
    st.sampled_from([-1, I32_MIN, I32_MAX]),
)
u32 = st.one_of(st.integers(0, 70), st.integers(0, U32_MAX), st.sampled_from([0, 1, U32_MAX]))


@st.composite
def candidates(draw, rows_hint: int) -> teacher_pb2.CandidateIds:
    per_row = draw(st.one_of(st.integers(0, 10), u32))
    kind = draw(st.sampled_from(["rows", "one_row", "off_by_one", "raw"]))
    if kind == "raw":
        data = draw(st.binary(max_size=200))
    else:
        small = min(per_row, 12)
        count = {"rows": rows_hint * small, "one_row": small, "off_by_one": max(0, rows_hint * small - 1)}[
            kind
        ]
        data = np.asarray(draw(st.lists(ids, min_size=count, max_size=count)), dtype="<i4").tobytes()
    return teacher_pb2.CandidateIds(per_row=per_row, ids=data)


@st.composite
def sequences(draw) -> teacher_pb2.Sequence:
    token_ids = draw(st.lists(ids, max_size=60))  # over max_sequence_tokens=48 sometimes
    n = len(token_ids)
    score_from = draw(st.one_of(st.integers(0, n + 1), u32))
    seq = teacher_pb2.Sequence(token_ids=token_ids, score_from=score_from)
    if draw(st.booleans()):
        seq.candidates.CopyFrom(draw(candidates(max(0, n - min(score_from, n)))))
    return seq


temperatures = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, 1e-3, 1e3, 1e-4, 1e4, -1.0, math.nan, math.inf, -math.inf]),
)
wild_requests = st.builds(
    teacher_pb2.ScoreRequest,
    sequences=st.lists(sequences(), max_size=5),
    top_k=st.one_of(u32, st.integers(0, 20)),
    temperature=temperatures,
    request_id=st.text(max_size=16),
)


@st.composite
def plausible_sequences(draw) -> teacher_pb2.Sequence:
    """Valid token ids and score_from; candidates sometimes of the right shape."""
    token_ids = draw(st.lists(st.integers(0, 60), min_size=2, max_size=40))
    n = len(token_ids)
    seq = teacher_pb2.Sequence(token_ids=token_ids, score_from=draw(st.integers(1, n - 1)))
    if draw(st.booleans()):
        per_row = draw(st.integers(1, 8))
        rows = draw(st.sampled_from([n - seq.score_from, 1]))
        data = draw(st.lists(st.integers(0, 60), min_size=rows * per_row, max_size=rows * per_row))
        seq.candidates.per_row = per_row
        seq.candidates.ids = np.asarray(data, dtype="<i4").tobytes()
    return seq


# near the valid region, so that many are served (and their responses checked) and the rest fail late
plausible_requests = st.builds(
    teacher_pb2.ScoreRequest,
    sequences=st.lists(plausible_sequences(), min_size=1, max_size=3),
    top_k=st.integers(0, 17),
    temperature=st.one_of(st.floats(0.002, 500.0), st.just(0.0), temperatures),
)
requests = st.one_of(plausible_requests, wild_requests)


# ---------------------------------------------------------------- checks


def check_ok(request: teacher_pb2.ScoreRequest, response: teacher_pb2.ScoreResponse, vocab: int) -> None:
    """A served request was valid, and its response has the documented shapes and values."""
    assert len(response.results) == len(request.sequences)
    for seq, res in zip(request.sequences, response.results, strict=True):
        n, s = len(seq.token_ids), seq.score_from
        assert 1 <= s < n <= LIMITS["max_sequence_tokens"]
        assert all(0 <= t < vocab for t in seq.token_ids)
        assert (res.rows, res.k) == (n - s, request.top_k)
        top_ids = np.frombuffer(res.topk_ids, "<i4").reshape(res.rows, res.k)
        top_lp = np.frombuffer(res.topk_logprobs, "<f4").reshape(res.rows, res.k)
        target = np.frombuffer(res.target_logprobs, "<f4")
        assert target.shape == (res.rows,)
        assert ((0 <= top_ids) & (top_ids < vocab)).all()
        assert np.isfinite(top_lp).all() and (top_lp <= 1e-6).all()
        assert (np.diff(top_lp, axis=1) <= 1e-6).all()  # descending
        if seq.HasField("candidates"):
            cand = np.frombuffer(res.candidate_logprobs, "<f4")
            assert cand.shape == (res.rows * seq.candidates.per_row,)


def status_of(call) -> tuple[grpc.StatusCode, object]:
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as e:
        return e.code(), e


def assert_documented(code: grpc.StatusCode, err: object, what: str) -> None:
    assert code in DOCUMENTED, f"{what}: {code.name}: {getattr(err, 'details', lambda: '')()}"
    if code is not grpc.StatusCode.OK:
        assert err.details(), f"{what}: {code.name} without a message"


# ---------------------------------------------------------------- tests


def test_generated_requests_get_documented_codes(stub, vocab, before_fuzz):
    @SETTINGS
    @given(request=requests)
    def one(request):
        code, result = status_of(lambda: stub.Score(request, timeout=30))
        tally[f"messages {code.name}"] += 1
        assert_documented(code, result, repr(request)[:500])
        if code is grpc.StatusCode.OK:
            check_ok(request, result, vocab)

    one()
    assert sum(v for k, v in tally.items() if k.startswith("messages")) >= 150
    # both sides of the validation are reached
    assert tally["messages INVALID_ARGUMENT"] > 30 and tally["messages OK"] >= 10, dict(tally)


def test_random_bytes_as_the_request(channel, stub):
    raw_score = channel.unary_unary(SCORE, request_serializer=None, response_deserializer=None)
    valid = valid_request().SerializeToString()

    @SETTINGS
    @given(
        data=st.one_of(
            st.binary(max_size=512),
            # a valid message with bytes flipped, cut or appended: mostly parseable garbage
            st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
                lambda p: valid[: p[0]] + bytes([p[1]]) + valid[p[0] + 1 :]
            ),
            st.integers(0, len(valid)).map(lambda n: valid[:n]),
            st.binary(min_size=1, max_size=64).map(lambda b: valid + b),
        )
    )
    def one(data: bytes):
        code, result = status_of(lambda: raw_score(data, timeout=30))
        tally[f"bytes {code.name}"] += 1
        assert_documented(code, result, f"bytes {data[:64]!r}")

    one()
    assert sum(v for k, v in tally.items() if k.startswith("bytes")) >= 150


def test_oversized_message_is_resource_exhausted(channel, server):
    recv, _ = message_limits(TeacherConfig(model="m", **LIMITS))
    raw_score = channel.unary_unary(SCORE, request_serializer=None, response_deserializer=None)
    code, err = status_of(lambda: raw_score(b"\0" * (recv + 1), timeout=30))
    tally[f"oversized {code.name}"] += 1
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details()


def test_server_still_answers_a_valid_request_exactly(stub, before_fuzz, server):
    after = stub.Score(valid_request(), timeout=30)
    assert len(after.results) == len(before_fuzz.results) == 2
    for a, b in zip(after.results, before_fuzz.results, strict=True):
        assert (a.rows, a.k) == (b.rows, b.k)
        assert a.topk_ids == b.topk_ids
        for field in ("topk_logprobs", "target_logprobs", "candidate_logprobs"):
            np.testing.assert_allclose(
                np.frombuffer(getattr(a, field), "<f4"), np.frombuffer(getattr(b, field), "<f4"), atol=1e-5
            )
    print("teacher fuzz tally:", dict(sorted(tally.items())))
