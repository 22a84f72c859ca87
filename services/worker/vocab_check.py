"""The worker's start-up check that the student and the teacher share a vocabulary.

The whole pipeline reads teacher ids as student ids (the teacher's top-K ids index the student's logits in
the trainer), so two tokenizers that map a token string to different ids, or treat different ids as special,
silently train the student on the wrong tokens. Nothing downstream can see it: the ids are all in range.

Both sides are reduced to one tokenizer hash:

    vocab_sha256    sha256 of the vocabulary (token string -> id, keys sorted, compact JSON, UTF-8): the
                    definition the teacher reports in GetInfo.tokenizer_sha256 (services/common/vocab.py)
    tokenizer_hash  sha256 of "<vocab_sha256>:<sorted special ids>": the vocabulary plus the special tokens;
                    for the teacher from GetInfo (tokenizer_sha256, special_token_ids)

Equal hashes pass. Different hashes stop the worker with both hashes in the message, unless

- token aliases are configured (docs/aliases.md) and the two vocabularies differ exactly on aliased ids:
  the teacher tokenizer (`teacher_tokenizer`, checked against the served teacher's vocabulary hash) is
  compared id by id with the student's, and every id whose token string or special status differs must be
  one side of an alias;
- `allow_vocab_mismatch` is set: the explicit override for vocabularies aliased on purpose in ways the
  id-by-id check cannot see (the worker logs both hashes and goes on).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Any

from services.common.config import ConfigError
from services.common.vocab import vocab_sha256

log = logging.getLogger(__name__)

OVERRIDE = "worker.allow_vocab_mismatch = true (OPD_WORKER_ALLOW_VOCAB_MISMATCH=1)"


def tokenizer_hash(vocab_sha: str, special_ids: Iterable[int]) -> str:
    """The vocabulary hash and the special token ids in one hash (what the two sides must agree on)."""
    specials = ",".join(str(i) for i in sorted({int(i) for i in special_ids}))
    return hashlib.sha256(f"{vocab_sha}:{specials}".encode()).hexdigest()


def differing_ids(student: Any, teacher: Any) -> set[int]:
    """Ids whose token string differs between the two tokenizers (or exists on one side only), and ids
    special on one side only."""
    s_by_id = {i: t for t, i in student.get_vocab().items()}
    t_by_id = {i: t for t, i in teacher.get_vocab().items()}
    out = {i for i in s_by_id.keys() | t_by_id.keys() if s_by_id.get(i) != t_by_id.get(i)}
    return out | (set(student.all_special_ids) ^ set(teacher.all_special_ids))


def check_vocabulary(
    student: Any,
    info: Any,
    *,
    aliased_ids: set[int],
    load_teacher_tokenizer: Any,
    allow_mismatch: bool,
    student_name: str = "student",
) -> None:
    """Raise ConfigError unless the student tokenizer and the served teacher (GetInfo `info`) share a
    vocabulary, up to the aliased ids (`aliased_ids`; `load_teacher_tokenizer()` gives the teacher's
    tokenizer, or None when none is configured); `allow_mismatch` logs the difference instead."""
    s_hash = tokenizer_hash(vocab_sha256(student), student.all_special_ids)
    t_hash = tokenizer_hash(info.tokenizer_sha256, info.special_token_ids)
    if s_hash == t_hash:
        log.info("vocabulary check: student and teacher tokenizer hashes agree (%s)", s_hash[:16])
        return
    what = (
        f"the student tokenizer {student_name} (tokenizer hash {s_hash}) and the teacher {info.model_id} "
        f"(tokenizer hash {t_hash}) do not share a vocabulary (token -> id map and special tokens)"
    )
    if allow_mismatch:
        log.warning("vocabulary check overridden (allow_vocab_mismatch): %s", what)
        return
    if aliased_ids:
        teacher = load_teacher_tokenizer()
        if teacher is None:
            raise ConfigError(
                f"{what}; with token_aliases, set teacher_tokenizer so the difference can be checked against "
                f"the aliased ids, or set {OVERRIDE}"
            )
        if vocab_sha256(teacher) != info.tokenizer_sha256:
            raise ConfigError(
                f"{what}; teacher_tokenizer (vocab sha256 {vocab_sha256(teacher)}) is not the served teacher's "
                f"(vocab sha256 {info.tokenizer_sha256}); point it at the teacher's model, or set {OVERRIDE}"
            )
        outside = sorted(differing_ids(student, teacher) - aliased_ids)
        if not outside:
            log.info("vocabulary check: tokenizers differ only on the aliased ids %s", sorted(aliased_ids))
            return
        raise ConfigError(
            f"{what}; they differ on {len(outside)} ids outside the aliased ids {sorted(aliased_ids)} "
            f"(first: {outside[:8]}); fix the models or the aliases (docs/aliases.md), or set {OVERRIDE}"
        )
    raise ConfigError(
        f"{what}: teacher ids would be read as different student tokens. Use a student and teacher with "
        f"one tokenizer, configure token_aliases for tokens they spell differently (docs/aliases.md), or set "
        f"{OVERRIDE} if the vocabularies are aliased on purpose"
    )


def check_worker_vocabulary(cfg: Any, tokenizer: Any, info: Any, aliases: Any) -> None:
    """`check_vocabulary` for a worker config (`tokenizer`, `teacher_tokenizer`, `allow_vocab_mismatch`)
    and its resolved aliases (services/worker/aliasing.py WorkerAliases, or None)."""
    if tokenizer is None:
        log.warning("vocabulary check skipped: the worker has no `tokenizer` (set it to the student's)")
        return
    aliased: set[int] = set()
    if aliases is not None:
        for a in aliases.amap.aliases:
            aliased |= {a.student_id, *a.teacher_ids}

    def load_teacher_tokenizer() -> Any:
        if not cfg.teacher_tokenizer:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(cfg.teacher_tokenizer)

    check_vocabulary(
        tokenizer,
        info,
        aliased_ids=aliased,
        load_teacher_tokenizer=load_teacher_tokenizer,
        allow_mismatch=cfg.allow_vocab_mismatch,
        student_name=cfg.tokenizer,
    )
