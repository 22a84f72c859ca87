"""experiments/toy/multitask.py without training: the shared vocabulary, the agent transcripts (legal expert
play, noise and foreign end markers never trained on), the label layout, the config, and the in-process
rollout's agreement with the hf engine's sampling."""

from __future__ import annotations

import random

import pytest
import torch

from experiments.tiny_models import STUDENT_EOS, TEACHER_EOS, tiny_llama_config
from experiments.toy.multitask import (
    ALPHABET,
    InProcessRollout,
    MultiToyConfig,
    agent_segments,
    build_tokenizer,
    encode_segments,
    example_stream,
    math_segments,
)
from experiments.toy.pretrain import IGNORE
from experiments.toy.task import random_problem
from services.common.config import ConfigError
from services.rollout.protocol import GenerateRequest
from services.worker.envs.rooms import RoomsEnv
from services.worker.episode import TURN_PROMPT, observation_text

OPTIONS = dict(num_receptacles=4, num_objects=2, p_closed=0.7)


def test_one_vocabulary_for_all_models():
    t, s = build_tokenizer(TEACHER_EOS), build_tokenizer(STUDENT_EOS)
    assert t.get_vocab() == s.get_vocab()
    assert (t.eos_token, s.eos_token) == (TEACHER_EOS, STUDENT_EOS)
    # everything the game and the math task can print is in it
    env = RoomsEnv(num_receptacles=9, num_objects=10, p_closed=1.0)
    for seed in range(50):
        text = env.reset(seed)
        while True:
            r = env.step(env.expert_action())
            text += r.observation
            if r.done:
                break
        text += (
            "unknown action. your hands are full: you have the mug. the fridge cannot be opened."
            + TURN_PROMPT
        )
        assert set(text) <= set(ALPHABET)
        assert t.unk_token_id not in t(text, add_special_tokens=False)["input_ids"]
    # the math examples exactly as the models are trained on them (no single-task filler may slip in)
    rng = random.Random(0)
    for _ in range(200):
        problem = random_problem(rng, 1, 5)
        text = "".join(seg for seg, _ in math_segments(problem, TEACHER_EOS)[:2])
        assert set(text) <= set(ALPHABET), text
        assert t.unk_token_id not in t(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_agent_transcripts_replay_and_train_only_the_expert(noise):
    rng = random.Random(0)
    for seed in range(200):
        segs = agent_segments(seed, OPTIONS, rng, TEACHER_EOS, STUDENT_EOS, noise, 0.5, 8)
        env = RoomsEnv(**OPTIONS)
        assert segs[0] == (observation_text(env.reset(seed)), False)
        # then triples (action, end marker, observation) and a final (action, own eos)
        body = segs[1:]
        assert len(body) % 3 == 2 and body[-1] == (TEACHER_EOS, True)
        turns = [body[i : i + 3] for i in range(0, len(body), 3)]
        assert len(turns) <= 8
        for i, turn in enumerate(turns):
            (action, trained), (marker, marker_trained) = turn[0], turn[1]
            expert = env.expert_action()
            assert trained == (action == expert) or not trained
            if trained:
                assert action == expert
            r = env.step(action)
            assert marker in (TEACHER_EOS, STUDENT_EOS)
            assert marker_trained == (trained and marker == TEACHER_EOS)  # a foreign marker is never trained
            if i < len(turns) - 1:
                assert turn[2] == (observation_text(r.observation), False)
        assert r.done and r.success and trained


def test_a_turn_limit_below_the_expert_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="max_turns=3"):
        agent_segments(0, OPTIONS, random.Random(0), TEACHER_EOS, STUDENT_EOS, 0.5, 0.5, 3)


def test_noise_and_foreign_markers_occur_at_the_configured_rates():
    rng = random.Random(1)
    noisy = foreign = mids = 0
    for seed in range(400):
        segs = agent_segments(seed, OPTIONS, rng, TEACHER_EOS, STUDENT_EOS, 0.3, 0.5, 8)
        body = segs[1:]
        actions = body[0::3]
        noisy += any(not trained for _, trained in actions)
        markers = [m for (a, ta), (m, _) in zip(body[0::3][:-1], body[1::3][:-1], strict=True) if ta]
        foreign += sum(m == STUDENT_EOS for m in markers)
        mids += len(markers)
    assert 0.2 < noisy / 400 < 0.4
    assert 0.4 < foreign / mids < 0.6


