"""The toy task: multi-digit addition with every column and carry written out, then the answer line.

    prompt      "123+989="
    completion  "ŏ3+9+0=12\nĕ2+8+1=11\nǃ1+9+1=11\n=1112" + end marker

Each chain-of-thought line starts with a filler character (a scratch mark) and then adds one column, least
significant first: `a+b+c=ts` where `c` is the carry coming in and `ts` is always two digits (`t` is the
carry going out, `s` the answer digit). The shorter operand is padded with zeros. The last line is `=` and
the final answer. A 3+3-digit problem has 34+ characters of completion, so with a character-level
tokenizer every chain of thought is >= 30 tokens.

Why the fillers: they make the vocabulary large (258 ids: 5 special tokens, 13 task characters, 240
fillers) AND put real mass on many ids. A line's filler is drawn by a seeded hash of the problem and the
line, which no model can predict, so a trained teacher spreads its next-token distribution over all 240
fillers at the start of every line. There the teacher's top-K support holds K of them and K = 4, 16 and
64 train on visibly different supports (with the 18-id alphabet alone, K = 16 was nearly the whole
vocabulary). The filler positions do not count in the teacher-forced exact-match rate that stops
pretraining (experiments/toy/pretrain.py `free_ids`), and the answer line has none.

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
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from experiments.tiny_models import BOS, PAD, STUDENT_EOS, TEACHER_EOS, UNK, build_char_tokenizer
from services.common.hf_models import load_causal_lm
from services.common.verifiers import ends_with_own_marker, own_end_ids, toy_arith, toy_arith_answer

# Digits, the two operators and the line break: everything a prompt or an answer line can contain.
ALPHABET = "0123456789+=\n"
# The line-start fillers: 240 letters of Latin Extended-A/B (U+0100..U+01EF), one token each.
FILLERS = "".join(chr(0x100 + i) for i in range(240))
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


def reference_completion(a: int, b: int, fillers: bool = True) -> str:
    """The chain of thought (each column line after its filler) and the answer line, deterministic in (a, b).
    `fillers=False`: the lines without their filler (the two-task toy, whose vocabulary has none)."""
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    da, db = str(a)[::-1], str(b)[::-1]
    draw = random.Random(f"toy-filler-{a}+{b}")  # seeded by the problem: same text every time
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        lines.append(f"{draw.choice(FILLERS) if fillers else ''}{x}+{y}+{carry}={total:02d}")
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
    """The shared character vocabulary (specials, ALPHABET, FILLERS: 258 ids); `eos_token` picks the model's
    end marker (same ids either way)."""
    if eos_token not in END_MARKERS:
        raise ValueError(f"eos_token must be one of {END_MARKERS}, got {eos_token!r}")
    return build_char_tokenizer(ALPHABET + FILLERS, SPECIAL_TOKENS, eos_token=eos_token)


def filler_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The ids of the filler characters (free positions: trained on, not required to match exactly)."""
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(FILLERS))]


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
    accuracy: float  # strict: share of prompts whose completion verifies AND ends with its own end marker
    eos_rate: float  # share of completions that ended with the model's own end marker
    mean_new_tokens: float
    completions: list[str]  # decoded with special tokens kept
    lenient_accuracy: float = 0.0  # share that verifies, cut at either end marker


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
    """Pass@1 of an in-memory model with plain `generate` (batched, left padding), one sample per prompt:
    strict (right and ended with the model's own end marker) and lenient (right, cut at either marker).

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
    own_end: list[bool] = []
    end_ids = own_end_ids(tokenizer)
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
            own_end.append(ends_with_own_marker(tokenizer, row, end_ids))
            completions.append(tokenizer.decode(row, skip_special_tokens=False))
    model.train(was_training)
    right = [verify(c, a) for c, a in zip(completions, answers, strict=True)]
    strict = sum(r and e for r, e in zip(right, own_end, strict=True))
    n = len(prompts)
    return EvalResult(strict / n, ended / n, new_tokens / n, completions, sum(right) / n)


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
    """Strict pass@1 accuracy of a saved model (HF format, any path or hub id) on (prompts, answers)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_causal_lm(model_dir).to(device)
    result = generate_and_score(
        model, tokenizer, prompts, answers, max_new_tokens, greedy, temperature, top_p, batch_size, seed
    )
    return result.accuracy
