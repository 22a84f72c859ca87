"""The toy task: generator, reference chain of thought, verifier, tokenizer, training loss, eval helper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.tiny_models import STUDENT_EOS, TEACHER_EOS, tiny_llama_config
from experiments.toy.prepare import ToyConfig
from experiments.toy.pretrain import IGNORE, completion_loss, encode_batch
from experiments.toy.task import (
    FILLERS,
    Problem,
    build_tokenizer,
    extract_answer,
    filler_ids,
    generate_and_score,
    make_splits,
    parse_prompt,
    problem_stream,
    reference_completion,
    verify,
)
from services.common.config import ConfigError
from trainer.lr_schedule import warmup_cosine


@pytest.fixture(scope="module")
def teacher_tok():
    return build_tokenizer(TEACHER_EOS)


@pytest.fixture(scope="module")
def student_tok():
    return build_tokenizer(STUDENT_EOS)


# ----------------------------------------------------------------------------------- task format


def unfilled(completion: str) -> str:
    """The completion without its line-start fillers (each column line starts with exactly one)."""
    *lines, answer = completion.split("\n")
    assert all(line[0] in FILLERS and not set(line[1:]) & set(FILLERS) for line in lines)
    return "\n".join([line[1:] for line in lines] + [answer])


def test_reference_completion_example():
    p = Problem(123, 989)
    assert p.prompt == "123+989="
    assert p.answer == "1112"
    assert p.completion == "ǁ3+9+0=12\nſ2+8+1=11\nĺ1+9+1=11\n=1112"  # fillers seeded by the problem
    assert unfilled(p.completion) == "3+9+0=12\n2+8+1=11\n1+9+1=11\n=1112"
    assert Problem(123, 989).completion == p.completion


def test_reference_completion_pads_shorter_operand_and_keeps_zero_carry_lines():
    assert unfilled(reference_completion(1234, 567)) == "4+7+0=11\n3+6+1=10\n2+5+1=08\n1+0+0=01\n=1801"


def test_fillers_spread_over_the_whole_filler_alphabet(teacher_tok):
    """What makes K matter: the filler after a line break is close to uniform over 240 ids, so a teacher
    that learns the data spreads its mass there over far more than 64 ids."""
    _, ev, _ = make_splits(0, 0, 2000)
    seen = [line[0] for p in ev for line in p.completion.split("\n")[:-1]]
    counts = {f: seen.count(f) for f in FILLERS}
    assert min(counts.values()) > 0 and max(counts.values()) < 4 * len(seen) / len(FILLERS)
    assert len(teacher_tok) == 258 and sorted(filler_ids(teacher_tok)) == list(range(18, 258))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_chain_of_thought_is_schoolbook_addition(a, b):
    """Every line is one column of long addition, read back independently of how it was written."""
    *lines, answer_line = unfilled(reference_completion(a, b)).split("\n")
    assert answer_line == f"={a + b}"
    da, db = str(a)[::-1], str(b)[::-1]
    assert len(lines) == max(len(da), len(db))
    carry, digits = 0, []
    for i, line in enumerate(lines):
        lhs, rhs = line.split("=")
        x, y, c = (int(v) for v in lhs.split("+"))
        assert x == (int(da[i]) if i < len(da) else 0)
        assert y == (int(db[i]) if i < len(db) else 0)
        assert c == carry
        assert len(rhs) == 2 and int(rhs) == x + y + c
        carry, digits = int(rhs[0]), digits + [rhs[1]]
    written = ("1" if carry else "") + "".join(reversed(digits))
    assert int(written) == a + b


def test_parse_prompt_round_trip_and_rejects_other_text():
    assert parse_prompt("123+989=") == Problem(123, 989)
    for bad in ("123+989", "12a+3=", "", "1+2=3"):
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_negative_operands_rejected():
    with pytest.raises(ValueError):
        reference_completion(-1, 5)


# ------------------------------------------------------------------------------------------ splits


def test_splits_deterministic_distinct_and_disjoint():
    train, ev, val = make_splits(seed=0, n_train=3000, n_eval=200, n_val=150)
    assert (train, ev, val) == make_splits(seed=0, n_train=3000, n_eval=200, n_val=150)
    assert len(train) == 3000 and len(ev) == 200 and len(val) == 150
    prompts = [{p.prompt for p in split} for split in (train, ev, val)]
    assert [len(p) for p in prompts] == [3000, 200, 150]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    other_train, other_ev, _ = make_splits(seed=1, n_train=3000, n_eval=200)
    assert other_ev != ev and other_train != train
    assert make_splits(0, 10, 5)[2] == []  # no validation split unless asked


def test_held_out_splits_do_not_depend_on_train_size():
    assert make_splits(0, 100, 50)[1] == make_splits(0, 2000, 50)[1]
    assert make_splits(0, 100, 50, n_val=20)[1:] == make_splits(0, 2000, 50, n_val=20)[1:]
    # adding a validation split leaves the test split as it was
    assert make_splits(0, 100, 50, n_val=20)[1] == make_splits(0, 100, 50)[1]


def test_operand_widths_follow_config():
    train, ev, _ = make_splits(seed=3, n_train=2000, n_eval=100, min_digits=3, max_digits=4)
    widths = {len(str(x)) for p in train + ev for x in (p.a, p.b)}
    assert widths == {3, 4}


def test_too_many_problems_for_the_space_is_an_error():
    with pytest.raises(ValueError, match="distinct prompts"):
        make_splits(0, n_train=100, n_eval=10, min_digits=1, max_digits=1)


def test_problem_stream_is_deterministic_and_excludes():
    _, ev, _ = make_splits(0, 10, 5, min_digits=1, max_digits=1)
    banned = {p.prompt for p in ev}
    first = [next(s) for s in [problem_stream(7, 1, 1, exclude=banned)] for _ in range(200)]
    again = [next(s) for s in [problem_stream(7, 1, 1, exclude=banned)] for _ in range(200)]
    assert first == again
    assert not {p.prompt for p in first} & banned
    assert len({p.prompt for p in first}) > 20  # the stream really varies


# --------------------------------------------------------------------------------------- tokenizer


def test_completions_are_at_least_30_tokens(teacher_tok):
    train, ev, _ = make_splits(0, 500, 100)
    for p in train + ev + [Problem(100, 100)]:  # 100+100 is the shortest possible completion
        ids = teacher_tok(p.completion, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(p.completion) >= 30


def test_tokenizer_round_trip(teacher_tok, student_tok):
    p = Problem(9876, 543)
    for tok in (teacher_tok, student_tok):
        for text in (p.prompt, p.completion, p.prompt + p.completion):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
            assert tok.unk_token_id not in ids


def test_end_markers_single_distinct_special_tokens_in_a_shared_vocab(teacher_tok, student_tok):
    assert teacher_tok.get_vocab() == student_tok.get_vocab()
    assert len(teacher_tok) == 5 + 13 + 240  # specials, the task alphabet, the fillers
    assert teacher_tok.eos_token == TEACHER_EOS and student_tok.eos_token == STUDENT_EOS
    assert teacher_tok.eos_token_id != student_tok.eos_token_id
    for marker in (TEACHER_EOS, STUDENT_EOS):
        ids = teacher_tok(marker, add_special_tokens=False)["input_ids"]
        assert ids == [teacher_tok.convert_tokens_to_ids(marker)]
        assert marker in teacher_tok.all_special_tokens and marker in student_tok.all_special_tokens


def test_build_tokenizer_rejects_unknown_end_marker():
    with pytest.raises(ValueError):
        build_tokenizer("<eos>")


# ---------------------------------------------------------------------------------------- verifier


def test_verifier_accepts_reference_with_or_without_end_marker():
    p = Problem(123, 989)
    for suffix in ("", STUDENT_EOS, TEACHER_EOS, "\n", f"{TEACHER_EOS}{TEACHER_EOS}", f"{STUDENT_EOS}9+9="):
        assert verify(p.completion + suffix, p.answer), suffix
    assert extract_answer(p.completion) == "1112"


def test_verifier_rejects_every_truncation():
    p = Problem(4567, 8899)
    for cut in range(len(p.completion)):
        assert not verify(p.completion[:cut], p.answer), p.completion[:cut]
        assert not verify(p.completion[:cut] + STUDENT_EOS, p.answer)


@pytest.mark.parametrize(
    "text",
    [
        "3+9+0=12\n2+8+1=11\n1+9+1=11\n=1113",  # wrong answer
        "3+9+0=12\n2+8+1=11\n1+9+1=11\n=01112",  # leading zero: not the exact answer
        "3+9+0=12\n=1112x",
        "=1112\n3+9+0=12",  # the answer must be on the last line
        "=1112=1112",
        "= 1112",
        "1112",
        "",
        "\x00\xff<unk>",
        "<|im_end|>=1112",  # everything after the first end marker is ignored
        "=1112 garbage",
        "=１１１２",  # non-ASCII digits are not digits of the answer
    ],
)
def test_verifier_rejects_wrong_and_garbage(text):
    assert not verify(text, "1112")


def test_verifier_never_raises_on_non_text():
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert extract_answer(b"=1112") is None  # type: ignore[arg-type]
    assert not verify(None, "1112")  # type: ignore[arg-type]
    assert extract_answer("=１１１２") is None  # fullwidth digits are not ASCII digits


def test_verifier_ignores_trailing_whitespace():
    assert verify("=1112 \n", "1112")


# ------------------------------------------------------------------------------------ training loss


def test_encode_batch_masks_prompt_and_padding(teacher_tok):
    problems = [Problem(123, 989), Problem(1234, 5678)]
    ids_B_T, labels_B_T = encode_batch(problems, teacher_tok)
    for i, p in enumerate(problems):
        n_p, n_c = len(p.prompt), len(p.completion) + 1
        assert teacher_tok.decode(ids_B_T[i, :n_p]) == p.prompt
        assert teacher_tok.decode(ids_B_T[i, n_p : n_p + n_c - 1]) == p.completion
        assert ids_B_T[i, n_p + n_c - 1] == teacher_tok.eos_token_id
        assert (ids_B_T[i, n_p + n_c :] == teacher_tok.pad_token_id).all()
        assert (labels_B_T[i, :n_p] == IGNORE).all() and (labels_B_T[i, n_p + n_c :] == IGNORE).all()
        assert torch.equal(labels_B_T[i, n_p : n_p + n_c], ids_B_T[i, n_p : n_p + n_c])


def test_completion_loss_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits_B_T_V = torch.randn(B, T, V, generator=g)
    labels_B_T = torch.randint(0, V, (B, T), generator=g)
    labels_B_T[:, :2] = IGNORE
    labels_B_T[2, 5:] = IGNORE
    loss, exact_B = completion_loss(logits_B_T_V, labels_B_T)
    total, count = 0.0, 0
    for b in range(B):
        for t in range(1, T):  # label t is predicted by logit t-1
            if labels_B_T[b, t] != IGNORE:
                total += -F.log_softmax(logits_B_T_V[b, t - 1], -1)[labels_B_T[b, t]].item()
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert not exact_B.any()  # random logits almost surely miss some token

    # Logits that put the argmax on every labelled next token: exact; break one row: not exact.
    perfect_B_T_V = torch.zeros(B, T, V)
    for b in range(B):
        for t in range(1, T):
            if labels_B_T[b, t] != IGNORE:
                perfect_B_T_V[b, t - 1, labels_B_T[b, t]] = 5.0
    assert completion_loss(perfect_B_T_V, labels_B_T)[1].all()
    perfect_B_T_V[1, 4] = 0.0
    perfect_B_T_V[1, 4, (labels_B_T[1, 5] + 1) % V] = 5.0
    assert completion_loss(perfect_B_T_V, labels_B_T)[1].tolist() == [True, False, True]


def test_completion_loss_free_ids_do_not_count_in_the_exact_match():
    labels_B_T = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, 1, 4, 3]])
    logits_B_T_V = torch.zeros(2, 4, 5)
    for b in range(2):
        for t in range(1, 4):
            logits_B_T_V[b, t - 1, 3 if labels_B_T[b, t] == 4 else labels_B_T[b, t]] = 5.0  # 4 is missed
    loss, exact_B = completion_loss(logits_B_T_V, labels_B_T)
    assert exact_B.tolist() == [True, False]
    loss_free, exact_free_B = completion_loss(logits_B_T_V, labels_B_T, free_ids=[4])
    assert exact_free_B.tolist() == [True, True] and loss_free.item() == pytest.approx(loss.item())


def test_completion_loss_all_masked_is_an_error():
    with pytest.raises(ValueError):
        completion_loss(torch.zeros(2, 4, 5), torch.full((2, 4), IGNORE))


def test_lr_schedule_warmup_and_cosine_ends():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 10, 0.1) == pytest.approx(0.1)


# --------------------------------------------------------------------------------------- eval helper


def test_batched_left_padded_generation_matches_one_by_one(student_tok):
    """Left padding must not change what a model generates: batch of mixed lengths == one at a time."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(
        len(student_tok), hidden_size=64, num_layers=1, num_heads=2, tokenizer=student_tok
    )
    model = LlamaForCausalLM(config)
    problems = [Problem(1, 2), Problem(1234, 5678), Problem(55, 999), Problem(100, 1000)]
    prompts, answers = [p.prompt for p in problems], [p.answer for p in problems]
    batched = generate_and_score(model, student_tok, prompts, answers, max_new_tokens=12, batch_size=8)
    single = generate_and_score(model, student_tok, prompts, answers, max_new_tokens=12, batch_size=1)
    assert batched.completions == single.completions
    assert all(c for c in batched.completions)


