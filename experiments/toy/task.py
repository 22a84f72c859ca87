"""The toy task: multi-digit addition with every column and carry written out, then the answer line.

    prompt      "123+989="
    completion  "3+9+0=12\n2+8+1=11\n1+9+1=11\n=1112" + end marker

Each chain-of-thought line adds one column, least significant first: `a+b+c=ts` where `c` is the carry
coming in and `ts` is always two digits (`t` is the carry going out, `s` the answer digit). The shorter
operand is padded with zeros. The last line is `=` and the final answer. A 3+3-digit problem has 31+
characters of completion, so with a character-level tokenizer every chain of thought is >= 30 tokens.

The verifier reads only text: the completion ends at its first end marker; its last line must be `=digits`
and the digits must equal the reference answer exactly.

The two toy models share one character vocabulary (identical ids) holding both end markers; the teacher's
tokenizer ends answers with `<|im_end|>`, the student's with `</s>`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from experiments.tiny_models import BOS, PAD, STUDENT_EOS, TEACHER_EOS, UNK, build_char_tokenizer
from services.common.verifiers import toy_arith, toy_arith_answer

# Digits, the two operators and the line break: everything a prompt or a completion can contain.
ALPHABET = "0123456789+=\n"
SPECIAL_TOKENS = (PAD, BOS, UNK, STUDENT_EOS, TEACHER_EOS)
END_MARKERS = (STUDENT_EOS, TEACHER_EOS)


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def completion(self) -> str:
        """The reference chain of thought and answer line, without an end marker."""
        return reference_completion(self.a, self.b)


def reference_completion(a: int, b: int) -> str:
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        lines.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    lines.append(f"={a + b}")
    return "\n".join(lines)


def parse_prompt(prompt: str) -> Problem:
    """The inverse of `Problem.prompt`; raises ValueError on anything else."""
    m = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    if m is None:
        raise ValueError(f"not a toy prompt: {prompt!r}")
    return Problem(int(m.group(1)), int(m.group(2)))


# ---------------------------------------------------------------------------------------------- data


def random_problem(rng: random.Random, min_digits: int, max_digits: int) -> Problem:
    """Operands with a uniformly drawn number of digits each, then uniform within that width."""

    def operand() -> int:
        n = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)

    return Problem(operand(), operand())


def problem_stream(
    seed: int, min_digits: int, max_digits: int, exclude: Iterable[str] = ()
) -> Iterator[Problem]:
    """An endless deterministic stream of problems whose prompts are not in `exclude` (e.g. eval)."""
    rng = random.Random(seed)
    banned = set(exclude)
    while True:
        p = random_problem(rng, min_digits, max_digits)
        if p.prompt not in banned:
            yield p


def make_splits(
    seed: int, n_train: int, n_eval: int, min_digits: int = 3, max_digits: int = 4, n_val: int = 0
) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Distinct (train, eval, val) problems, deterministic from `seed`; no prompt is in two splits.

    eval is the test split (reported); val is the validation split that selects checkpoints. The eval
    split is drawn first, then val, then train, so neither held-out split changes when `n_train` does.
    """
    space = sum(9 * 10 ** (n - 1) if n > 1 else 10 for n in range(min_digits, max_digits + 1)) ** 2
    if n_train + n_eval + n_val > space // 2:
        raise ValueError(
            f"{n_train} + {n_eval} + {n_val} problems asked for, but only {space} distinct prompts exist"
        )
    rng = random.Random(f"toy-splits-{seed}")
    seen: set[str] = set()
    splits: list[list[Problem]] = []
    for n in (n_eval, n_val, n_train):
        split: list[Problem] = []
        while len(split) < n:
            p = random_problem(rng, min_digits, max_digits)
            if p.prompt not in seen:
                seen.add(p.prompt)
                split.append(p)
        splits.append(split)
    eval_split, val_split, train_split = splits
    return train_split, eval_split, val_split


def write_jsonl(path: Path, problems: Sequence[Problem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for p in problems:
            fh.write(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n")


def read_jsonl(path: Path) -> tuple[list[str], list[str]]:
    """(prompts, answers) from a file written by `write_jsonl`."""
    prompts, answers = [], []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                prompts.append(row["prompt"])
                answers.append(row["answer"])
    return prompts, answers


# ----------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(eos_token: str) -> PreTrainedTokenizerFast:
    """The shared character vocabulary; `eos_token` picks the model's end marker (same ids either way)."""
    if eos_token not in END_MARKERS:
        raise ValueError(f"eos_token must be one of {END_MARKERS}, got {eos_token!r}")
    return build_char_tokenizer(ALPHABET, SPECIAL_TOKENS, eos_token=eos_token)


# ---------------------------------------------------------------------------------------------- verify


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion decoded with its special tokens, or None when it has no well-formed
    answer line: the `toy_arith` verifier's rule (services/common/verifiers.py), cut at either end marker."""
    return toy_arith_answer(completion, END_MARKERS)


def verify(completion: str, answer: str) -> bool:
    """True iff the completion's final answer equals `answer` exactly (as a digit string)."""
    return toy_arith(completion, answer, END_MARKERS) == 1.0


# ------------------------------------------------------------------------------------------------ eval


@dataclass
class EvalResult:
    accuracy: float  # share of prompts whose completion verifies
    eos_rate: float  # share of completions that ended with the model's own end marker
    mean_new_tokens: float
    completions: list[str]  # decoded with special tokens kept


@torch.no_grad()
def generate_and_score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 0.9,
    batch_size: int = 256,
    seed: int = 0,
) -> EvalResult:
    """Pass@1 of an in-memory model with plain `generate` (batched, left padding), one sample per prompt.

    Generation stops at the tokenizer's eos token (the model's own end marker). Seeds torch's global RNG
    with `seed` so that a sampled evaluation is repeatable.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    sample_kw = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=0)
    completions: list[str] = []
    ended = new_tokens = 0
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        out_B_T = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sample_kw,
        )
        new_B_N = out_B_T[:, batch["input_ids"].shape[1] :].cpu()
        for row in new_B_N.tolist():
            if tokenizer.eos_token_id in row:  # generate pads the rows that finished early
                row = row[: row.index(tokenizer.eos_token_id) + 1]
                ended += 1
            new_tokens += len(row)
            completions.append(tokenizer.decode(row, skip_special_tokens=False))
    model.train(was_training)
    correct = sum(verify(c, a) for c, a in zip(completions, answers, strict=True))
    n = len(prompts)
    return EvalResult(correct / n, ended / n, new_tokens / n, completions)


def evaluate(
    model_dir: str | Path,
    prompts: Sequence[str],
    answers: Sequence[str],
    device: str = "cpu",
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 0.9,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Pass@1 accuracy of a saved model (HF format, any path or hub id) on (prompts, answers)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    result = generate_and_score(
        model, tokenizer, prompts, answers, max_new_tokens, greedy, temperature, top_p, batch_size, seed
    )
    return result.accuracy
