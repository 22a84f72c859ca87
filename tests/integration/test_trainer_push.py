"""Weight push to a real rollout service (hf backend, real HTTP): version and sha change to the trainer's
weights, wrong tokens are refused, shared-storage loads, start-up reconciliation; the trainer loop pushing
after each batch; eval pass@1 through the service against a locally decoded reference."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.synthetic import synthetic_records, write_records
from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common import redis_keys
from services.common.hf_models import load_causal_lm
from services.common.redis_server import EmbeddedRedis
from services.common.verifiers import completion_text, ends_with_own_marker, own_end_ids
from services.rollout.app import build_app
from services.rollout.client import RolloutClient, RolloutError
from services.rollout.config import RolloutConfig
from services.rollout.engine import state_sha256
from services.rollout.server import running_server
from trainer.config import TrainerConfig
from trainer.eval import EvalSettings, evaluate, evaluate_splits, load_eval_prompts
from trainer.metrics import read_metrics
from trainer.train import run
from trainer.weight_sync import StateDictWeights, WeightSync

pytestmark = pytest.mark.integration

TOKEN = "push-token"
TOK = build_char_tokenizer()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    student_dir = make_tiny_llama(root / "student", seed=0, tokenizer=TOK)
    teacher_dir = make_tiny_llama(root / "teacher", seed=1, tokenizer=TOK)
    return dict(root=root, student_dir=student_dir, teacher=load_causal_lm(teacher_dir))


@pytest.fixture
def rollout(models):
    cfg = RolloutConfig(model=str(models["student_dir"]), backend="hf", device="cpu", port=0, token=TOKEN)
    with running_server(build_app(cfg)) as url:
        client = RolloutClient(url, token=TOKEN)
        client.wait_ready(120)
        yield url, client
        client.close()


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


def _sha(model) -> str:
    sd = model.state_dict()
    return state_sha256(sd, sd.keys())


def test_push_reconcile_and_shared_storage(models, rollout, redis_server, tmp_path):
    url, client = rollout
    model = load_causal_lm(models["student_dir"])
    before = client.weights()
    assert before.version == 0 and before.sha256 == _sha(model)
    r = redis_keys.connect(redis_server.url)
    sync = WeightSync(r, "push", [url], token=TOKEN, shared_dir=str(tmp_path / "shared"))
    try:
        with torch.no_grad():
            model.lm_head.weight.add_(0.5)
        sync.push(StateDictWeights(model.state_dict()), 1)
        after = client.weights()
        assert after.version == 1 and after.sha256 == _sha(model) != before.sha256
        assert int(r.get(redis_keys.policy_version_key("push"))) == 1

        with pytest.raises(RolloutError) as err:
            WeightSync(r, "push", [url], token="wrong").push(StateDictWeights(model.state_dict()), 2)
        assert err.value.status_code == 401 and client.weights().version == 1

        # trainer behind the server (weights pushed after its last checkpoint were lost): jump past it
        assert sync.reconcile(StateDictWeights(model.state_dict()), 0) == 2 and client.weights().version == 2
        # trainer ahead (crashed after checkpointing version 3, before pushing it): the server catches up
        assert sync.reconcile(StateDictWeights(model.state_dict()), 3) == 3 and client.weights().version == 3
        assert (
            sync.reconcile(StateDictWeights(model.state_dict()), 3) == 3 and client.weights().version == 3
        )  # in sync: nothing to do

        # shared storage: a file the server loads by path
        shared = WeightSync(r, "push", [url], mode="shared", shared_dir=str(tmp_path / "shared"), token=TOKEN)
        with torch.no_grad():
            model.lm_head.weight.mul_(0.5)
        shared.push(StateDictWeights(model.state_dict()), 4)
        assert client.weights().version == 4 and client.weights().sha256 == _sha(model)
        assert (tmp_path / "shared" / "policy-00000004.safetensors").exists()
        shared.close()
    finally:
        sync.close()


def test_loop_pushes_every_batch_and_evaluates(models, rollout, redis_server, tmp_path, monkeypatch):
    url, client = rollout
    student = load_causal_lm(models["student_dir"])
    records = synthetic_records(
        student,
        models["teacher"],
        n_records=4,
        group_size=2,
        top_k=4,
        behaviour_top_k=4,
        special_ids=sorted(set(TOK.all_special_ids)),
        eos_id=TOK.eos_token_id,
    )
    write_records(redis_keys.connect(redis_server.url), "loop-push", records)
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"prompt": p, "answer": "7"}) + "\n" for p in ("1+2=", "3+4=")))
    monkeypatch.setenv("OPD_WEIGHTS_TOKEN", TOKEN)
    cfg = TrainerConfig(
        model=str(models["student_dir"]),
        device="cpu",
        redis_url=redis_server.url,
        run="loop-push",
        batch_size=4,
        mini_batch_size=2,
        top_k=4,
        lr=1e-2,
        read_block_ms=100,
        idle_timeout_s=1.0,
        checkpoint_dir=str(tmp_path / "ckpt"),
        tensorboard=False,
        progress=False,
        push_every=1,
        rollout_urls=[url],
        eval_every=1,
        eval_file=str(eval_file),
        eval_max_new_tokens=4,
    )
    state = run(cfg)
    assert state.policy_version == state.batch == 2
    info = client.weights()
    trained = load_causal_lm(models["student_dir"])
    from trainer import checkpoint as ckpt

    ckpt.load_latest(cfg.checkpoint_dir, trained, restore_rng=False)
    assert info.version == 2 and info.sha256 == _sha(trained) != _sha(student)
    metrics = read_metrics(cfg.metrics_dir)
    start, trained_rows = metrics[0], metrics[1:]
    assert start["batch"] == 0 and 0.0 <= start["eval/pass@1"] <= 1.0  # the student before training
    assert [m["train/policy_version"] for m in trained_rows] == [1, 2]
    assert all(0.0 <= m["eval/pass@1"] <= 1.0 and m["time/push"] > 0 for m in trained_rows)


@torch.no_grad()
def _greedy_ids(model, prompt: str, max_new: int) -> list[int]:
    ids = torch.tensor([TOK(prompt)["input_ids"]])
    out = model.generate(
        ids,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=TOK.eos_token_id,
        pad_token_id=TOK.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def test_eval_pass_at_1_against_local_greedy(models, rollout, tmp_path):
    _, client = rollout
    model = load_causal_lm(models["student_dir"]).eval()
    prompts = ["12+34=", "5+5=", "99+1=", "7+8="]
    greedy_ids = [_greedy_ids(model, p, 6) for p in prompts]
    greedy = [completion_text(TOK, g) for g in greedy_ids]
    # strict: right AND ended with the student's own end marker (a random tiny model rarely does in 6 tokens)
    own = [ends_with_own_marker(TOK, g, own_end_ids(TOK)) for g in greedy_ids]
    # answers: the model's own greedy output for the first three prompts, a wrong one for the last
    rows = [{"prompt": p, "answer": g} for p, g in zip(prompts[:3], greedy[:3], strict=True)]
    rows.append({"prompt": prompts[3], "answer": greedy[3] + "x"})
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_eval_prompts(str(path), TOK)

    def same_text(completion: str, answer: str) -> float:
        return float(completion == answer)

    m = evaluate(client, TOK, items, same_text, EvalSettings(greedy=True, max_new_tokens=6))
    assert m["eval/pass@1_lenient"] == pytest.approx(0.75) and m["eval/avg@1_lenient"] == pytest.approx(0.75)
    assert m["eval/pass@1"] == pytest.approx(sum(own[:3]) / 4) and m["eval/avg@1"] == m["eval/pass@1"]
    assert m["eval/ends_own_eos"] == pytest.approx(sum(own) / 4)
    # validation prompts are scored under val/, the test prompts under eval/, each on its own split
    both = evaluate_splits(client, TOK, items[2:], items[:2], same_text, EvalSettings(max_new_tokens=6))
    assert both["val/pass@1_lenient"] == pytest.approx(1.0) and both["eval/pass@1_lenient"] == pytest.approx(
        0.5
    )
    assert (
        evaluate_splits(client, TOK, items, [], same_text, EvalSettings(max_new_tokens=6)).keys() == m.keys()
    )
    sampled = evaluate(
        client, TOK, items, same_text, EvalSettings(greedy=False, n=3, max_new_tokens=6, top_p=1.0)
    )
    assert 0.0 <= sampled["eval/avg@3"] <= sampled["eval/pass@3"] <= 1.0
    assert sampled["eval/pass@1"] == sampled["eval/avg@3"]
    assert sampled["eval/avg@3"] <= sampled["eval/avg@3_lenient"] <= sampled["eval/pass@3_lenient"]