def _scripted_llama(tokenizer, scripts: dict[str, str]):
    """A real Llama under `generate` whose next token is read from a script: prompt text -> completion
    text (special tokens allowed). Past the end of its script a row emits newlines forever."""
    from transformers import LlamaForCausalLM

    class Scripted(LlamaForCausalLM):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            done = past_key_values.get_seq_length() if past_key_values is not None else 0
            out = super().forward(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
            if done == 0:  # the prefill call: remember which prompt each row is
                self.prompt_width = input_ids.shape[1]
                self.rows = [
                    tokenizer(
                        scripts[tokenizer.decode(row, skip_special_tokens=True)], add_special_tokens=False
                    )["input_ids"]
                    for row in input_ids.tolist()
                ]
            k = done + input_ids.shape[1] - self.prompt_width  # tokens generated so far
            logits_B_T_V = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
            for b, script in enumerate(self.rows):
                logits_B_T_V[
                    b, 0, script[k] if k < len(script) else tokenizer.convert_tokens_to_ids("\n")
                ] = 1
            out.logits = logits_B_T_V
            return out

    config = tiny_llama_config(len(tokenizer), hidden_size=64, num_layers=1, num_heads=2, tokenizer=tokenizer)
    torch.manual_seed(0)
    return Scripted(config)


def test_generate_and_score_counts_verified_completions(student_tok):
    p0, p1, p2, p3, p4 = Problem(12, 34), Problem(1234, 5678), Problem(5, 5), Problem(999, 1), Problem(7, 80)
    scripts = {
        p0.prompt: p0.completion + STUDENT_EOS,  # right, ends with its own end marker
        p1.prompt: p1.completion[:-1] + "0" + STUDENT_EOS,  # wrong answer
        p2.prompt: p2.completion,  # right answer line, never ends (newlines follow)
        p3.prompt: p3.completion + TEACHER_EOS + "=7",  # right, but ends with the other model's marker
        p4.prompt: p4.completion[:10],  # truncated
    }
    model = _scripted_llama(student_tok, scripts)
    problems = [p0, p1, p2, p3, p4]
    res = generate_and_score(
        model,
        student_tok,
        [p.prompt for p in problems],
        [p.answer for p in problems],
        max_new_tokens=50,
        batch_size=2,
    )
    assert res.completions[0] == p0.completion + STUDENT_EOS
    assert res.completions[2].startswith(p2.completion + "\n")
    assert [verify(c, p.answer) for c, p in zip(res.completions, problems, strict=True)] == [
        True,
        False,
        True,
        True,
        False,
    ]
    assert res.lenient_accuracy == pytest.approx(3 / 5)
    assert res.accuracy == pytest.approx(1 / 5)  # strict: only p0 is right AND ends with its own marker
    assert res.eos_rate == pytest.approx(2 / 5)
    lengths = [len(p0.completion) + 1, len(p1.completion) + 1, 50, 50, 50]
    assert res.mean_new_tokens == pytest.approx(sum(lengths) / 5)


def test_generate_and_score_rejects_mismatched_inputs(student_tok):
    model = _scripted_llama(student_tok, {})
    with pytest.raises(ValueError):
        generate_and_score(model, student_tok, ["1+2="], [])
    with pytest.raises(ValueError):
        generate_and_score(model, student_tok, [], [])


def test_toy_config_validation_and_cache_key():
    with pytest.raises(ConfigError, match="hidden_size / num_heads"):
        ToyConfig(hidden_size=64, num_heads=4)  # head_dim 16
    with pytest.raises(ConfigError, match="student_target"):
        ToyConfig(student_target=0.0)
    with pytest.raises(ConfigError, match="min_digits"):
        ToyConfig(min_digits=5, max_digits=4)
    base = ToyConfig()
    assert base.cache_key() == ToyConfig(out="elsewhere", device="cuda", threads=3, force=True).cache_key()
    assert base.cache_key() != ToyConfig(seed=1).cache_key()
    assert base.cache_key() != ToyConfig(student_target=0.3).cache_key()


@pytest.mark.parametrize(
    ("load", "cores", "expected"), [(0.0, 2, 2), (0.9, 2, 2), (1.5, 2, 1), (9.0, 2, 1), (3.2, 16, 13)]
)
def test_auto_threads_leaves_busy_cores_alone(monkeypatch, load, cores, expected):
    from experiments.toy import cache as prep

    monkeypatch.setattr(prep.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(prep.os, "cpu_count", lambda: cores)
    assert prep.auto_threads() == expected
