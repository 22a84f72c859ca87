"""The worker's vocabulary check (services/worker/vocab_check.py): student and teacher tokenizer hashes."""

from __future__ import annotations

import pytest
from opd_teacher_client.v1 import teacher_pb2

from experiments.tiny_models import BOS, PAD, STUDENT_EOS, TEACHER_EOS, UNK, build_char_tokenizer
from experiments.toy.task import build_tokenizer
from services.common.config import ConfigError
from services.worker.vocab_check import (
    OVERRIDE,
    check_vocabulary,
    differing_ids,
    tokenizer_hash,
    vocab_sha256,
)


def info_of(tok, model_id="teacher") -> teacher_pb2.TeacherInfo:
    """The GetInfo answer a teacher serving `tok` gives (as services/teacher/servicer.py fills it)."""
    return teacher_pb2.TeacherInfo(
        model_id=model_id,
        vocab_size=len(tok),
        tokenizer_sha256=vocab_sha256(tok),
        special_token_ids=sorted(set(tok.all_special_ids)),
    )


def check(student, teacher, aliased=(), allow=False, teacher_tok="same"):
    loaded = teacher if teacher_tok == "same" else teacher_tok
    check_vocabulary(
        student,
        info_of(teacher),
        aliased_ids=set(aliased),
        load_teacher_tokenizer=lambda: loaded,
        allow_mismatch=allow,
    )


def test_tokenizer_hash_takes_the_special_ids_as_a_set():
    assert tokenizer_hash("ab", [3, 1]) == tokenizer_hash("ab", (1, 3, 3)) != tokenizer_hash("ab", [1])


def test_toy_student_and_teacher_share_a_vocabulary():
    # different end markers, one vocabulary: both hold both markers as special tokens at the same ids
    check(build_tokenizer(STUDENT_EOS), build_tokenizer(TEACHER_EOS))


def test_different_vocabularies_stop_the_worker_naming_both_hashes_and_the_override():
    student, teacher = build_char_tokenizer("abc"), build_char_tokenizer("abd")
    s_hash = tokenizer_hash(vocab_sha256(student), student.all_special_ids)
    t_hash = tokenizer_hash(vocab_sha256(teacher), teacher.all_special_ids)
    with pytest.raises(ConfigError) as err:
        check(student, teacher)
    assert s_hash in str(err.value) and t_hash in str(err.value) and OVERRIDE in str(err.value)
    check(student, teacher, allow=True)  # the explicit override


def test_same_vocabulary_different_special_tokens_is_a_mismatch():
    student, teacher = build_tokenizer(STUDENT_EOS), build_tokenizer(STUDENT_EOS)
    plus = teacher.convert_tokens_to_ids("+")
    teacher.add_special_tokens({"additional_special_tokens": [STUDENT_EOS, TEACHER_EOS, "+"]})
    assert vocab_sha256(student) == vocab_sha256(teacher) and plus in teacher.all_special_ids
    assert differing_ids(student, teacher) == {plus}
    with pytest.raises(ConfigError, match="do not share a vocabulary"):
        check(student, teacher)
    check(student, teacher, aliased={plus})


def test_aliased_vocabularies_may_differ_exactly_on_the_aliased_ids():
    # id 3 is </s> for the student and <|im_end|> for the teacher; everything else agrees
    student = build_char_tokenizer("abc", (PAD, BOS, UNK, STUDENT_EOS), eos_token=STUDENT_EOS)
    teacher = build_char_tokenizer("abc", (PAD, BOS, UNK, TEACHER_EOS), eos_token=TEACHER_EOS)
    assert differing_ids(student, teacher) == {3}
    check(student, teacher, aliased={3})
    with pytest.raises(ConfigError, match=r"differ on 1 ids outside the aliased ids \[5\]"):
        check(student, teacher, aliased={5})
    # a teacher_tokenizer that is not the served teacher's cannot vouch for the difference
    with pytest.raises(ConfigError, match="is not the served teacher's"):
        check(student, teacher, aliased={3}, teacher_tok=student)
    with pytest.raises(ConfigError, match="set teacher_tokenizer"):
        check(student, teacher, aliased={3}, teacher_tok=None)
    # more than the aliased ids differ: refused
    other = build_char_tokenizer("abd", (PAD, BOS, UNK, TEACHER_EOS), eos_token=TEACHER_EOS)
    with pytest.raises(ConfigError, match=r"first: \[6\]"):
        check(student, other, aliased={3})
