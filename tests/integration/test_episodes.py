"""Multi-turn episodes against real servers on loopback (hf rollout HTTP service, hf teacher gRPC server,
tiny random Llamas, a real redis-server): the record is the transcript that was played, the teacher was
asked to score exactly the student's spans (each in its full context), environment tokens carry zero weight
in every objective, a 3-turn record round-trips through Redis intact, and the greedy evaluator's success
rate matches greedy decoding done directly with transformers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from experiments.tiny_models import build_char_tokenizer
from services.common.experience import decode, encode
from services.common.hf_models import load_causal_lm
from services.common.redis_keys import RECORD_FIELD, connect
from services.common.verifiers import completion_text
from services.worker.envs import make_env
from services.worker.envs.base import StepResult
from services.worker.episode import EpisodeSettings, evaluate_env, observation_text, run_episodes
from services.worker.record import BadPromptError
from tests.integration.stack import loopback_stack
from trainer.config import TrainerConfig
from trainer.data import check_record, collate, sequences_of
from trainer.objective import compute_objective

pytestmark = pytest.mark.integration

G, TURNS, NEW, SEED = 3, 3, 6, 5


class Recording:
    """Passes every call through to the real client and keeps (method, args, kwargs, result)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls.append((name, args, kwargs, out))
            return out

        return wrapped


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    V = len(build_char_tokenizer())
    with loopback_stack(tmp_path_factory.mktemp("episodes"), teachers={"teacher": {"max_top_k": V}}) as s:
        tok, rollout, teacher_client = s.tok, s.rollout, s.teacher_client
        rec_rollout, rec_teacher = Recording(rollout), Recording(teacher_client)
        settings = EpisodeSettings(
            group_size=G,
            max_turns=TURNS,
            max_new_tokens=NEW,
            temperature=1.0,
            top_p=0.9,
            top_k=V,
            sample_seed=3,
        )
        record = run_episodes(
            make_env=lambda: make_env("rooms"),
            env_seed=SEED,
            rollout=rec_rollout,
            teacher=rec_teacher,
            tokenizer=tok,
            settings=settings,
            record_id="ep-1",
            task="rooms",
            teacher_model_id=teacher_client.model_id,
        )
        yield dict(
            tok=tok,
            V=V,
            student=s.student,
            teacher=s.teacher,
            redis_url=s.redis_url,
            rollout=rollout,
            teacher_client=teacher_client,
            rollout_calls=rec_rollout.calls,
            teacher_calls=rec_teacher.calls,
            record=record,
            settings=settings,
        )


def _turn_samples(stack) -> list[dict]:
    """Per turn, episode index -> the sample the rollout service returned for it. Random actions never
    reach the goal, so every episode runs all turns and episode i is prompt i of every request."""
    turns = []
    for name, (request,), _, response in stack["rollout_calls"]:
        assert name == "generate" and len(request.prompts) == G
        turns.append({s.prompt_index: (request.prompts[s.prompt_index], s) for s in response.samples})
    return turns


def _action_spans(stack) -> list[list[tuple[int, int]]]:
    """Per episode, the [start, end) completion spans of the student's actions, from the generate calls."""
    P = len(stack["record"].prompt_ids)
    return [
        [(len(ctx) - P, len(ctx) - P + len(s.token_ids)) for ctx, s in (t[e] for t in _turn_samples(stack))]
        for e in range(G)
    ]


def test_record_is_the_played_transcript(stack):
    rec, tok = stack["record"], stack["tok"]
    env = make_env("rooms")
    first = env.reset(SEED)
    P = len(rec.prompt_ids)
    assert rec.prompt_ids.tolist() == tok(observation_text(first), add_special_tokens=False)["input_ids"]
    assert rec.prompt_text == observation_text(first) and rec.task == "rooms" and rec.record_id == "ep-1"
    assert len(rec.samples) == G and len(stack["rollout_calls"]) == TURNS  # one generate per turn
    spans = _action_spans(stack)
    for e, s in enumerate(rec.samples):
        assert len(spans[e]) == TURNS  # random actions never reach the goal: every episode plays 3 turns
        assert s.reward == 0.0 and s.finish_reason == "length"
        assert s.teacher_model_id == stack["teacher_client"].model_id
        ids = s.completion_ids.tolist()
        # replay: the env's answer to each action's text is exactly the tokens between the actions
        replay = make_env("rooms")
        replay.reset(SEED)
        for turn, (a, z) in enumerate(spans[e]):
            context, sample = _turn_samples(stack)[turn][e]
            assert context == rec.prompt_ids.tolist() + ids[:a]  # the student saw the whole transcript
            assert ids[a:z] == sample.token_ids
            assert np.allclose(s.behaviour_logprobs[a:z], sample.logprobs)
            step = replay.step(completion_text(tok, sample.token_ids))
            nxt = spans[e][turn + 1][0] if turn + 1 < TURNS else len(ids)
            if turn + 1 < TURNS:
                reply = tok(observation_text(step.observation), add_special_tokens=False)["input_ids"]
                assert ids[z:nxt] == reply
            else:
                assert z == len(ids)  # no reply after the last action
        action_pos = {t for a, z in spans[e] for t in range(a, z)}
        assert set(s.env_positions.tolist()) == set(range(len(ids))) - action_pos
        assert (s.behaviour_logprobs[s.env_positions] == 0.0).all()
    # the behaviour logprobs are the student's own, in the full transcript context
    model = load_causal_lm(stack["student"], dtype=torch.float32).eval()
    s = rec.samples[0]
    with torch.no_grad():
        ids = torch.tensor([rec.prompt_ids.tolist() + s.completion_ids.tolist()])
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)[P - 1 : -1]
    mine = lp.gather(1, torch.as_tensor(s.completion_ids, dtype=torch.long)[:, None])[:, 0].numpy()
    acts = np.setdiff1d(np.arange(len(s)), s.env_positions)
    assert np.allclose(mine[acts], s.behaviour_logprobs[acts], atol=1e-3)


