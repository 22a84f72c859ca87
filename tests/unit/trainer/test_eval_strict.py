"""Strict and lenient eval scores (trainer/eval.py), from token ids, against a count written by hand."""

from __future__ import annotations

from experiments.tiny_models import STUDENT_EOS, TEACHER_EOS
from experiments.toy.task import build_tokenizer
from services.common.verifiers import own_end_ids, score_samples, toy_arith
from trainer.eval import _rates

TOK = build_tokenizer(STUDENT_EOS)
OWN, FOREIGN = TOK.convert_tokens_to_ids([STUDENT_EOS, TEACHER_EOS])


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_score_samples_and_rates():
    end_ids = own_end_ids(TOK)
    # prompt 0: right + own marker, right + teacher marker; prompt 1: wrong + own, right + no marker
    per_prompt = [
        ([ids("=12") + [OWN], ids("=12") + [FOREIGN] + ids("\n=9")], "12"),
        ([ids("=13") + [OWN], ids("=5")], "5"),
    ]
    lenient, strict = [], []
    for samples, answer in per_prompt:
        scored = score_samples(TOK, samples, answer, toy_arith, end_ids)
        lenient.append(scored.lenient)
        strict.append(scored.strict)
        assert scored.own == [sample[-1] == OWN for sample in samples]
    assert lenient == [[1.0, 1.0], [0.0, 1.0]]
    assert strict == [[1.0, 0.0], [0.0, 0.0]]
    assert _rates(strict, "eval", "") == {"eval/pass@1": 0.25, "eval/avg@2": 0.25, "eval/pass@2": 0.5}
    assert _rates(lenient, "val", "_lenient") == {
        "val/pass@1_lenient": 0.75,
        "val/avg@2_lenient": 0.75,
        "val/pass@2_lenient": 1.0,
    }
