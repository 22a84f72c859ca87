"""Failure-mode diagnostics of sampled-token OPD, from any student/teacher pair (paper Figures 2 and 4).

    opd experiment diagnostics --student DIR --teacher DIR [--checkpoint RUN/checkpoints] [--prompts FILE]

The student (an HF model dir, optionally with a run's newest trainer checkpoint loaded into it) samples n
completions per prompt with transformers, stopping at its own end marker; both models then score every
sampled token (teacher forcing). Per sampled token y_t at completion position t we keep

    student_lp[t] = log pi(y_t | c_t)      teacher_lp[t] = log q(y_t | c_t)      special[t] = y_t is special

and plot
    scatter.png   student vs teacher probability of the sampled tokens, special tokens marked (Figure 2):
                  a token the student is sure of and the teacher rejects is the special-token failure mode;
    gap.png       mean teacher - student log-probability gap by completion position (Figure 4), and the gap
                  at the student's end marker.
The two models must share a vocabulary (token ids mean the same thing); the prompt is tokenized once, by
the student's tokenizer. The same sampling helpers give `evaluate_model` (greedy pass@1 and avg@n), used by
`opd experiment table` on final checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def load_checkpoint_model(base_model: str, checkpoint_dir: str | Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of `base_model` (hub id or path), with the newest trainer checkpoint's weights
    from `checkpoint_dir` loaded when given (the model part of its DCP checkpoint, any number of ranks)."""
    from transformers import AutoTokenizer

    from services.common.hf_models import load_causal_lm
    from services.common.policy_files import DCP_DIR, list_checkpoints, read_dcp_model

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = load_causal_lm(base_model, dtype=torch.float32)
    if checkpoint_dir is not None:
        ckpts = list_checkpoints(Path(checkpoint_dir))
        if not ckpts:
            raise FileNotFoundError(f"no ckpt-* directory in {checkpoint_dir}")
        load_full_state(model, read_dcp_model(ckpts[-1] / DCP_DIR))
    return model.eval(), tokenizer


