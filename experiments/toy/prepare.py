"""`opd toy prepare`: the toy task's data splits and its teacher and student models, cached.

    runs/toy/data/train.jsonl, eval.jsonl,      {"prompt": "123+989=", "answer": "1112"} per line
                  val.jsonl                     (eval = test split, val = validation split: disjoint)
    runs/toy/models/teacher/, student/          Hugging Face format (LlamaForCausalLM + tokenizer)
    runs/toy/models/meta.json                   config hash, measured pass@1 of both models, timings

Both models are trained from scratch with the same recipe (pretrain.train) on fresh problems; the teacher
until its training-batch sequence accuracy reaches `teacher_target`, the student only until
`student_target`, so it is partially competent and on-policy distillation has room to raise it. They share
one 258-id vocabulary (experiments/toy/task.py: the line fillers make K matter) but end answers with
different end markers (teacher `<|im_end|>`, student `</s>`).

meta.json is written last and records the hash of every field that changes the outputs: a second run with
the same config finds it and returns at once; `--force` retrains. torch and transformers are imported only
when something has to be trained: their import alone takes seconds, and the cached path should not.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.table import Table

from experiments.toy.cache import (
    CachedBuildConfig,
    PrepareResult,
    check_at_least_one,
    check_digits,
    check_model_shape,
    check_rates,
    config_hash,
    how_made,
    meta_header,
    prepare_cached,
    run_cli,
    training_threads,
)
from services.common.config import ConfigError, opt

if TYPE_CHECKING:
    from experiments.toy.task import Problem

# Bump when the task format or the training recipe changes, so that old caches are not reused.
RECIPE_VERSION = 2  # 2: filler characters (258-id vocabulary), validation split


@dataclass
class ToyConfig(CachedBuildConfig):
    """Make the toy task's data and its teacher and student models (cached by config hash)."""

    SECTION: ClassVar[str] = "toy"
    ENV_PREFIX: ClassVar[str] = "OPD_TOY_"

    out: str = opt("runs/toy", "output directory (data/*.jsonl, models/{teacher,student}, models/meta.json)")
    n_train: int = opt(5000, "prompts in data/train.jsonl (the prompts distillation trains on)")
    n_eval: int = opt(200, "held-out test prompts in data/eval.jsonl (never seen in any training)")
    n_val: int = opt(
        200, "held-out validation prompts in data/val.jsonl (select checkpoints; disjoint from eval)"
    )
    min_digits: int = opt(3, "fewest digits of an operand")
    max_digits: int = opt(4, "most digits of an operand")
    hidden_size: int = opt(128, "model width (both models)")
    num_layers: int = opt(2, "transformer layers (both models)")
    num_heads: int = opt(4, "attention heads; head_dim = hidden_size / num_heads must be 32 or 64 (vLLM)")
    intermediate_size: int = opt(512, "MLP width")
    batch_size: int = opt(64, "problems per training step")
    lr: float = opt(3e-3, "peak AdamW learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay on matrices")
    warmup_steps: int = opt(30, "linear warmup steps, then cosine decay to 10% over the planned steps")
    teacher_steps: int = opt(600, "planned (and maximum) teacher training steps")
    teacher_target: float = opt(0.985, "stop the teacher once its batch sequence accuracy (EMA) reaches this")
    student_steps: int = opt(600, "planned (and maximum) student training steps (same schedule as teacher)")
    student_target: float = opt(0.15, "stop the student once its batch sequence accuracy (EMA) reaches this")
    eval_max_new_tokens: int = opt(64, "generation budget when measuring pass@1 (a completion is <= 47)")
    eval_top_p: float = opt(0.9, "top-p of the sampled pass@1 measurement (temperature 1)")

    def __post_init__(self) -> None:
        check_model_shape(self)
        check_digits(self)
        check_at_least_one(
            self, ("n_train", "n_eval", "n_val", "batch_size", "teacher_steps", "student_steps", "num_layers")
        )
        check_rates(self, ("teacher_target", "student_target", "eval_top_p"))
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    def cache_key(self) -> str:
        return config_hash(self, RECIPE_VERSION)


@dataclass
class ToyPaths:
    out: Path

    @property
    def train(self) -> Path:
        return self.out / "data" / "train.jsonl"

    @property
    def eval(self) -> Path:
        return self.out / "data" / "eval.jsonl"

    @property
    def val(self) -> Path:
        return self.out / "data" / "val.jsonl"

    @property
    def teacher(self) -> Path:
        return self.out / "models" / "teacher"

    @property
    def student(self) -> Path:
        return self.out / "models" / "student"

    @property
    def meta(self) -> Path:
        return self.out / "models" / "meta.json"


def _needed(paths: ToyPaths) -> list[Path]:
    return [paths.train, paths.eval, paths.val, paths.teacher / "config.json", paths.student / "config.json"]


