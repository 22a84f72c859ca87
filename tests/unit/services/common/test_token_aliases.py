"""token_aliases: parsing, resolution from the two tokenizers, and the config errors."""

import json

import pytest

from experiments.toy.task import build_tokenizer
from services.common.config import ConfigError, build_config
from services.common.token_aliases import AliasMap, parse_aliases, resolve_aliases
from services.worker.config import WorkerConfig
from trainer.config import TrainerConfig

STUDENT = build_tokenizer("</s>")
TEACHER = build_tokenizer("<|im_end|>")


def resolve(raw, **kw) -> AliasMap:
    return resolve_aliases(parse_aliases(raw), kw.pop("student", STUDENT), kw.pop("teacher", TEACHER), **kw)


def test_strings_resolve_to_ids_of_each_tokenizer():
    amap = resolve([["</s>", "<|im_end|>"], ["+", ["1", "2"]]])
    vocab = STUDENT.get_vocab()
    (single,) = amap.single
    assert (single.student_id, single.teacher_ids) == (vocab["</s>"], (vocab["<|im_end|>"],))
    assert amap.spellings == {vocab["+"]: (vocab["1"], vocab["2"])}
    assert amap.groups == {vocab["</s>"]: (vocab["</s>"], vocab["<|im_end|>"])}
    assert amap.candidate_ids.tolist() == sorted([vocab["</s>"], vocab["<|im_end|>"]])
    assert amap.foreign_ids.tolist() == [vocab["<|im_end|>"]]
    assert single.name == "<_s>"  # no '/' in metric keys


def test_ids_need_no_tokenizer_and_json_text_is_accepted():
    amap = resolve("[[3, 4], [5, [6, 7]]]", student=None, teacher=None, student_vocab=18, teacher_vocab=18)
    assert [(a.student_id, a.teacher_ids) for a in amap.aliases] == [(3, (4,)), (5, (6, 7))]
    assert not resolve("", student=None, teacher=None)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (
            [["</s>", "12"]],
            r"'12' is not a single token of the teacher tokenizer: it is 2 tokens \['1', '2'\]",
        ),
        ([["12", "<|im_end|>"]], "not a single token of the student tokenizer"),
        ([["</s>", ["<|im_end|>", "12"]]], r"teacher: '12' is not a single token"),
        ([["</s>", 999]], r"id 999 is outside the teacher vocabulary \[0, 258\)"),  # the toy: 258 ids
        ([[3, 4], [5, 4]], "teacher id 4 is already the alias of student id 3"),
        ([[3, 4], [4, 5]], "teacher id 4 is itself an aliased student id"),
        ([[5, [6, 7]], [5, 8]], "multi-token spelling and another alias"),
        ("[[3, 4]", "not JSON"),
        ([["</s>"]], r"token_aliases\[0\]: expected a \[student, teacher\] pair"),
        ([["</s>", []]], "teacher spelling is empty"),
        ([[True, 4]], "expected a token id or a token string"),
        ([[-1, 4]], "id -1 < 0"),
        ({"</s>": "<|im_end|>"}, "expected a list of"),
    ],
)
def test_resolution_errors_name_the_entry_and_the_reason(raw, match):
    with pytest.raises(ConfigError, match=match):
        resolve(raw)


def test_a_string_without_its_tokenizer_is_an_error():
    with pytest.raises(ConfigError, match="no teacher tokenizer is configured"):
        resolve([["</s>", "<|im_end|>"]], teacher=None)


def test_configs_take_toml_lists_and_json_from_env_and_flags():
    aliases = [["</s>", "<|im_end|>"], ["<think>", ["<", "th", "ink", ">"]]]
    base = dict(model="m")
    assert build_config(TrainerConfig, dict(base, token_aliases=aliases), env={}).token_aliases == aliases
    env = {"OPD_TRAINER_TOKEN_ALIASES": json.dumps(aliases)}
    assert build_config(TrainerConfig, base, env=env).token_aliases == aliases
    cli = {"token_aliases": '[["</s>", 4]]'}
    assert build_config(TrainerConfig, base, env={}, cli=cli).token_aliases == [["</s>", 4]]
    with pytest.raises(ConfigError, match="expected a JSON list"):
        build_config(TrainerConfig, base, env={"OPD_TRAINER_TOKEN_ALIASES": "</s>=<|im_end|>"})
    with pytest.raises(ConfigError, match=r"token_aliases\[0\]"):
        build_config(TrainerConfig, dict(base, token_aliases=[["</s>"]]), env={})
    with pytest.raises(ConfigError, match="not supported with objective full_kl"):
        build_config(TrainerConfig, dict(base, objective="full_kl", token_aliases=aliases), env={})
    worker = build_config(WorkerConfig, dict(prompts="p.jsonl"), env={"OPD_WORKER_TOKEN_ALIASES": "[[3, 4]]"})
    assert worker.token_aliases == [[3, 4]]
    with pytest.raises(ConfigError, match="student"):
        build_config(WorkerConfig, dict(prompts="p.jsonl", token_aliases=[[None, 4]]), env={})


# --- the default masked ids: special tokens the student and teacher tokenizers disagree on


def _char_tok(specials, eos):
    from experiments.tiny_models import build_char_tokenizer

    return build_char_tokenizer("abc", specials, eos_token=eos)


def test_same_tokenizer_or_none_disagrees_on_nothing():
    from services.common.token_aliases import disagreeing_special_ids

    tok = _char_tok(("<pad>", "<s>", "<unk>", "<|im_end|>"), "<|im_end|>")
    assert disagreeing_special_ids(tok, None) == [] and disagreeing_special_ids(tok, tok) == []
    # a separate copy with the same tokens, ids and end marker (Qwen2.5 student and teacher): nothing masked,
    # the shared end marker keeps its gradient
    same = _char_tok(("<pad>", "<s>", "<unk>", "<|im_end|>"), "<|im_end|>")
    assert disagreeing_special_ids(tok, same) == []


def test_disagreement_reference():
    """Reference from the definition: special ids of either side whose string has another id (or none) on
    the other side, plus both end markers when they differ."""
    from services.common.token_aliases import disagreeing_special_ids

    student = _char_tok(("<pad>", "<s>", "<unk>", "</s>", "<|im_end|>"), "</s>")
    # the teacher: same specials at the same ids, its own end marker (the toy task's pair)
    teacher = _char_tok(("<pad>", "<s>", "<unk>", "</s>", "<|im_end|>"), "<|im_end|>")
    assert disagreeing_special_ids(student, teacher) == sorted(
        [student.convert_tokens_to_ids("</s>"), student.convert_tokens_to_ids("<|im_end|>")]
    )
    # a teacher whose <|im_end|> has another id and that lacks </s> and adds <think>
    other = _char_tok(("<pad>", "<s>", "<unk>", "<think>", "<|im_end|>"), "<|im_end|>")
    s_vocab, t_vocab = student.get_vocab(), other.get_vocab()
    expected = set()
    for mine, theirs, tok in ((s_vocab, t_vocab, student), (t_vocab, s_vocab, other)):
        for name in tok.all_special_tokens:
            if theirs.get(name) != mine[name]:
                expected.add(mine[name])
    expected |= {student.eos_token_id, other.eos_token_id}
    got = disagreeing_special_ids(student, other)
    assert got == sorted(expected)
    assert s_vocab["<pad>"] not in got  # agreed on: same id on both sides
    assert t_vocab["<think>"] in got and s_vocab["</s>"] in got
