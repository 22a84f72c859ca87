"""`opd toy prepare-multi` end to end with a tiny training budget: files, the three models (one vocabulary,
their own end markers), meta.json, the student's per-task schedule, and the cache.

The full-size rates (teachers strong, student weak on both tasks) take minutes and are measured by hand
(docs/multitask.md); here the models are a few steps old and only the mechanics are checked.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from experiments.tiny_models import STUDENT_EOS, TEACHER_EOS
from experiments.toy.multitask import ROLES, MultiToyConfig, main, prepare
from experiments.toy.task import parse_prompt, read_jsonl
from services.common.hf_models import load_causal_lm

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = dict(
    n_train=20,
    n_eval=6,
    n_env_eval=4,
    n_probe=3,
    max_turns=6,
    batch_size=4,
    warmup_steps=1,
    math_teacher_steps=3,
    agent_teacher_steps=2,
    student_steps=9,
    student_probe_every=4,
    threads=1,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = MultiToyConfig(out=str(tmp_path_factory.mktemp("toy-multi")), **TINY)
    return cfg, prepare(cfg)


def test_outputs_and_meta(prepared):
    cfg, result = prepared
    assert not result.cached
    meta = result.meta
    assert json.loads(result.paths.meta.read_text()) == meta and meta["config_hash"] == cfg.cache_key()
    assert meta["math_teacher"]["train_steps"] == 3 and meta["agent_teacher"]["train_steps"] == 2
    student = meta["student"]
    # unreachable targets in 9 steps: the whole budget ran, 40% of the batches on the agent task, 2 probes
    assert student["train_steps"] == 9 and student["train_steps_per_task"] == {"math": 5, "agent": 4}
    assert not student["reached_target"] and [h[0] for h in student["probe_history"]] == [4, 8]
    for role in ROLES:
        m = meta[role]
        for key in (
            "math_pass1_greedy",
            "math_pass1_sampled",
            "agent_success_greedy",
            "agent_success_sampled",
        ):
            assert 0.0 <= m[key] <= 1.0
        assert m["agent_example"].startswith("goal: ")
    assert meta["agent"]["env"] == "rooms" and meta["agent"]["max_turns"] == 6
    assert meta["agent"]["eval_seeds"] == [1_000_000, 1_000_004]


def test_data_and_models(prepared):
    _, result = prepared
    train_prompts, train_answers = read_jsonl(result.paths.math_train)
    eval_prompts, _ = read_jsonl(result.paths.math_eval)
    assert len(train_prompts) == 20 and len(eval_prompts) == 6 and not set(train_prompts) & set(eval_prompts)
    for prompt, answer in zip(train_prompts, train_answers, strict=True):
        p = parse_prompt(prompt)
        assert answer == str(p.a + p.b)
    vocabs = []
    for role in ROLES:
        path = result.paths.model(role)
        tok = AutoTokenizer.from_pretrained(path)
        model = load_causal_lm(path)
        eos = STUDENT_EOS if role == "student" else TEACHER_EOS
        assert tok.eos_token == eos and model.generation_config.eos_token_id == tok.eos_token_id
        assert model.config.hidden_size == 64 and model.config.max_position_embeddings == 512
        vocabs.append(tok.get_vocab())
    assert vocabs[0] == vocabs[1] == vocabs[2]


def test_cache_hit_and_cli(prepared, capsys):
    cfg, result = prepared
    again = prepare(cfg)
    assert again.cached and again.meta == result.meta
    assert main(["--out", cfg.out, *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["--hidden-size", "64", "--num-heads", "4"]) == 2