def test_teacher_scored_exactly_the_student_spans(stack):
    rec, V = stack["record"], stack["V"]
    calls = stack["teacher_calls"]
    assert [c[0] for c in calls] == ["score"]  # all turns of all episodes in one call
    _, (sequences,), kwargs, scored = calls[0]
    P = len(rec.prompt_ids)
    spans = _action_spans(stack)
    expected = [
        (rec.prompt_ids.tolist() + rec.samples[e].completion_ids[:z].tolist(), P + a)
        for e in range(G)
        for a, z in spans[e]
    ]
    assert [(list(s), f) for s, f in zip(sequences, kwargs["score_from"], strict=True)] == expected
    assert kwargs["top_k"] == V
    # the rows landed at the action positions; a single full-transcript scoring agrees there (causal: the
    # rows of an action depend on its context only), so each token was scored in its full context
    i = 0
    for e, s in enumerate(rec.samples):
        full = stack["teacher_client"].score(
            [rec.prompt_ids.tolist() + s.completion_ids.tolist()], score_from=[P], top_k=V
        )[0]
        for a, z in spans[e]:
            rows = scored[i]
            i += 1
            assert (s.teacher_topk_ids[a:z] == rows.topk_ids).all()
            assert np.array_equal(s.teacher_target_logprobs[a:z], rows.target_logprobs)
            assert np.allclose(full.target_logprobs[a:z], rows.target_logprobs, atol=1e-4)
        env = s.env_positions
        assert (s.teacher_target_logprobs[env] == 0.0).all() and np.isfinite(s.teacher_topk_logprobs).all()


OBJECTIVES = [
    dict(objective="lsm"),
    dict(objective="lsm", renormalize=False),
    dict(objective="lsm", support="teacher_topk_plus_sampled"),
    dict(objective="sampled_token"),
    dict(objective="gamma", gamma=1.0),
    dict(objective="gamma", gamma=0.5),
    dict(objective="full_kl"),
]