def load_full_state(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Load a full state dict, allowing only tied names (the LM head of tied embeddings) to be absent."""
    result = model.load_state_dict(tensors, strict=False)
    params = dict(model.state_dict(keep_vars=True))
    shared = {n for n in result.missing_keys if any(params[n] is params[k] for k in tensors if k in params)}
    if result.unexpected_keys or set(result.missing_keys) - shared:
        raise ValueError(
            f"checkpoint does not match the model: missing {sorted(set(result.missing_keys) - shared)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )


@torch.no_grad()
def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    n: int = 1,
    greedy: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 128,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompt ids [p], completion ids [p][sample]); each completion ends at (and keeps) the model's eos."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    n_out = 1 if greedy else n
    sample_kw = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=0)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    completions: list[list[list[int]]] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        out_BN_T = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=n_out,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            **sample_kw,
        )
        new_BN_L = out_BN_T[:, batch["input_ids"].shape[1] :].cpu().tolist()
        for i in range(len(chunk)):
            rows = []
            for row in new_BN_L[i * n_out : (i + 1) * n_out]:
                # generate pads the rows that finished early: cut after the first eos
                rows.append(row[: row.index(eos) + 1] if eos in row else row)
            completions.append(rows)
    return prompt_ids, completions


def evaluate_model(
    model: Any,
    tokenizer: Any,
    eval_file: str,
    verifier: str | Callable[[str, str], float],
    n: int = 4,
    max_prompts: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """{"pass@1": greedy accuracy, "avg@n": mean accuracy of n samples per prompt} on a JSONL eval file,
    both strict (right AND ended with the tokenizer's eos, the model's own end marker), and the same with
    `_lenient` (right, the text cut at the first special token of either model).

    `verifier` is a rollout verifier's name or a (completion, answer) -> score function. Texts are judged
    like the rollout worker judges them (up to the first special token)."""
    from services.common.verifiers import get_verifier, own_end_ids, score_samples

    rows = [json.loads(line) for line in Path(eval_file).read_text().splitlines() if line.strip()]
    rows = rows[:max_prompts] if max_prompts else rows
    prompts, answers = [r["prompt"] for r in rows], [str(r["answer"]) for r in rows]
    check = get_verifier(verifier) if isinstance(verifier, str) else verifier
    end_ids = own_end_ids(tokenizer)
    out = {}
    for key, greedy in (("pass@1", True), ("avg@n", False)):
        _, comps = sample_completions(
            model, tokenizer, prompts, n, greedy, max_new_tokens, temperature, top_p, seed
        )
        lenient, strict = [], []
        for cs, a in zip(comps, answers, strict=True):
            scored = score_samples(tokenizer, cs, a, check, end_ids)
            lenient.append(sum(scored.lenient) / len(cs))
            strict.append(sum(scored.strict) / len(cs))
        out[key] = sum(strict) / len(strict)
        out[f"{key}_lenient"] = sum(lenient) / len(lenient)
    return out


@torch.no_grad()
def completion_logprobs(
    model: Any, prompt_ids: list[int], completions: list[list[int]], pad_id: int
) -> list[Tensor]:
    """log p(y_t | prompt, y_<t) of every completion token, one (L_i,) tensor per completion."""
    device = next(model.parameters()).device
    seqs = [prompt_ids + c for c in completions]
    width = max(len(s) for s in seqs)
    ids_B_T = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn_B_T = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: positions of the real tokens do not move
        ids_B_T[i, : len(s)] = torch.tensor(s)
        attn_B_T[i, : len(s)] = 1
    logits_B_T_V = model(input_ids=ids_B_T.to(device), attention_mask=attn_B_T.to(device)).logits.float()
    logp_B_T_V = torch.log_softmax(logits_B_T_V, dim=-1).cpu()
    p = len(prompt_ids)
    out = []
    for i, c in enumerate(completions):
        # the token at position p + t is predicted by the logits at p + t - 1
        pos_L = torch.arange(p - 1, p - 1 + len(c))
        out.append(logp_B_T_V[i, pos_L, torch.tensor(c, dtype=torch.long)])
    return out


@dataclass
class TokenData:
    """One entry per sampled completion token, over all prompts and samples (N tokens)."""

    student_lp_N: Tensor
    teacher_lp_N: Tensor
    position_N: Tensor  # 0-based position in its completion
    special_N: Tensor  # bool: the sampled token is one of the student tokenizer's special tokens

    @property
    def gap_N(self) -> Tensor:
        return self.teacher_lp_N - self.student_lp_N


def collect_token_data(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    prompts: list[str],
    n: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.9,
    seed: int = 0,
) -> TokenData:
    """Sample from the student, score the sampled tokens with both models."""
    s_vocab, t_vocab = (
        student.get_output_embeddings().weight.shape[0],
        teacher.get_output_embeddings().weight.shape[0],
    )
    if s_vocab != t_vocab:
        raise ValueError(
            f"student vocab {s_vocab} != teacher vocab {t_vocab}: the diagnostics need one vocabulary"
        )
    prompt_ids, comps = sample_completions(
        student, tokenizer, prompts, n, False, max_new_tokens, temperature, top_p, seed
    )
    special = set(tokenizer.all_special_ids)
    s_lp, t_lp, pos, spec = [], [], [], []
    for p_ids, cs in zip(prompt_ids, comps, strict=True):
        cs = [c for c in cs if c]
        if not cs:
            continue
        for c, s, t in zip(
            cs,
            completion_logprobs(student, p_ids, cs, tokenizer.pad_token_id),
            completion_logprobs(teacher, p_ids, cs, tokenizer.pad_token_id),
            strict=True,
        ):
            s_lp.append(s)
            t_lp.append(t)
            pos.append(torch.arange(len(c)))
            spec.append(torch.tensor([tok in special for tok in c]))
    if not s_lp:
        raise ValueError("the student produced no completion tokens")
    return TokenData(torch.cat(s_lp), torch.cat(t_lp), torch.cat(pos), torch.cat(spec))


def gap_by_position(data: TokenData) -> tuple[list[int], list[float], list[float], list[int]]:
    """Positions, mean and std of the teacher - student gap there, and token counts (all tokens)."""
    xs, means, stds, counts = [], [], [], []
    for t in sorted(set(data.position_N.tolist())):
        g = data.gap_N[data.position_N == t]
        xs.append(t)
        means.append(float(g.mean()))
        stds.append(float(g.std()) if len(g) > 1 else 0.0)
        counts.append(len(g))
    return xs, means, stds, counts


def summary(data: TokenData) -> dict[str, float]:
    s, reg = data.special_N, ~data.special_N
    out = {
        "tokens": float(len(data.gap_N)),
        "special_tokens": float(s.sum()),
        "gap_mean_regular": float(data.gap_N[reg].mean()) if reg.any() else math.nan,
        "gap_mean_special": float(data.gap_N[s].mean()) if s.any() else math.nan,
        "student_p_special_mean": float(data.student_lp_N[s].exp().mean()) if s.any() else math.nan,
        "teacher_p_special_mean": float(data.teacher_lp_N[s].exp().mean()) if s.any() else math.nan,
    }
    # "confident student, rejecting teacher": the failure mode of section 3.2
    bad = (data.student_lp_N.exp() > 0.5) & (data.teacher_lp_N.exp() < 0.01)
    out["confident_rejected_share"] = float(bad.float().mean())
    out["confident_rejected_special_share"] = float((bad & s).sum() / bad.sum()) if bad.any() else math.nan
    return out


def plot_diagnostics(data: TokenData, out_dir: Path, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    sp, tp, s = data.student_lp_N.exp(), data.teacher_lp_N.exp(), data.special_N
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(sp[~s], tp[~s], s=4, alpha=0.25, label="regular tokens")
    ax.scatter(sp[s], tp[s], s=18, color="red", marker="x", label="special tokens (end markers)")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
    ax.set_xlabel("student probability of the sampled token")
    ax.set_ylabel("teacher probability of the sampled token")
    ax.set_title(title or "sampled tokens: student vs teacher", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    scatter = out_dir / "scatter.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)

    xs, means, stds, _ = gap_by_position(data)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(xs, means, label="mean gap, all tokens")
    ax.fill_between(
        xs,
        [m - d for m, d in zip(means, stds, strict=True)],
        [m + d for m, d in zip(means, stds, strict=True)],
        alpha=0.2,
    )
    if s.any():
        ax.scatter(data.position_N[s], data.gap_N[s], s=10, color="red", label="special tokens")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("completion position")
    ax.set_ylabel("log q - log pi of the sampled token")
    ax.set_title(title or "teacher - student log-probability gap by position", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    gap = out_dir / "gap.png"
    fig.savefig(gap, dpi=110)
    plt.close(fig)
    return [scatter, gap]


def main(argv: list[str] | None = None) -> int:
    from services.common.hf_models import load_causal_lm

    parser = argparse.ArgumentParser(prog="opd experiment diagnostics", description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True, help="student HF model (hub id or path)")
    parser.add_argument("--teacher", required=True, help="teacher HF model (same vocabulary)")
    parser.add_argument(
        "--checkpoint", default=None, help="a run's checkpoints/ dir: load its newest weights"
    )
    parser.add_argument("--prompts", default="runs/toy/data/eval.jsonl", help="JSONL with a `prompt` field")
    parser.add_argument("--max-prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/experiments/diagnostics")
    args = parser.parse_args(argv)

    student, tokenizer = load_checkpoint_model(args.student, args.checkpoint)
    teacher = load_causal_lm(args.teacher, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows[: args.max_prompts]]
    data = collect_token_data(
        student,
        teacher,
        tokenizer,
        prompts,
        args.n,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.seed,
    )
    out = Path(args.out)
    paths = plot_diagnostics(data, out)
    result = summary(data)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print(f"diagnostics ({len(prompts)} prompts x {args.n} samples): {', '.join(map(str, paths))}")
    for k, v in result.items():
        print(f"  {k:<34} {v:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
