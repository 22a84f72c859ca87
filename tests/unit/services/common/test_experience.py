"""Experience codec: round trip, and every malformed record rejected with a reason."""

import numpy as np
import pytest

from opd.experience.v1 import experience_pb2 as pb
from services.common.experience import (
    SCHEMA_VERSION,
    ExperienceDecodeError,
    ExperienceRecord,
    SampleRecord,
    decode,
    encode,
)


def make_record(rng: np.random.Generator, lengths=(3, 5), k=4, c=2) -> ExperienceRecord:
    samples = []
    for i, n in enumerate(lengths):
        samples.append(
            SampleRecord(
                completion_ids=rng.integers(0, 100, n).astype(np.int32),
                behaviour_logprobs=rng.normal(size=n).astype(np.float32),
                teacher_topk_ids=rng.integers(0, 100, (n, k)).astype(np.int32),
                teacher_topk_logprobs=rng.normal(size=(n, k)).astype(np.float32),
                teacher_target_logprobs=rng.normal(size=n).astype(np.float32),
                finish_reason="stop" if i else "length",
                teacher_model_id="teacher-x",
                teacher_candidate_ids=rng.integers(0, 100, (n, c)).astype(np.int32),
                teacher_candidate_logprobs=rng.normal(size=(n, c)).astype(np.float32),
                behaviour_top_ids=rng.integers(0, 100, (n, c)).astype(np.int32),
                behaviour_top_logprobs=rng.normal(size=(n, c)).astype(np.float32),
                reward=1.0 if i else None,
                env_positions=np.array([0], np.int32) if i else np.zeros(0, np.int32),
            )
        )
    return ExperienceRecord(
        "w0-1",
        7,
        np.array([1, 2, 3], np.int32),
        samples,
        task="math",
        prompt_text="1+1=",
        answer="2",
        created_unix=123.5,
    )


def test_round_trip_is_exact() -> None:
    rec = make_record(np.random.default_rng(0))
    out = decode(encode(rec))
    assert (out.record_id, out.policy_version, out.task, out.answer, out.created_unix) == (
        "w0-1",
        7,
        "math",
        "2",
        123.5,
    )
    np.testing.assert_array_equal(out.prompt_ids, rec.prompt_ids)
    for a, b in zip(out.samples, rec.samples, strict=True):
        for name in (
            "completion_ids",
            "behaviour_logprobs",
            "teacher_topk_ids",
            "teacher_topk_logprobs",
            "teacher_target_logprobs",
            "teacher_candidate_ids",
            "teacher_candidate_logprobs",
            "behaviour_top_ids",
            "behaviour_top_logprobs",
            "env_positions",
        ):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert (a.finish_reason, a.reward, a.teacher_model_id) == (
            b.finish_reason,
            b.reward,
            b.teacher_model_id,
        )


def test_optional_arrays_absent() -> None:
    rec = make_record(np.random.default_rng(1))
    for s in rec.samples:
        s.teacher_candidate_ids = s.teacher_candidate_logprobs = None
        s.behaviour_top_ids = s.behaviour_top_logprobs = None
    out = decode(encode(rec))
    assert all(s.teacher_candidate_ids is None and s.behaviour_top_ids is None for s in out.samples)


def _mutate(field_path: str, value) -> bytes:
    msg = pb.ExperienceGroup.FromString(encode(make_record(np.random.default_rng(2))))
    target = msg
    *parents, leaf = field_path.split(".")
    for p in parents:
        target = target.samples[0] if p == "samples" else getattr(target, p)
    setattr(target, leaf, value)
    return msg.SerializeToString()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xff\xff garbage", "not an ExperienceGroup"),
        (pb.ExperienceGroup(schema_version=SCHEMA_VERSION + 1).SerializeToString(), "schema_version"),
        (pb.ExperienceGroup(schema_version=SCHEMA_VERSION).SerializeToString(), "no samples"),
        (_mutate("samples.behaviour_logprobs", b"\x00" * 5), "behaviour_logprobs"),
        (_mutate("samples.teacher.topk_ids", b"\x00" * 8), "teacher.topk_ids"),
        (_mutate("samples.teacher.k", 0), "k is 0"),
        (_mutate("samples.env_positions", np.array([99], np.int32).tobytes()), "env_positions out of range"),
        (_mutate("samples.env_positions", b"\x00\x01\x02"), "env_positions is not int32"),
    ],
)
def test_malformed_records_are_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ExperienceDecodeError, match=reason):
        decode(data)