@pytest.mark.parametrize("kw", OBJECTIVES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
@pytest.mark.parametrize("special_masking", [False, True])
def test_env_tokens_have_zero_weight_in_every_objective(stack, kw, special_masking):
    rec, V, tok = stack["record"], stack["V"], stack["tok"]
    top_k = V if kw["objective"] == "full_kl" else 8
    cfg = TrainerConfig(model=str(stack["student"]), top_k=top_k, max_seq_len=512, **kw)
    check_record(
        rec,
        support=cfg.support,
        top_k=top_k,
        vocab_size=V,
        max_seq_len=512,
        full_vocab=kw["objective"] == "full_kl",
    )
    masked = torch.tensor(sorted(tok.all_special_ids)) if special_masking else None
    mb = collate(sequences_of([rec]), support=cfg.support, top_k=top_k, max_seq_len=512, masked_ids=masked)
    # ground truth from the generate calls: a position is the student's iff it was sampled in an action
    spans = _action_spans(stack)
    env_B_T = mb.valid_B_T.clone()
    special = set(tok.all_special_ids)
    for b, s in enumerate(rec.samples):
        for a, z in spans[b]:
            env_B_T[b, a:z] = False
        for t in range(len(s)):
            counts = not env_B_T[b, t] and not (special_masking and int(s.completion_ids[t]) in special)
            assert bool(mb.token_mask_B_T[b, t]) == counts
    assert env_B_T.any() and not (mb.token_mask_B_T & env_B_T).any()

    torch.manual_seed(0)
    model = load_causal_lm(stack["student"], dtype=torch.float32)

    def loss_and_grad(batch):
        model.zero_grad()
        loss, _ = compute_objective(model, batch, cfg)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    base_loss, base_grad = loss_and_grad(mb)
    assert base_grad.abs().sum() > 0

    def perturb(where_B_T):
        """The same batch with random teacher/behaviour values, sampled ids and support ids at `where`
        (for full_kl the support stays the whole vocabulary, with a random distribution over it)."""
        g = torch.Generator().manual_seed(1)
        w3 = where_B_T[:, :, None]
        shape_K = mb.support_teacher_logprobs_B_T_K.shape
        noisy_lp = torch.log_softmax(torch.randn(shape_K, generator=g) * 3, -1)
        ids = mb.support_ids_B_T_K
        if kw["objective"] != "full_kl":
            ids = torch.where(w3, torch.randint(0, V, shape_K, generator=g), ids)
        return dataclasses.replace(
            mb,
            sampled_ids_B_T=torch.where(
                where_B_T, torch.randint(0, V, where_B_T.shape, generator=g), mb.sampled_ids_B_T
            ),
            teacher_logprobs_B_T=torch.where(
                where_B_T, -torch.rand(where_B_T.shape, generator=g) * 5, mb.teacher_logprobs_B_T
            ),
            behaviour_logprobs_B_T=torch.where(
                where_B_T, -torch.rand(where_B_T.shape, generator=g) * 5, mb.behaviour_logprobs_B_T
            ),
            support_ids_B_T_K=ids,
            support_teacher_logprobs_B_T_K=torch.where(w3, noisy_lp, mb.support_teacher_logprobs_B_T_K),
        )

    env_loss, env_grad = loss_and_grad(perturb(env_B_T))
    assert env_loss == base_loss and torch.equal(env_grad, base_grad)
    # control: the same perturbation at the student's positions does change the objective
    act_loss, act_grad = loss_and_grad(perturb(mb.token_mask_B_T))
    assert act_loss != base_loss and not torch.equal(act_grad, base_grad)


def test_three_turn_record_round_trips_through_redis(stack):
    rec = stack["record"]
    r = connect(stack["redis_url"])
    stream = "opd:episodes:experience"
    entry = r.xadd(stream, {RECORD_FIELD: encode(rec)})
    [[_, [(got_id, fields)]]] = r.xread({stream: "0"}, count=1)
    assert got_id == entry
    back = decode(fields[RECORD_FIELD])
    for f in ("record_id", "policy_version", "task", "prompt_text", "answer", "created_unix"):
        assert getattr(back, f) == getattr(rec, f)
    assert np.array_equal(back.prompt_ids, rec.prompt_ids)
    assert len(back.samples) == len(rec.samples) == G
    for a, b in zip(rec.samples, back.samples, strict=True):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                assert np.array_equal(x, y) and np.asarray(x).dtype == np.asarray(y).dtype, f.name
            else:
                assert x == y, f.name
        assert len(_action_spans(stack)[0]) == TURNS and len(a.env_positions) > 0


class EchoEnv:
    """Succeeds when the first action equals `targets[seed]` (one turn of the greedy evaluator)."""

    def __init__(self, targets: dict[int, str]):
        self.targets, self.seed = targets, None

    def reset(self, seed: int) -> str:
        self.seed = seed
        return f"say {seed}"

    def step(self, action: str) -> StepResult:
        ok = action == self.targets[self.seed]
        return StepResult("yes." if ok else "no.", float(ok), ok, ok)


@torch.no_grad()
def test_evaluate_env_is_greedy_success_rate(stack):
    tok = stack["tok"]
    model = load_causal_lm(stack["student"], dtype=torch.float32).eval()
    stop = sorted(set(tok.all_special_ids))
    targets = {}
    for seed in range(6):
        ids = tok(observation_text(f"say {seed}"), add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(
            ids, max_new_tokens=NEW, do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id
        )
        greedy = completion_text(tok, out[0, ids.shape[1] :].tolist())
        targets[seed] = greedy if seed % 3 == 0 else greedy + "#"  # unreachable for odd ones out
    rate = evaluate_env(
        make_env=lambda: EchoEnv(targets),
        seeds=list(range(6)),
        rollout=stack["rollout"],
        tokenizer=tok,
        max_turns=2,
        max_new_tokens=NEW,
    )
    assert rate == pytest.approx(2 / 6)


def test_context_limit_ends_episodes_at_an_action(stack):
    rec, tok = stack["record"], stack["tok"]
    P = len(rec.prompt_ids)
    kw = dict(
        make_env=lambda: make_env("rooms"),
        env_seed=SEED,
        rollout=stack["rollout"],
        teacher=stack["teacher_client"],
        tokenizer=tok,
        record_id="ep-limit",
        task="rooms",
        teacher_model_id="t",
    )
    # room for the first action only: its reply would be left unanswered, so it is dropped
    settings = dataclasses.replace(stack["settings"], max_context_tokens=P + NEW + 3)
    limited = run_episodes(settings=settings, **kw)
    for s in limited.samples:
        assert len(s) <= NEW and s.env_positions.size == 0 and s.finish_reason == "length"
        assert P + len(s) <= settings.max_context_tokens
    with pytest.raises(BadPromptError, match="no room"):
        run_episodes(settings=dataclasses.replace(stack["settings"], max_context_tokens=P + NEW - 1), **kw)
