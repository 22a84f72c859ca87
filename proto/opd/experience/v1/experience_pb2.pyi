from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TeacherScores(_message.Message):
    __slots__ = ("k", "topk_ids", "topk_logprobs", "target_logprobs", "candidates_per_row", "candidate_ids", "candidate_logprobs", "model_id")
    K_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_PER_ROW_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    k: int
    topk_ids: bytes
    topk_logprobs: bytes
    target_logprobs: bytes
    candidates_per_row: int
    candidate_ids: bytes
    candidate_logprobs: bytes
    model_id: str
    def __init__(self, k: _Optional[int] = ..., topk_ids: _Optional[bytes] = ..., topk_logprobs: _Optional[bytes] = ..., target_logprobs: _Optional[bytes] = ..., candidates_per_row: _Optional[int] = ..., candidate_ids: _Optional[bytes] = ..., candidate_logprobs: _Optional[bytes] = ..., model_id: _Optional[str] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("completion_ids", "behaviour_logprobs", "finish_reason", "teacher", "has_reward", "reward", "behaviour_top_k", "behaviour_top_ids", "behaviour_top_logprobs", "env_positions")
    COMPLETION_IDS_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    HAS_REWARD_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_TOP_K_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ENV_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    completion_ids: _containers.RepeatedScalarFieldContainer[int]
    behaviour_logprobs: bytes
    finish_reason: str
    teacher: TeacherScores
    has_reward: bool
    reward: float
    behaviour_top_k: int
    behaviour_top_ids: bytes
    behaviour_top_logprobs: bytes
    env_positions: bytes
    def __init__(self, completion_ids: _Optional[_Iterable[int]] = ..., behaviour_logprobs: _Optional[bytes] = ..., finish_reason: _Optional[str] = ..., teacher: _Optional[_Union[TeacherScores, _Mapping]] = ..., has_reward: _Optional[bool] = ..., reward: _Optional[float] = ..., behaviour_top_k: _Optional[int] = ..., behaviour_top_ids: _Optional[bytes] = ..., behaviour_top_logprobs: _Optional[bytes] = ..., env_positions: _Optional[bytes] = ...) -> None: ...

class ExperienceGroup(_message.Message):
    __slots__ = ("schema_version", "record_id", "policy_version", "prompt_ids", "samples", "task", "prompt_text", "answer", "created_unix")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    record_id: str
    policy_version: int
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    task: str
    prompt_text: str
    answer: str
    created_unix: float
    def __init__(self, schema_version: _Optional[int] = ..., record_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., task: _Optional[str] = ..., prompt_text: _Optional[str] = ..., answer: _Optional[str] = ..., created_unix: _Optional[float] = ...) -> None: ...
