"""Prompt files: JSONL and Parquet rows, sharding across workers, epochs, chat templates, bad rows."""

import json
import re
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments.tiny_models import BOS, build_char_tokenizer
from services.common.prompts import Prompt, PromptFileError, cycle_prompts, load_prompts

ROWS = [{"prompt": f"what is {i}+{i}?", "answer": str(2 * i)} for i in range(11)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_in_order_with_answers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "a?", "answer": 7, "extra": [1]}) + "\n\n" + json.dumps({"prompt": "b?"})
    )
    got = load_prompts(path)
    assert got == [Prompt(row=0, text="a?", answer="7"), Prompt(row=1, text="b?", answer="")]
    assert all(p.token_ids is None for p in got)


def test_parquet_matches_jsonl(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    write_jsonl(tmp_path / "p.jsonl", ROWS)
    from_parquet = load_prompts(tmp_path / "p.parquet")
    assert from_parquet == load_prompts(tmp_path / "p.jsonl")
    assert [p.text for p in from_parquet] == [r["prompt"] for r in ROWS]
    assert [p.answer for p in from_parquet] == [r["answer"] for r in ROWS]


@pytest.mark.parametrize("num_workers", [1, 2, 3, 4, 11, 13])
def test_shards_are_disjoint_and_complete(tmp_path, num_workers):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    shards = [load_prompts(path, w, num_workers) for w in range(num_workers)]
    rows = [p.row for shard in shards for p in shard]
    assert sorted(rows) == list(range(len(ROWS)))  # complete, no duplicates
    for w, shard in enumerate(shards):
        assert all(p.row % num_workers == w for p in shard)
        assert [p.text for p in shard] == [ROWS[p.row]["prompt"] for p in shard]
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_bad_worker_index(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(ValueError, match="worker_index 2"):
        load_prompts(path, 2, 2)


def test_cycle_epochs(tmp_path):
    shard = load_prompts(write_jsonl(tmp_path / "p.jsonl", ROWS[:3]))
    got = list(cycle_prompts(shard, epochs=2))
    assert [(p.row, p.epoch) for p in got] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    forever = list(islice(cycle_prompts(shard, epochs=0), 10))
    assert [p.row for p in forever] == [0, 1, 2] * 3 + [0]
    assert forever[-1].epoch == 3
    assert list(cycle_prompts([], epochs=0)) == []


def test_cycle_shuffled_per_seed_and_epoch():
    shard = [Prompt(row=r, text=str(r)) for r in range(50)]

    def rows(seed, epochs=3):
        got = list(cycle_prompts(shard, epochs=epochs, shuffle_seed=seed))
        return [[p.row for p in got if p.epoch == e] for e in range(epochs)]

    a = rows("0:0")
    # Every epoch is a permutation of the whole shard, in its own order, reproducible from the seed.
    assert all(sorted(epoch) == list(range(50)) for epoch in a)
    assert a[0] != list(range(50)) and a[0] != a[1] != a[2]
    assert rows("0:0") == a
    assert rows("1:0")[0] != a[0]


def chat_tokenizer():
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tok


def test_messages_use_chat_template(tmp_path):
    tok = chat_tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": messages, "answer": "5"}])
    (p,) = load_prompts(path, tokenizer=tok)
    expected_text = "<s>system: be brief\nuser: 2+3?\nassistant: "
    assert p.text == expected_text
    # Reference: BOS once (from the template, not added again by the tokenizer), then one id per character.
    vocab = tok.get_vocab()
    assert p.token_ids == tuple([vocab[BOS]] + [vocab[c] for c in expected_text[len(BOS) :]])
    assert p.answer == "5"


def test_messages_without_tokenizer_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(PromptFileError, match="row 0.*needs a tokenizer"):
        load_prompts(path)


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"question": "x"}, "neither `prompt` nor `messages`"),
        ({"prompt": ""}, "non-empty string"),
        ({"prompt": 3}, "non-empty string"),
        ({"prompt": "a", "messages": []}, "not both"),
        ({"messages": [{"role": "user"}]}, "list of {role, content}"),
        ({"messages": []}, "list of {role, content}"),
    ],
)
def test_bad_rows_name_the_row(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, row])
    with pytest.raises(PromptFileError, match=f"row 1: .*{re.escape(reason)}"):
        load_prompts(path, tokenizer=chat_tokenizer())


def test_bad_files(tmp_path):
    with pytest.raises(PromptFileError, match="no such prompt file"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    with pytest.raises(PromptFileError, match="unknown prompt file type"):
        load_prompts(tmp_path / "p.csv")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(PromptFileError, match="bad.jsonl:2: not JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(PromptFileError, match="expected a JSON object"):
        load_prompts(tmp_path / "list.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(tmp_path / "empty.jsonl")