def test_encode_segments_labels_only_trained_segments():
    tok = build_tokenizer(TEACHER_EOS)
    segs = [
        ("goal: x.\n>", False),
        ("look", True),
        (STUDENT_EOS, False),
        ("y.\n>", False),
        ("go to box", True),
        (TEACHER_EOS, True),
    ]
    ids_B_T, labels_B_T = encode_segments([segs, [("1+2=", False), ("3", True), (TEACHER_EOS, True)]], tok)
    text = "goal: x.\n>look"
    expected = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(STUDENT_EOS)]
    expected += tok("y.\n>go to box", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids_B_T[0].tolist() == expected
    lab = labels_B_T[0].tolist()
    trained = [i for i, v in enumerate(lab) if v != IGNORE]
    n0 = len("goal: x.\n>")
    n1 = n0 + 4 + 1 + len("y.\n>")
    assert trained == list(range(n0, n0 + 4)) + list(range(n1, n1 + 9)) + [len(expected) - 1]
    assert [lab[i] for i in trained] == [expected[i] for i in trained]
    # the shorter row is right-padded, its padding unlabelled
    assert ids_B_T[1, 6:].eq(tok.pad_token_id).all() and labels_B_T[1, 6:].eq(IGNORE).all()
    assert labels_B_T[1, :6].tolist() == [IGNORE] * 4 + [ids_B_T[1, 4].item(), tok.eos_token_id]


def test_streams_are_fresh_and_per_task():
    cfg = MultiToyConfig(out="unused")
    math = example_stream(cfg, "student", "math", STUDENT_EOS, TEACHER_EOS, exclude=["12+34="])
    prompts = [next(math)[0][0] for _ in range(200)]
    assert all(p.endswith("=") and not p.startswith("goal") for p in prompts) and "12+34=" not in prompts
    agent = example_stream(cfg, "agent_teacher", "agent", TEACHER_EOS, STUDENT_EOS, exclude=[])
    firsts = [next(agent)[0][0] for _ in range(20)]
    assert all(f.startswith("goal: ") for f in firsts) and len(set(firsts)) > 15
    # the student's and the teacher's transcripts come from different env seeds, and none is an eval seed
    student = example_stream(cfg, "student", "agent", STUDENT_EOS, TEACHER_EOS, exclude=[])
    assert not {next(student)[0][0] for _ in range(20)} & set(firsts)
    with pytest.raises(ValueError, match="kind"):
        next(example_stream(cfg, "student", "chess", STUDENT_EOS, TEACHER_EOS, exclude=[]))


def test_config_validation_and_cache_key():
    assert MultiToyConfig(out="a").cache_key() == MultiToyConfig(out="b", threads=3).cache_key()
    assert MultiToyConfig().cache_key() != MultiToyConfig(student_agent_target=0.5).cache_key()
    for kw, what in [
        (dict(hidden_size=64, num_heads=4), "head"),
        (dict(agent_noise=1.5), "agent_noise"),
        (dict(num_receptacles=1), "num_receptacles"),
        (dict(max_turns=5), "max_turns"),
    ]:
        with pytest.raises(ConfigError, match=what):
            MultiToyConfig(**kw)


def test_in_process_rollout_samples_like_the_engine():
    """Same per-row seeding as the hf engine: same seed, same samples; rows differ; greedy = argmax."""
    tok = build_tokenizer(STUDENT_EOS)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=64, num_heads=2, tokenizer=tok)).eval()
    rollout = InProcessRollout(model, tok)
    prompt = tok("goal: a.\n>", add_special_tokens=False)["input_ids"]
    req = GenerateRequest(prompts=[prompt, prompt], n=2, max_new_tokens=5, seed=3, top_p=0.9)
    a, b = rollout.generate(req), rollout.generate(req)
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    assert len({tuple(s.token_ids) for s in a.samples}) > 1
    greedy = rollout.generate(GenerateRequest(prompts=[prompt], max_new_tokens=4, top_p=1e-6, seed=1))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = model.generate(
            ids,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    assert greedy.samples[0].token_ids == ref[0, len(prompt) :].tolist()[: len(greedy.samples[0].token_ids)]
    lp = torch.log_softmax(
        model(torch.tensor([prompt + greedy.samples[0].token_ids])).logits[0, len(prompt) - 1 : -1], -1
    )
    expect = lp.gather(1, torch.tensor(greedy.samples[0].token_ids)[:, None])[:, 0]
    assert torch.allclose(expect, torch.tensor(greedy.samples[0].logprobs), atol=1e-4)
