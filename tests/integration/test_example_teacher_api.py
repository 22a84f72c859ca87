"""examples/teacher_api/distill.py: another trainer's plain PyTorch loop whose teacher log-probs come from the
real teacher gRPC server (loopback, bearer token). Its 10-line loss is the trainer's LSM loss, and it
distils: the student's support KL to the teacher falls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from opd_teacher_client import TeacherClient

from examples.teacher_api.distill import lsm_loss, train
from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common.hf_models import load_causal_lm
from services.teacher.config import TeacherConfig
from services.teacher.scorer import HFScorer
from services.teacher.server import run_server
from trainer import losses

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "example-" + "t" * 24
PROMPTS = ["12+3=", "7*8=", "ab", "x(y)", "99-1=", "hello"]


def test_example_loss_is_the_trainers_lsm_loss():
    g = torch.Generator().manual_seed(0)
    L, V, K = 7, 50, 5
    logits = torch.randn(L, V, generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(L)])
    teacher = torch.randn(L, K, generator=g).log_softmax(-1) - 1.3  # top-K of a larger distribution
    got = lsm_loss(logits, ids, teacher) / L
    student_at_ids = logits.log_softmax(-1).gather(-1, ids)
    mask = torch.ones(1, L, K, dtype=torch.bool)
    want, _ = losses.lsm_loss(student_at_ids[None], teacher[None], mask, torch.ones(1, L, dtype=torch.bool))
    torch.testing.assert_close(got, want)
    assert float(lsm_loss(teacher, torch.arange(K).expand(L, K), teacher)) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    tok = build_char_tokenizer()
    student = make_tiny_llama(root / "student", seed=0, tokenizer=tok)
    teacher = make_tiny_llama(root / "teacher", seed=5, tokenizer=tok)
    model = load_causal_lm(teacher)
    with torch.no_grad():  # a peaked teacher: its top-K is a real target
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(teacher)
    return student, teacher


@pytest.fixture(scope="module")
def teacher_address(models):
    _, teacher = models
    cfg = TeacherConfig(model=str(teacher), port=0, device="cpu", token=TOKEN)
    with run_server(cfg, scorer=HFScorer(str(teacher), device="cpu", dtype="float32")) as handle:
        yield handle.address


def support_kl(model_dir, teacher, sequences: list[list[int]], P: list[int]) -> float:
    """The example's loss per token over fixed sequences: how far a student is from the teacher's top-K."""
    model = load_causal_lm(model_dir).eval()
    rows = teacher.score(sequences, score_from=P, top_k=8)
    total, n = 0.0, 0
    with torch.no_grad():
        for seq, p, r in zip(sequences, P, rows, strict=True):
            logits = model(torch.tensor([seq])).logits[0, p - 1 : -1]
            total += float(
                lsm_loss(logits, torch.as_tensor(r.topk_ids).long(), torch.as_tensor(r.topk_logprobs))
            )
            n += len(seq) - p
    return total / n


def test_a_plain_pytorch_loop_distils_from_the_teacher_service(models, teacher_address, tmp_path):
    student, _ = models
    kw = dict(token=TOKEN, top_k=8, group_size=4, max_new_tokens=12, lr=3e-3, progress=False)
    curve = train(str(student), [teacher_address], PROMPTS, steps=30, out=str(tmp_path / "after"), **kw)
    assert len(curve) == 30 and all(x >= 0 for x in curve)
    tok = build_char_tokenizer()
    g = torch.Generator().manual_seed(3)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    fixed = [p + torch.randint(5, len(tok), (10,), generator=g).tolist() for p in prompts]
    with TeacherClient([teacher_address], token=TOKEN) as teacher:
        before = support_kl(student, teacher, fixed, [len(p) for p in prompts])
        after = support_kl(tmp_path / "after", teacher, fixed, [len(p) for p in prompts])
    assert after < 0.85 * before, (before, after)  # measured: 1.85 -> 1.40 nats per token


def test_the_example_runs_as_a_command(models, teacher_address, tmp_path):
    student, _ = models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "distilled"
    args = ["--student", str(student), "--teacher", teacher_address, "--token", TOKEN, "--prompts", str(prompts),
            "--steps", "3", "--max-new-tokens", "6", "--device", "cpu", "--out", str(out)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "examples/teacher_api/distill.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss: first 3 steps" in done.stdout and (out / "config.json").exists()
    wrong = subprocess.run(
        [sys.executable, "examples/teacher_api/distill.py", *args[:5], "nope", *args[6:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrong.returncode != 0 and "UNAUTHENTICATED" in wrong.stderr
