"""Experience records: numpy domain types <-> `opd.experience.v1.ExperienceGroup` bytes.

Bulk arrays travel as little-endian packed bytes (see the proto). `decode` validates every shape and the
schema version and raises `ExperienceDecodeError` with the reason, so a poison record can be dead-lettered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from opd.experience.v1 import experience_pb2 as pb

SCHEMA_VERSION = 1
# Support variants (DESIGN.md 1): the ids a loss is taken over at each position; a record carries what its
# variant needs (student_topk: the behaviour top ids as teacher candidates).
SUPPORTS = ("teacher_topk", "student_topk", "teacher_topk_plus_sampled")
I32, F32 = np.dtype("<i4"), np.dtype("<f4")


class ExperienceDecodeError(ValueError):
    """The bytes are not a valid ExperienceGroup of a known schema version."""


@dataclass
class SampleRecord:
    """One completion of a prompt with everything the trainer needs. L = len(completion_ids)."""

    completion_ids: np.ndarray  # int32 [L]
    behaviour_logprobs: np.ndarray  # float32 [L], log pi_old(y_t | c_t), temperature 1
    teacher_topk_ids: np.ndarray  # int32 [L, K]
    teacher_topk_logprobs: np.ndarray  # float32 [L, K]
    teacher_target_logprobs: np.ndarray  # float32 [L], log q(y_t | c_t)
    finish_reason: str = "length"
    teacher_model_id: str = ""
    teacher_candidate_ids: np.ndarray | None = None  # int32 [L, C]
    teacher_candidate_logprobs: np.ndarray | None = None  # float32 [L, C]
    behaviour_top_ids: np.ndarray | None = None  # int32 [L, Cb]
    behaviour_top_logprobs: np.ndarray | None = None  # float32 [L, Cb]
    reward: float | None = None
    env_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # int32 [E]

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])


@dataclass
class ExperienceRecord:
    """The G samples of one prompt (one stream entry)."""

    record_id: str
    policy_version: int
    prompt_ids: np.ndarray  # int32 [P]
    samples: list[SampleRecord]
    task: str = ""
    prompt_text: str = ""
    answer: str = ""
    created_unix: float = field(default_factory=time.time)


def _b(a: np.ndarray | None, dtype: np.dtype) -> bytes:
    return b"" if a is None else np.ascontiguousarray(a, dtype=dtype).tobytes()


def encode(rec: ExperienceRecord) -> bytes:
    msg = pb.ExperienceGroup(
        schema_version=SCHEMA_VERSION,
        record_id=rec.record_id,
        policy_version=rec.policy_version,
        prompt_ids=np.asarray(rec.prompt_ids, dtype=np.int64).tolist(),
        task=rec.task,
        prompt_text=rec.prompt_text,
        answer=rec.answer,
        created_unix=rec.created_unix,
    )
    for s in rec.samples:
        t = pb.TeacherScores(
            k=int(s.teacher_topk_ids.shape[1]) if s.teacher_topk_ids.ndim == 2 else 0,
            topk_ids=_b(s.teacher_topk_ids, I32),
            topk_logprobs=_b(s.teacher_topk_logprobs, F32),
            target_logprobs=_b(s.teacher_target_logprobs, F32),
            model_id=s.teacher_model_id,
        )
        if s.teacher_candidate_ids is not None:
            t.candidates_per_row = int(s.teacher_candidate_ids.shape[1])
            t.candidate_ids = _b(s.teacher_candidate_ids, I32)
            t.candidate_logprobs = _b(s.teacher_candidate_logprobs, F32)
        sample = pb.Sample(
            completion_ids=np.asarray(s.completion_ids, dtype=np.int64).tolist(),
            behaviour_logprobs=_b(s.behaviour_logprobs, F32),
            finish_reason=s.finish_reason,
            teacher=t,
            has_reward=s.reward is not None,
            reward=float(s.reward or 0.0),
            env_positions=_b(s.env_positions, I32),
        )
        if s.behaviour_top_ids is not None:
            sample.behaviour_top_k = int(s.behaviour_top_ids.shape[1])
            sample.behaviour_top_ids = _b(s.behaviour_top_ids, I32)
            sample.behaviour_top_logprobs = _b(s.behaviour_top_logprobs, F32)
        msg.samples.append(sample)
    return msg.SerializeToString()


def _arr(buf: bytes, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(buf) != expected:
        raise ExperienceDecodeError(f"{what}: {len(buf)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def decode(data: bytes) -> ExperienceRecord:
    """Parse and validate one stream entry."""
    try:
        msg = pb.ExperienceGroup.FromString(data)
    except (DecodeError, ValueError) as e:
        raise ExperienceDecodeError(f"not an ExperienceGroup: {e}") from e
    if msg.schema_version != SCHEMA_VERSION:
        raise ExperienceDecodeError(
            f"schema_version {msg.schema_version}, this reader knows {SCHEMA_VERSION}"
        )
    if not msg.samples:
        raise ExperienceDecodeError("record has no samples")
    samples = []
    for i, s in enumerate(msg.samples):
        n, t = len(s.completion_ids), s.teacher
        if n == 0:
            raise ExperienceDecodeError(f"sample {i}: empty completion")
        k = t.k
        if k == 0:
            raise ExperienceDecodeError(f"sample {i}: teacher k is 0")
        c, cb = t.candidates_per_row, s.behaviour_top_k
        if len(s.env_positions) % 4:
            raise ExperienceDecodeError(f"sample {i}: env_positions is not int32 bytes")
        env = np.frombuffer(s.env_positions, dtype=I32).astype(np.int32)
        if env.size and (env.min() < 0 or env.max() >= n):
            raise ExperienceDecodeError(f"sample {i}: env_positions out of range")
        samples.append(
            SampleRecord(
                completion_ids=np.asarray(s.completion_ids, dtype=np.int32),
                behaviour_logprobs=_arr(s.behaviour_logprobs, F32, (n,), f"sample {i} behaviour_logprobs"),
                teacher_topk_ids=_arr(t.topk_ids, I32, (n, k), f"sample {i} teacher.topk_ids"),
                teacher_topk_logprobs=_arr(t.topk_logprobs, F32, (n, k), f"sample {i} teacher.topk_logprobs"),
                teacher_target_logprobs=_arr(
                    t.target_logprobs, F32, (n,), f"sample {i} teacher.target_logprobs"
                ),
                finish_reason=s.finish_reason,
                teacher_model_id=t.model_id,
                teacher_candidate_ids=_arr(t.candidate_ids, I32, (n, c), f"sample {i} candidate_ids")
                if c
                else None,
                teacher_candidate_logprobs=(
                    _arr(t.candidate_logprobs, F32, (n, c), f"sample {i} candidate_logprobs") if c else None
                ),
                behaviour_top_ids=_arr(s.behaviour_top_ids, I32, (n, cb), f"sample {i} behaviour_top_ids")
                if cb
                else None,
                behaviour_top_logprobs=(
                    _arr(s.behaviour_top_logprobs, F32, (n, cb), f"sample {i} behaviour_top_logprobs")
                    if cb
                    else None
                ),
                reward=float(s.reward) if s.has_reward else None,
                env_positions=env,
            )
        )
    return ExperienceRecord(
        record_id=msg.record_id,
        policy_version=int(msg.policy_version),
        prompt_ids=np.asarray(msg.prompt_ids, dtype=np.int32),
        samples=samples,
        task=msg.task,
        prompt_text=msg.prompt_text,
        answer=msg.answer,
        created_unix=msg.created_unix,
    )
