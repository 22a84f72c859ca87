"""Request validation, proto <-> numpy conversion, config validation (no server, no model)."""

from __future__ import annotations

import numpy as np
import pytest
from opd_teacher_client import build_sequence, decode_scored, service_config
from opd_teacher_client.v1 import teacher_pb2

from services.common.config import ConfigError, build_config
from services.teacher.config import TeacherConfig
from services.teacher.scorer import ModelInfo, ScoreResult, Unsupported
from services.teacher.server import message_limits
from services.teacher.servicer import InvalidRequest, Limits, encode_result, info_message, parse_request

INFO = ModelInfo(
    "m",
    vocab_size=100,
    tokenizer_sha256="x",
    special_token_ids=(0, 1),
    backend="hf",
    supports_candidates=True,
    supports_temperature=True,
)
LIMITS = Limits(max_top_k=16, max_candidates=4, max_sequence_tokens=50, max_request_tokens=80)


def request(
    *seqs: teacher_pb2.Sequence, top_k: int = 4, temperature: float = 0.0
) -> teacher_pb2.ScoreRequest:
    return teacher_pb2.ScoreRequest(sequences=list(seqs), top_k=top_k, temperature=temperature)


def seq(ids, score_from: int, candidates=None) -> teacher_pb2.Sequence:
    return build_sequence(ids, score_from, candidates)


def test_valid_request_converts_to_items():
    cand = np.array([[1, 2], [3, 4]], dtype=np.int32)
    items = parse_request(request(seq([5, 6, 7], 1, cand), seq([9, 8], 1, np.array([7]))), LIMITS, INFO)
    assert [it.token_ids.tolist() for it in items] == [[5, 6, 7], [9, 8]]
    assert [it.score_from for it in items] == [1, 1] and items[0].temperature == 1.0  # 0 means 1
    np.testing.assert_array_equal(items[0].candidates, cand)
    np.testing.assert_array_equal(items[1].candidates, [7])
    assert items[0].token_ids.dtype == np.int32 and items[0].top_k == 4


