"""`opd toy prepare` end to end with a tiny training budget: files, formats, determinism, the cache.

The full-size quality targets (teacher >= 90%, student <= 50%) take minutes and are measured by hand; here
the models are a few steps old and only the mechanics are checked.
"""

from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from experiments.tiny_models import STUDENT_EOS, TEACHER_EOS
from experiments.toy.prepare import ToyConfig, main, prepare
from experiments.toy.task import generate_and_score, parse_prompt, read_jsonl
from services.common.hf_models import load_causal_lm

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_toy_budget):
    cfg = ToyConfig(out=str(tmp_path_factory.mktemp("toy")), **tiny_toy_budget)
    return cfg, prepare(cfg)


def test_outputs_and_meta(prepared):
    cfg, result = prepared
    assert not result.cached
    paths, meta = result.paths, result.meta
    assert json.loads(paths.meta.read_text()) == meta
    assert meta["config_hash"] == cfg.cache_key()
    for role, steps in (("teacher", 6), ("student", 4)):
        m = meta[role]
        assert m["train_steps"] == steps  # targets are out of reach in a few steps: the full budget ran
        assert 0.0 <= m["pass1_greedy"] <= 1.0 and 0.0 <= m["pass1_sampled"] <= 1.0
    assert meta["teacher"]["eos_token"] == TEACHER_EOS and meta["student"]["eos_token"] == STUDENT_EOS


def test_data_files(prepared):
    _, result = prepared
    train_prompts, train_answers = read_jsonl(result.paths.train)
    eval_prompts, eval_answers = read_jsonl(result.paths.eval)
    val_prompts, _ = read_jsonl(result.paths.val)
    assert len(train_prompts) == 60 and len(eval_prompts) == 12 and len(val_prompts) == 200
    assert not set(train_prompts) & set(eval_prompts)
    assert not set(val_prompts) & (set(train_prompts) | set(eval_prompts))
    assert result.meta["data"]["n_val"] == 200
    for prompt, answer in zip(train_prompts + eval_prompts, train_answers + eval_answers, strict=True):
        p = parse_prompt(prompt)
        assert answer == str(p.a + p.b)


def test_models_load_in_transformers_with_their_own_end_markers(prepared):
    _, result = prepared
    vocabs = []
    for role, eos in (("teacher", TEACHER_EOS), ("student", STUDENT_EOS)):
        path = getattr(result.paths, role)
        tok = AutoTokenizer.from_pretrained(path)
        model = load_causal_lm(path)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.config.head_dim == 32
        assert tok.eos_token == eos
        assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
        vocabs.append(tok.get_vocab())
        # The saved model generates what the in-memory one did when meta.json was written.
        eval_prompts, eval_answers = read_jsonl(result.paths.eval)
        again = generate_and_score(model, tok, eval_prompts[:1], eval_answers[:1], max_new_tokens=48, seed=0)
        assert again.completions[0] == result.meta[role]["example_completion"]
    assert vocabs[0] == vocabs[1]


def test_second_call_is_cached_and_force_retrains(prepared):
    cfg, first = prepared
    weights = first.paths.teacher / "model.safetensors"
    mtime, before = weights.stat().st_mtime_ns, load_file(weights)
    t0 = time.perf_counter()
    again = prepare(cfg)
    assert again.cached and time.perf_counter() - t0 < 5.0
    assert again.meta == first.meta and weights.stat().st_mtime_ns == mtime

    forced = prepare(ToyConfig(**{**vars(cfg), "force": True}))
    assert not forced.cached and weights.stat().st_mtime_ns != mtime
    after = load_file(weights)  # retrained from the same seed: the same weights
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_deterministic_from_seed_and_keyed_by_config(prepared, tmp_path):
    cfg, first = prepared
    other = prepare(ToyConfig(**{**vars(cfg), "out": str(tmp_path / "a")}))
    assert not other.cached
    for role in ("teacher", "student"):
        w1 = load_file(getattr(first.paths, role) / "model.safetensors")
        w2 = load_file(getattr(other.paths, role) / "model.safetensors")
        assert all((w1[k] == w2[k]).all() for k in w1)
    assert first.paths.eval.read_text() == other.paths.eval.read_text()
    assert first.paths.train.read_text() == other.paths.train.read_text()

    reseeded = prepare(ToyConfig(**{**vars(cfg), "out": str(tmp_path / "a"), "seed": 1}))
    assert not reseeded.cached and reseeded.meta["config_hash"] != first.meta["config_hash"]
    assert reseeded.paths.eval.read_text() != first.paths.eval.read_text()


def test_cli_reads_toml_section_and_prints_summary(prepared, tmp_path, capsys, tiny_toy_budget):
    cfg, _ = prepared
    toml = tmp_path / "toy.toml"
    lines = [f"{k} = {json.dumps(v)}" for k, v in tiny_toy_budget.items()]
    toml.write_text("[toy]\n" + "\n".join(lines) + "\n")
    assert main(["--config", str(toml), "--out", cfg.out]) == 0  # same config as the fixture: cached
    out = capsys.readouterr().out
    assert "cached" in out and "teacher" in out and "student" in out and "<|im_end|>" in out
