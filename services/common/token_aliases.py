"""Special-token aliases: which teacher token(s) spell a student token (docs/aliases.md).

A config lists pairs `[student, teacher]`; each side is an id or a token string, and the teacher side may
be a list (a multi-token spelling, teacher-forced as a whole):

    token_aliases = [["</s>", "<|im_end|>"], ["<think>", ["<", "th", "ink", ">"]]]

As a flag or environment variable the same list is written as JSON:

    OPD_TRAINER_TOKEN_ALIASES='[["</s>", "<|im_end|>"]]'   --token-aliases '[[3, 4]]'

`parse_aliases` checks the structure (no tokenizer needed; config validation); `resolve_aliases` turns it
into ids once at start, from the student's and the teacher's tokenizers. A string side must be exactly one
token of its tokenizer (a spelling's elements too); anything else is a `ConfigError` that says how the
tokenizer splits it.

The id spaces are shared, as everywhere in this project (the trainer reads teacher ids as student ids):
an alias only says that the teacher writes student id `s` as teacher id `a` (or as `a_1 .. a_n`).

Semantics of a single-token alias s <- a (trainer/aliases.py applies it): the teacher's distribution as the
student sees it is the push-forward q'(s) = q(s) + q(a), q'(a) = 0, every other id unchanged. Where a
finite log-probability of q'(a) is needed (the student itself wrote or ranks the teacher's spelling) it is
FOREIGN_LOGPROB.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.config import ConfigError

# log q' of a teacher-side alias id used as a student token: the push-forward gives it no mass (q'(a) = 0);
# a finite floor keeps KL and rewards finite while still pushing the student firmly away from it.
FOREIGN_LOGPROB = -30.0

Side = int | str


@dataclass(frozen=True)
class AliasSpec:
    """One configured pair before resolution: ids or token strings."""

    student: Side
    teacher: Side | tuple[Side, ...]  # a tuple is a multi-token spelling


@dataclass(frozen=True)
class Alias:
    name: str  # for metrics: the student token as configured, made key-safe
    student_id: int
    teacher_ids: tuple[int, ...]  # one id, or the spelling a_1 .. a_n

    @property
    def is_multi(self) -> bool:
        return len(self.teacher_ids) > 1


@dataclass(frozen=True)
class AliasMap:
    """Resolved aliases; empty when none are configured."""

    aliases: tuple[Alias, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.aliases)

    @property
    def single(self) -> tuple[Alias, ...]:
        """Single-token aliases that change something (student id != teacher id)."""
        return tuple(a for a in self.aliases if not a.is_multi and a.teacher_ids[0] != a.student_id)

    @property
    def multi(self) -> tuple[Alias, ...]:
        return tuple(a for a in self.aliases if a.is_multi)

    @property
    def groups(self) -> dict[int, tuple[int, ...]]:
        """Student id -> the teacher ids merged into it (itself first), for the single-token aliases."""
        out: dict[int, list[int]] = {}
        for a in self.single:
            out.setdefault(a.student_id, [a.student_id]).append(a.teacher_ids[0])
        return {s: tuple(ids) for s, ids in out.items()}

    @property
    def foreign_ids(self) -> np.ndarray:
        """int64 [F]: teacher-side ids of single-token aliases (q' = 0 there), sorted."""
        return np.array(sorted({a.teacher_ids[0] for a in self.single}), dtype=np.int64)

    @property
    def candidate_ids(self) -> np.ndarray:
        """int32 [C]: the ids whose teacher log-probabilities every row needs (both sides), sorted."""
        ids = {i for s, members in self.groups.items() for i in (s, *members)}
        return np.array(sorted(ids), dtype=np.int32)

    @property
    def spellings(self) -> dict[int, tuple[int, ...]]:
        return {a.student_id: a.teacher_ids for a in self.multi}


def parse_aliases(raw: Any, field: str = "token_aliases") -> list[AliasSpec]:
    """The configured value (a list of pairs, or its JSON text) -> specs; ConfigError names the bad entry."""
    if isinstance(raw, str):
        if not raw.strip():
            return []
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f'{field}: not JSON ({e.msg}); write e.g. \'[["</s>", "<|im_end|>"]]\' or [[3, 4]]'
            ) from e
    if not isinstance(raw, list):
        raise ConfigError(f"{field}: expected a list of [student, teacher] pairs, got {raw!r}")
    specs = []
    for i, pair in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ConfigError(f"{where}: expected a [student, teacher] pair, got {pair!r}")
        student, teacher = pair
        _check_side(student, f"{where} student")
        if isinstance(teacher, list | tuple):
            if not teacher:
                raise ConfigError(f"{where}: the teacher spelling is empty")
            for j, t in enumerate(teacher):
                _check_side(t, f"{where} teacher[{j}]")
            teacher = tuple(teacher) if len(teacher) > 1 else teacher[0]
        else:
            _check_side(teacher, f"{where} teacher")
        specs.append(AliasSpec(student, teacher))
    return specs


