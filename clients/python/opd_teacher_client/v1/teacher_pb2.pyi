from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sequence(_message.Message):
    __slots__ = ("token_ids", "score_from", "candidates")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FROM_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    score_from: int
    candidates: CandidateIds
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., score_from: _Optional[int] = ..., candidates: _Optional[_Union[CandidateIds, _Mapping]] = ...) -> None: ...

class CandidateIds(_message.Message):
    __slots__ = ("per_row", "ids")
    PER_ROW_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    per_row: int
    ids: bytes
    def __init__(self, per_row: _Optional[int] = ..., ids: _Optional[bytes] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("sequences", "top_k", "temperature", "request_id")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    top_k: int
    temperature: float
    request_id: str
    def __init__(self, sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ..., top_k: _Optional[int] = ..., temperature: _Optional[float] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoredSequence(_message.Message):
    __slots__ = ("rows", "k", "topk_ids", "topk_logprobs", "target_logprobs", "candidate_logprobs")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    k: int
    topk_ids: bytes
    topk_logprobs: bytes
    target_logprobs: bytes
    candidate_logprobs: bytes
    def __init__(self, rows: _Optional[int] = ..., k: _Optional[int] = ..., topk_ids: _Optional[bytes] = ..., topk_logprobs: _Optional[bytes] = ..., target_logprobs: _Optional[bytes] = ..., candidate_logprobs: _Optional[bytes] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "model_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoredSequence]
    model_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[ScoredSequence, _Mapping]]] = ..., model_id: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("model_id", "vocab_size", "max_top_k", "max_sequence_tokens", "max_request_tokens", "tokenizer_sha256", "special_token_ids", "backend", "supports_candidates", "supports_temperature", "max_candidates")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    vocab_size: int
    max_top_k: int
    max_sequence_tokens: int
    max_request_tokens: int
    tokenizer_sha256: str
    special_token_ids: _containers.RepeatedScalarFieldContainer[int]
    backend: str
    supports_candidates: bool
    supports_temperature: bool
    max_candidates: int
    def __init__(self, model_id: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_sequence_tokens: _Optional[int] = ..., max_request_tokens: _Optional[int] = ..., tokenizer_sha256: _Optional[str] = ..., special_token_ids: _Optional[_Iterable[int]] = ..., backend: _Optional[str] = ..., supports_candidates: _Optional[bool] = ..., supports_temperature: _Optional[bool] = ..., max_candidates: _Optional[int] = ...) -> None: ...
