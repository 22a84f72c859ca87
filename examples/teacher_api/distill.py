"""On-policy distillation from your own PyTorch loop, with the teacher as a service.

Your trainer keeps its student, sampler and optimiser; the teacher's top-K log-probabilities come over gRPC
from `opd teacher serve` (any number of replicas, any GPUs) instead of a second model in your process:

    python examples/teacher_api/distill.py --student ./my-student --teacher 10.0.0.5:50051 \
        --token "$OPD_TEACHER_TOKEN" --prompts prompts.txt --steps 200

Each step: sample G completions of a prompt from the student (top-p), ask the teacher for its top-K at every
completion position (`TeacherClient.score`, one call for the G sequences), and minimise the teacher top-K
local support matching loss: the reverse KL between the student and the teacher, both renormalised over the
teacher's top-K ids at that position (equation 8 of the paper; `lsm_loss` below, 10 lines). Needs only
torch, transformers and the client (`pip install ./clients/python` or the `opd-teacher-client` wheel).

The student and the teacher must share the tokenizer (the token ids go over the wire as they are); check
`teacher.info().tokenizer_sha256` against your tokenizer. docs/teacher-api.md walks through it.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from opd_teacher_client import TeacherClient
from rich.progress import Progress
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def lsm_loss(student_logits_L_V: torch.Tensor, topk_ids_L_K: torch.Tensor, teacher_lp_L_K: torch.Tensor):
    """Sum over positions of KL(pi^ || q^): pi^ and q^ are the student and the teacher renormalised over the
    teacher's top-K ids of each position. Only the K student log-probs at those ids are needed, and their
    renormalisation is a softmax over K values, so the full-vocabulary normaliser cancels."""
    student_L_K = student_logits_L_V.float().gather(-1, topk_ids_L_K)  # logits: a per-row shift cancels
    log_p_L_K = student_L_K.log_softmax(-1)
    log_q_L_K = teacher_lp_L_K.float().log_softmax(-1)
    return (log_p_L_K.exp() * (log_p_L_K - log_q_L_K)).sum()


@torch.no_grad()
def sample(
    model: PreTrainedModel, prompt_ids: list[int], group_size: int, max_new_tokens: int, eos: int | None
):
    """G top-p completions of one prompt; each cut after its first end marker."""
    model.eval()
    prompt = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        top_p=0.9,
        top_k=0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=group_size,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else 0,
    )
    completions = []
    for row in out[:, len(prompt_ids) :].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        completions.append(row)
    return completions


def train(
    student: str,
    teacher: Sequence[str],
    prompts: Sequence[str],
    *,
    steps: int,
    token: str | None = None,
    top_k: int = 16,
    group_size: int = 4,
    max_new_tokens: int = 32,
    lr: float = 1e-4,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    out: str | None = None,
) -> list[float]:
    """Distil `student` towards the teacher service for `steps` prompts (saved to `out` if given); returns
    the loss of every step."""
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    with TeacherClient(list(teacher), token=token) as client, Progress(disable=not progress) as bar:
        task = bar.add_task("distilling", total=steps)
        for step in range(steps):
            prompt_ids = tokenizer(prompts[step % len(prompts)])["input_ids"]
            P = len(prompt_ids)
            completions = sample(model, prompt_ids, group_size, max_new_tokens, tokenizer.eos_token_id)
            sequences = [prompt_ids + c for c in completions]
            rows = client.score(sequences, score_from=[P] * len(sequences), top_k=top_k)  # row t: x_{P+t}
            model.train()
            total, tokens = torch.zeros((), device=device), 0
            for seq, r in zip(sequences, rows, strict=True):
                logits_L_V = model(torch.tensor([seq], device=device)).logits[0, P - 1 : -1]
                ids = torch.as_tensor(r.topk_ids, dtype=torch.long, device=device)
                total = total + lsm_loss(logits_L_V, ids, torch.as_tensor(r.topk_logprobs, device=device))
                tokens += len(seq) - P
            loss = total / max(tokens, 1)  # the token mean over the group
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(task, advance=1, description=f"distilling: loss {loss.item():.4f}")
    if out is not None:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="student model: hub id or path")
    ap.add_argument("--teacher", required=True, help="teacher address(es), comma-separated host:port")
    ap.add_argument("--token", default=None, help="the teacher's bearer token")
    ap.add_argument("--prompts", required=True, help="text file, one prompt per line")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="save the distilled student here")
    args = ap.parse_args(argv)
    prompts = [line for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    losses = train(
        args.student,
        args.teacher.split(","),
        prompts,
        steps=args.steps,
        token=args.token,
        top_k=args.top_k,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        lr=args.lr,
        device=args.device,
        out=args.out,
    )
    head, tail = losses[:10], losses[-10:]
    print(
        f"loss: first {len(head)} steps {sum(head) / len(head):.4f}, last {len(tail)} {sum(tail) / len(tail):.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