def _check_side(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{where}: expected a token id or a token string, got {value!r}")
    if isinstance(value, int) and value < 0:
        raise ConfigError(f"{where}: id {value} < 0")
    if isinstance(value, str) and not value:
        raise ConfigError(f"{where}: empty token string")


def token_id(tokenizer: Any, value: Side, vocab_size: int | None, where: str, side: str) -> int:
    """The id of one token: an int as given (checked against the vocabulary), a string as exactly one token."""
    if isinstance(value, int):
        if vocab_size is not None and value >= vocab_size:
            raise ConfigError(f"{where}: id {value} is outside the {side} vocabulary [0, {vocab_size})")
        return value
    if tokenizer is None:
        raise ConfigError(
            f"{where}: {value!r} is a token string but no {side} tokenizer is configured "
            f"(set the {side} tokenizer, or give the id)"
        )
    vocab = tokenizer.get_vocab()
    if value in vocab:
        return int(vocab[value])
    ids = tokenizer.encode(value, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    raise ConfigError(
        f"{where}: {value!r} is not a single token of the {side} tokenizer: it is {len(ids)} tokens "
        f"{pieces} (ids {ids}); a multi-token teacher spelling is written as a list, e.g. "
        f"{json.dumps(pieces)}"
    )


def resolve_aliases(
    specs: Sequence[AliasSpec],
    student_tokenizer: Any = None,
    teacher_tokenizer: Any = None,
    student_vocab: int | None = None,
    teacher_vocab: int | None = None,
) -> AliasMap:
    """Specs -> ids, with the consistency rules of docs/aliases.md; ConfigError on any violation.

    Vocabulary sizes default to the tokenizers' (len); give them to check ids without a tokenizer.
    """
    if student_vocab is None and student_tokenizer is not None:
        student_vocab = len(student_tokenizer)
    if teacher_vocab is None and teacher_tokenizer is not None:
        teacher_vocab = len(teacher_tokenizer)
    aliases: list[Alias] = []
    for i, spec in enumerate(specs):
        where = f"token_aliases[{i}]"
        s = token_id(student_tokenizer, spec.student, student_vocab, f"{where} student", "student")
        spelling = spec.teacher if isinstance(spec.teacher, tuple) else (spec.teacher,)
        t = tuple(
            token_id(teacher_tokenizer, v, teacher_vocab, f"{where} teacher", "teacher") for v in spelling
        )
        aliases.append(Alias(_metric_name(spec.student), s, t))
    _check_consistent(aliases)
    return AliasMap(tuple(aliases))


def _metric_name(student: Side) -> str:
    # Metric keys are `alias/<name>/...`: a '/' inside the name would nest a level in TensorBoard.
    return re.sub(r"[^\w<>|.+=-]", "_", str(student))


def _check_consistent(aliases: list[Alias]) -> None:
    single_students = {a.student_id for a in aliases if not a.is_multi and a.teacher_ids[0] != a.student_id}
    multi_students: set[int] = set()
    teacher_owner: dict[int, int] = {}
    for i, a in enumerate(aliases):
        where = f"token_aliases[{i}]"
        if a.is_multi:
            if a.student_id in multi_students or a.student_id in single_students:
                raise ConfigError(
                    f"{where}: student id {a.student_id} has a multi-token spelling and another alias"
                )
            multi_students.add(a.student_id)
            continue
        t = a.teacher_ids[0]
        if t == a.student_id:
            continue  # an identity alias changes nothing
        if teacher_owner.setdefault(t, a.student_id) != a.student_id:
            raise ConfigError(
                f"{where}: teacher id {t} is already the alias of student id {teacher_owner[t]}; "
                "one teacher id can stand for one student id only"
            )
        if t in single_students or t in multi_students:
            raise ConfigError(
                f"{where}: teacher id {t} is itself an aliased student id (chains of aliases are ambiguous)"
            )


def disagreeing_special_ids(student_tokenizer: Any, teacher_tokenizer: Any) -> list[int]:
    """The ids special-token masking drops by default: those on which the two tokenizers disagree.

    An id is in the set when it is a special token of either tokenizer whose token string has a different id
    in the other tokenizer or is absent from it, or when it is the end marker of one and not the other
    (different `eos_token_id`s: both end markers). A special token both tokenizers hold at the same id with
    the same role (Qwen2.5 student and teacher share `<|im_end|>` as their end marker) is not masked, so
    stopping keeps its signal. The same tokenizer on both sides (or None for the teacher) gives [].
    """
    if teacher_tokenizer is None or teacher_tokenizer is student_tokenizer:
        return []
    out: set[int] = set()
    pair = (student_tokenizer, teacher_tokenizer)
    for mine, other in (pair, pair[::-1]):
        my_vocab, other_vocab = mine.get_vocab(), other.get_vocab()
        for tok in mine.all_special_tokens:
            if tok in my_vocab and other_vocab.get(tok) != my_vocab[tok]:
                out.add(int(my_vocab[tok]))
    eos = {t.eos_token_id for t in pair} - {None}
    if len(eos) > 1:
        out |= {int(i) for i in eos}
    return sorted(out)