def _train_one(
    cfg: ToyConfig,
    role: str,
    eos_token: str,
    eval_split: list[Problem],
    out_dir: Path,
    held_out: list[Problem],
) -> dict[str, Any]:
    """Train one model from scratch on problems outside `held_out` (eval and val), measure its pass@1 on
    the eval split, save it; returns its meta."""
    from experiments.toy.pretrain import new_model, save_and_describe, train
    from experiments.toy.task import build_tokenizer, filler_ids, generate_and_score, problem_stream

    tokenizer = build_tokenizer(eos_token)
    offset = {"teacher": 1, "student": 2}[role]
    model = new_model(cfg, tokenizer, cfg.seed * 1000 + offset, max_positions=128)
    stream = problem_stream(
        cfg.seed * 1000 + offset, cfg.min_digits, cfg.max_digits, exclude=[p.prompt for p in held_out]
    )
    steps = cfg.teacher_steps if role == "teacher" else cfg.student_steps
    target = cfg.teacher_target if role == "teacher" else cfg.student_target
    result = train(
        model,
        tokenizer,
        stream,
        steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        target_seq_acc=target,
        desc=role,
        free_ids=filler_ids(tokenizer),
    )
    prompts, answers = [p.prompt for p in eval_split], [p.answer for p in eval_split]
    t0 = time.perf_counter()
    greedy = generate_and_score(
        model, tokenizer, prompts, answers, cfg.eval_max_new_tokens, greedy=True, seed=cfg.seed
    )
    sampled = generate_and_score(
        model,
        tokenizer,
        prompts,
        answers,
        cfg.eval_max_new_tokens,
        greedy=False,
        top_p=cfg.eval_top_p,
        seed=cfg.seed,
    )
    eval_seconds = time.perf_counter() - t0
    return {
        **save_and_describe(model, tokenizer, out_dir),
        **result.meta(),
        "pass1_greedy": greedy.accuracy,  # strict: right and ended with its own end marker
        "pass1_sampled": sampled.accuracy,
        "pass1_greedy_lenient": greedy.lenient_accuracy,
        "pass1_sampled_lenient": sampled.lenient_accuracy,
        "eos_rate_greedy": greedy.eos_rate,
        "eos_rate_sampled": sampled.eos_rate,
        "mean_new_tokens_greedy": greedy.mean_new_tokens,
        "eval_seconds": round(eval_seconds, 2),
        "example_completion": greedy.completions[0],
    }


def prepare(cfg: ToyConfig) -> PrepareResult:
    """Make (or find in the cache) the data splits and both models under `cfg.out`."""
    paths = ToyPaths(Path(cfg.out))
    return prepare_cached(cfg, paths, cfg.cache_key(), _needed(paths), lambda: _build(cfg, paths))


def _build(cfg: ToyConfig, paths: ToyPaths) -> dict[str, Any]:
    """Write both splits, train and save both models; returns the contents of meta.json."""
    from experiments.tiny_models import STUDENT_EOS, TEACHER_EOS
    from experiments.toy.task import make_splits, write_jsonl

    t0 = time.perf_counter()
    with training_threads(cfg) as threads:
        train_split, eval_split, val_split = make_splits(
            cfg.seed, cfg.n_train, cfg.n_eval, cfg.min_digits, cfg.max_digits, cfg.n_val
        )
        write_jsonl(paths.train, train_split)
        write_jsonl(paths.eval, eval_split)
        write_jsonl(paths.val, val_split)
        models: dict[str, Any] = {}
        for role, eos in (("teacher", TEACHER_EOS), ("student", STUDENT_EOS)):
            out_dir = getattr(paths, role)
            shutil.rmtree(out_dir, ignore_errors=True)
            models[role] = _train_one(cfg, role, eos, eval_split, out_dir, eval_split + val_split)
    return {
        **meta_header(cfg, RECIPE_VERSION, threads),
        "data": {
            "train": str(paths.train),
            "eval": str(paths.eval),
            "val": str(paths.val),
            "n_train": len(train_split),
            "n_eval": len(eval_split),
            "n_val": len(val_split),
        },
        "teacher": models["teacher"],
        "student": models["student"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def summary_table(result: PrepareResult) -> Table:
    meta = result.meta
    table = Table(
        title=f"toy task, {meta['data']['n_eval']} eval prompts ({how_made(result)})",
        caption=f"pass@1: strict (right, ended with its own end marker; lenient in meta.json); sampled: "
        f"temperature 1, top-p {meta['config']['eval_top_p']}; models and meta.json under "
        f"{result.paths.meta.parent}, prompts under {result.paths.train.parent}",
    )
    for col in ("model", "end marker", "params", "steps", "pass@1 greedy", "pass@1 sampled", "own eos"):
        table.add_column(col)
    for role in ("teacher", "student"):
        m = meta[role]
        table.add_row(
            role,
            m["eos_token"],
            f"{m['parameters']:,}",
            str(m["train_steps"]),
            f"{m['pass1_greedy']:.1%}",
            f"{m['pass1_sampled']:.1%}",
            f"{m['eos_rate_greedy']:.0%}",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    return run_cli(ToyConfig, prepare, summary_table, "opd toy prepare", argv)


if __name__ == "__main__":
    sys.exit(main())