@pytest.mark.parametrize(
    "req, message",
    [
        (request(), "request has no sequences"),
        (request(seq([1, 2], 1), top_k=0), r"top_k=0 outside \[1, 16\]"),
        (request(seq([1, 2], 1), top_k=17), r"top_k=17 outside \[1, 16\]"),
        (request(seq([1, 2], 1), temperature=-1.0), r"temperature=-1.0 outside \[0.001, 1000\]"),
        (request(seq([1, 2], 1), temperature=float("nan")), "temperature=nan outside"),
        (request(seq([1, 2], 1), temperature=1e-5), "temperature=.* outside"),
        (request(seq([1, 2], 1), temperature=2e3), "temperature=2000.0 outside"),
        (request(seq([1, 2], 1), seq([], 0)), "sequence 1: empty"),
        (request(seq([1] * 51, 1)), "sequence 0: 51 tokens, over max_sequence_tokens=50"),
        (
            request(seq([1] * 50, 1), seq([1] * 31, 1)),
            "request has 81 tokens in 2 sequences, over max_request",
        ),
        (request(seq([1, 2, 3], 3)), r"sequence 0: score_from=3 outside \[1, 3\)"),
        (request(seq([1, 2], 1), seq([1, 2, 3], 0)), r"sequence 1: score_from=0 outside \[1, 3\)"),
        (request(seq([4], 1)), r"sequence 0: score_from=1 outside \[1, 1\)"),
        (
            request(seq([1, 2], 1), seq([3, 100, 4], 1)),
            r"sequence 1: token id 100 at position 1 outside \[0, 100\)",
        ),
        (request(seq([-5, 2], 1)), r"sequence 0: token id -5 at position 0 outside"),
        (
            request(seq([1, 2, 3], 1, np.zeros((2, 5), np.int32))),
            "sequence 0: candidates.per_row=5 over max_can",
        ),
        (
            request(seq([1, 2, 3], 1, np.zeros((3, 2), np.int32))),
            "sequence 0: candidates.ids holds 6 ids; expe",
        ),
        (request(seq([1, 2, 3], 1, np.array([1, 100]))), r"sequence 0: candidate id 100 outside \[0, 100\)"),
    ],
)
def test_invalid_requests_name_the_sequence_and_reason(req, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_request(req, LIMITS, INFO)


def test_top_k_is_capped_at_the_vocabulary():
    small = ModelInfo("m", 10, "x", (), "hf", supports_candidates=True, supports_temperature=True)
    parse_request(request(seq([1, 2, 3], 1), top_k=10), LIMITS, small)
    with pytest.raises(InvalidRequest, match=r"top_k=11 outside \[1, 10\]"):
        parse_request(request(seq([1, 2, 3], 1), top_k=11), LIMITS, small)
    assert info_message(small, LIMITS).max_top_k == 10


def test_malformed_candidate_bytes():
    s = seq([1, 2, 3], 1)
    s.candidates.per_row = 0
    with pytest.raises(InvalidRequest, match="sequence 0: candidates.per_row must be >= 1"):
        parse_request(request(s), LIMITS, INFO)
    s.candidates.per_row = 1
    s.candidates.ids = b"\x01\x00\x00"
    with pytest.raises(InvalidRequest, match="sequence 0: candidates.ids has 3 bytes"):
        parse_request(request(s), LIMITS, INFO)


def test_unsupported_features_of_a_backend():
    info = ModelInfo("m", 100, "x", (), "vllm", supports_candidates=False, supports_temperature=False)
    with pytest.raises(Unsupported, match="sequence 1: candidates are not supported by the vllm backend"):
        parse_request(request(seq([1, 2], 1), seq([1, 2], 1, np.array([3]))), LIMITS, info)
    with pytest.raises(Unsupported, match="temperature=0.5"):
        parse_request(request(seq([1, 2], 1), temperature=0.5), LIMITS, info)
    assert parse_request(request(seq([1, 2], 1), temperature=1.0), LIMITS, info)[0].temperature == 1.0


def test_result_round_trip_through_bytes():
    rng = np.random.default_rng(0)
    r = ScoreResult(
        rng.integers(0, 100, (3, 4)).astype(np.int32),
        rng.normal(size=(3, 4)).astype(np.float32),
        rng.normal(size=3).astype(np.float32),
        rng.normal(size=(3, 2)).astype(np.float32),
    )
    wire = teacher_pb2.ScoredSequence.FromString(encode_result(r).SerializeToString())
    back = decode_scored(wire, rows=3, per_row=2)
    np.testing.assert_array_equal(back.topk_ids, r.topk_ids)
    np.testing.assert_array_equal(back.topk_logprobs, r.topk_logprobs)
    np.testing.assert_array_equal(back.target_logprobs, r.target_logprobs)
    np.testing.assert_array_equal(back.candidate_logprobs, r.candidate_logprobs)
    back.topk_ids[0, 0] = 7  # writable copies, not views of the message
    with pytest.raises(ValueError, match="for 4 rows"):
        decode_scored(wire, rows=4, per_row=2)
    with pytest.raises(ValueError, match="candidate bytes"):
        decode_scored(wire, rows=3, per_row=3)
    # 8 bytes per top-K entry and 4 per target: the bulk of the wire cost is exactly the arrays
    assert (
        len(encode_result(ScoreResult(r.topk_ids, r.topk_logprobs, r.target_logprobs)).SerializeToString())
        <= 3 * (8 * 4 + 4) + 16
    )


def test_info_message_carries_limits():
    msg = info_message(INFO, LIMITS)
    assert (
        msg.vocab_size,
        msg.max_top_k,
        msg.max_sequence_tokens,
        msg.max_request_tokens,
        msg.max_candidates,
    ) == (100, 16, 50, 80, 4)
    assert list(msg.special_token_ids) == [0, 1] and msg.backend == "hf" and msg.supports_candidates


def test_config_validation_names_the_bad_value():
    cases = [
        ({}, "model: required"),
        ({"model": "m", "backend": "tgi"}, "backend: expected one of"),
        ({"model": "m", "device": "tpu"}, "device: expected"),
        (
            {"model": "m", "max_sequence_tokens": "9000", "max_batch_tokens": "8192"},
            "exceeds max_batch_tokens",
        ),
        ({"model": "m", "max_top_k": "0"}, "max_top_k: must be >= 1"),
        ({"model": "m", "tls_cert_file": "c.pem"}, "give both or neither"),
        ({"model": "m", "token": "a", "token_file": "f"}, "at most one"),
        ({"model": "m", "vllm_gpu_memory_utilization": "1.5"}, "vllm_gpu_memory_utilization"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_config(TeacherConfig, values, env={})
    cfg = build_config(
        TeacherConfig, {"model": "m"}, env={"OPD_TEACHER_PORT": "0", "OPD_TEACHER_DEVICE": "cuda:1"}
    )
    assert cfg.port == 0 and cfg.device == "cuda:1" and cfg.served_model_id == "m"


def test_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    assert (
        build_config(TeacherConfig, {"model": "m", "token_file": str(path)}, env={}).bearer_token()
        == "s3cret"
    )
    path.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        build_config(TeacherConfig, {"model": "m", "token_file": str(path)}, env={}).bearer_token()
    assert build_config(TeacherConfig, {"model": "m"}, env={}).bearer_token() is None


def test_message_limits_admit_the_largest_valid_request():
    cfg = build_config(
        TeacherConfig,
        {
            "model": "m",
            "max_request_tokens": "1000",
            "max_sequence_tokens": "1000",
            "max_top_k": "8",
            "max_candidates": "2",
        },
        env={},
    )
    recv, send = message_limits(cfg)
    big = teacher_pb2.ScoreRequest(
        top_k=8,
        sequences=[build_sequence(np.full(1000, 2**31 - 1), 1, np.full((999, 2), 2**31 - 1, dtype=np.int32))],
    )
    assert big.ByteSize() <= recv
    r = ScoreResult(
        np.zeros((999, 8), np.int32),
        np.zeros((999, 8), np.float32),
        np.zeros(999, np.float32),
        np.zeros((999, 2), np.float32),
    )
    assert teacher_pb2.ScoreResponse(results=[encode_result(r)], model_id="m" * 200).ByteSize() <= send


def test_service_config_retries_overload_and_unavailability():
    import json

    cfg = json.loads(service_config(5))
    policy = cfg["methodConfig"][0]["retryPolicy"]
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert policy["maxAttempts"] == 5 and cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    assert "retryPolicy" not in json.loads(service_config(0))["methodConfig"][0]
