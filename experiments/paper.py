"""`opd experiment NAME`: the paper's experiments, reproduced small on the toy task.

    opd experiment table      [--seeds 0,1,2] [--batches N] [--eval-every N] [--avg-n 4] [--only SLUGS]
                              [--out runs/experiments] [--base configs/demo.toml] [--resume]
    opd experiment ablations  (same options)
    opd experiment multitask  (same options; base configs/multitask_toy.toml)   Table 2, two tasks
    opd experiment gamma-toy  [...]                      appendix C toy, experiments/gamma_toy.py
    opd experiment diagnostics --student DIR --teacher DIR [...]   Figures 2 and 4, experiments/diagnostics.py

`table` and `ablations` build one TOML file per (variant, seed) from the base file (demo.toml) with section
overrides, run the whole local pipeline (`opd up`, as a subprocess) for each, one after the other, and then
collect from every run's metrics.jsonl the first and last `eval/pass@1` (greedy, through the rollout
service; STRICT: right and ended with the student's own end marker, the lenient score beside it) and the
test pass@1 of the checkpoint selected on the validation split (`select_checkpoint`: the eval with the best
`val/pass@1`; the test scores never choose). When `--avg-n` > 0, each run's final checkpoint is also evaluated here with transformers: greedy
pass@1 and avg@n (n samples per prompt at trainer.eval_temperature and eval_top_p). Outputs, under
`<out>/<name>/`: `configs/`, `runs/<run>/` (each pipeline run), `results.json`, `table.md` (mean +- std
over seeds, like Table 1) and `curves.png` (one panel per metric, one line per variant: Figures 6-8).
Each finished run keeps its wall time and post-hoc eval in `runs/<run>/experiment.json`; with `--resume` a run
whose directory holds the same config and a finished pipeline (report.md, written only on success, and the
last batch reached) is not run again (its row recomputed from its metrics, its post-hoc eval reused when made
with the same avg@n), so an interrupted experiment, or one widened to more seeds, runs only what is missing.
`multitask` runs the same way on the two-task toy (math + rooms); its table and curves are per task:
pass@1 of the prompt task and success rate of the environment task (experiments/multitask_results.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from experiments.report import (  # noqa: F401 (mean_curve: API)
    mean_curve,
    mean_std,
    plot_curves,
    select_checkpoint,
)
from services.common.config import report_config_errors

log = logging.getLogger("opd.experiment")

Overrides = dict[str, dict[str, Any]]  # {"trainer": {"objective": "lsm"}, "worker": {...}}


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: Overrides = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


def _k_variant(k: int) -> Variant:
    # The worker must store at least K teacher ids per position; the teacher serves at most 64.
    return Variant(f"LSM K={k}", {"trainer": {"top_k": k}, "worker": {"top_k": max(k, 16)}})


# K = 1 is left out of the K ablation on purpose: renormalised on a one-id support both distributions are 1
# there, so the LSM loss (and its gradient) is identically zero and the run only measures the untrained
# student. build_variant_config refuses it; without renormalisation K = 1 is a valid (different) objective.
K_ONE_NOTE = (
    "K = 1 is not run: with renormalisation the one-id support gives both distributions mass 1, so the LSM "
    "loss is identically 0 (no training signal)."
)


def _support_variant(support: str) -> Variant:
    # student_topk needs the behaviour top-k in the record, which the worker writes only when told.
    return Variant(
        f"LSM support={support}", {"trainer": {"support": support}, "worker": {"support": support}}
    )


# The toy student ends with </s>, the teacher with <|im_end|> (experiments/toy/task.py).
TOY_ALIASES = [["</s>", "<|im_end|>"]]


def _alias_variant(label: str, objective: str) -> Variant:
    # teacher_tokenizer is filled from [teacher].model by build_variant_config.
    aliases = {"token_aliases": TOY_ALIASES}
    return Variant(
        label,
        {"trainer": {"objective": objective, "special_token_masking": False, **aliases}, "worker": aliases},
    )


EXPERIMENTS: dict[str, list[Variant]] = {
    # Table 1: the two objectives, with and without special-token masking.
    "table": [
        Variant(
            "sampled-token OPD", {"trainer": {"objective": "sampled_token", "special_token_masking": False}}
        ),
        Variant(
            "sampled-token OPD + mask",
            {"trainer": {"objective": "sampled_token", "special_token_masking": True}},
        ),
        Variant("LSM", {"trainer": {"objective": "lsm", "special_token_masking": False}}),
        Variant("LSM + mask", {"trainer": {"objective": "lsm", "special_token_masking": True}}),
        # Issue 10: score the student's end marker with the teacher's own (docs/aliases.md), masking off.
        _alias_variant("sampled-token OPD + alias", "sampled_token"),
        _alias_variant("LSM + alias", "lsm"),
    ],
    # Tables 3-4 and Figure 9; the reference is LSM + mask, K=16, renormalised, top-p 0.9, teacher top-K.
    "ablations": [
        Variant("LSM reference (K=16)", {"trainer": {"objective": "lsm"}}),
        Variant("no renormalisation", {"trainer": {"objective": "lsm", "renormalize": False}}),
        Variant("no top-p (p=1)", {"trainer": {"objective": "lsm"}, "worker": {"top_p": 1.0}}),
        # K in {4, 16 (the reference), 64}; the toy's 258-id vocabulary keeps K = 64 a real subset.
        _k_variant(4),
        _k_variant(64),
        _support_variant("student_topk"),
        _support_variant("teacher_topk_plus_sampled"),
        # Issue 19: the two parts of special-token masking alone (the reference has both).
        Variant("mask positions only", {"trainer": {"objective": "lsm", "mask_special_support": False}}),
        Variant("mask support only", {"trainer": {"objective": "lsm", "mask_special_positions": False}}),
    ],
    # Table 2: the two-task setting (math + an agentic environment, one teacher each, alternating batches).
    "multitask": [
        Variant(
            "sampled-token OPD", {"trainer": {"objective": "sampled_token", "special_token_masking": False}}
        ),
        Variant("LSM", {"trainer": {"objective": "lsm", "special_token_masking": False}}),
        Variant("LSM + mask", {"trainer": {"objective": "lsm", "special_token_masking": True}}),
    ],
}
# The base file of an experiment when --base is not given.
DEFAULT_BASE = {"multitask": "configs/multitask_toy.toml"}


def build_variant_config(
    base: dict[str, Any],
    variant: Variant,
    *,
    run_name: str,
    runs_dir: Path,
    seed: int,
    batches: int,
    eval_every: int = 0,
    vocab_size: int = 0,
) -> dict[str, Any]:
    """The base TOML dict with the variant's section overrides, a run name, seeds and the batch budget.

    The seed goes to both the trainer (init/shuffling) and the worker (sampling), so seeds differ in
    everything random. `batches` <= 0 keeps the base file's trainer.max_batches, `eval_every` <= 0 the base
    file's trainer.eval_every. A K above `vocab_size` (when > 0) is capped to it (K = V is the full
    distribution). K = 1 with renormalisation is refused: that loss is identically zero (K_ONE_NOTE).
    """
    cfg = copy.deepcopy(base)
    for section, values in variant.overrides.items():
        cfg.setdefault(section, {}).update(values)
    cfg.setdefault("up", {}).update(name=run_name, out_dir=str(runs_dir))
    cfg.setdefault("trainer", {})["seed"] = seed
    cfg.setdefault("worker", {})["seed"] = seed
    if batches > 0:
        cfg["trainer"]["max_batches"] = batches
    if eval_every > 0:
        cfg["trainer"]["eval_every"] = eval_every
    trainer, worker = cfg["trainer"], cfg["worker"]
    for section in (trainer, worker):
        if section.get("token_aliases") and not section.get("teacher_tokenizer"):
            section["teacher_tokenizer"] = cfg.get("teacher", {}).get("model", "")
    if vocab_size and int(trainer.get("top_k", 16)) > vocab_size:
        # K beyond the vocabulary is the whole vocabulary (the teacher serves at most V ids per position).
        trainer["top_k"] = vocab_size
        worker["top_k"] = min(int(worker.get("top_k", 32)), vocab_size)
    if int(trainer.get("top_k", 16)) == 1 and trainer.get("renormalize", True):
        raise ValueError(f"{variant.label}: trainer.top_k = 1 with renormalize: {K_ONE_NOTE}")
    if int(worker.get("top_k", 32)) < int(trainer.get("top_k", 16)):
        raise ValueError(
            f"{variant.label}: worker.top_k {worker.get('top_k')} < trainer.top_k {trainer['top_k']}"
        )
    if trainer.get("support") != worker.get("support", "teacher_topk") and "student_topk" in (
        trainer.get("support"),
        worker.get("support"),
    ):
        raise ValueError(
            f"{variant.label}: the student_topk support needs worker.support = 'student_topk' too"
        )
    return cfg


def summarize_run(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Before/final eval pass@1 (strict, and lenient beside it), the test pass@1 of the checkpoint selected
    on validation, and the last training values of a run's metrics rows."""
    eval_rows = [r for r in rows if "eval/pass@1" in r]
    if not eval_rows:
        raise ValueError("the run logged no eval/pass@1 (trainer.eval_every = 0?)")
    first, last = eval_rows[0], eval_rows[-1]
    out = {
        "pass@1_before": float(first["eval/pass@1"]),
        "pass@1_final": float(last["eval/pass@1"]),
        # The last eval need not be at the last batch (max_batches not a multiple of eval_every): say where.
        "last_eval_batch": float(last.get("batch", 0)),
    }
    for key, row in (("pass@1_lenient_before", first), ("pass@1_lenient_final", last)):
        if "eval/pass@1_lenient" in row:
            out[key] = float(row["eval/pass@1_lenient"])
    selected = select_checkpoint(rows)
    if selected is not None:
        out["pass@1_selected"] = float(selected["eval/pass@1"])
        out["selected_batch"] = float(selected.get("batch", 0))
        out["val_pass@1_selected"] = float(selected["val/pass@1"])
    for key in ("response/length", "teacher/gap_mean", "grad/norm"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = float(values[-1])
    # How the student's samples ended, averaged over the whole run (the special-token failure mode).
    for key in ("response/ends_own_eos", "response/other_special", "response/length_cap"):
        values = [r[key] for r in rows if key in r]
        if values:
            out["run/" + key.split("/")[1]] = sum(values) / len(values)
    out["batches"] = float(max((r.get("batch", 0) for r in rows), default=0))
    return out


TABLE_COLUMNS = [
    ("pass@1_before", "pass@1 before"),
    ("pass@1_final", "pass@1 last eval"),
    ("pass@1_lenient_final", "lenient pass@1 last eval"),
    ("last_eval_batch", "at batch"),
    ("pass@1_selected", "pass@1 of val-selected ckpt"),
    ("selected_batch", "selected at batch"),
    ("posthoc/pass@1", "final pass@1 (HF greedy)"),
    ("posthoc/pass@1_lenient", "final lenient pass@1 (HF greedy)"),
    ("posthoc/avg@n", "final avg@n (HF sampled)"),
    ("response/length", "final length"),
    ("run/ends_own_eos", "ends with own eos (run)"),
    ("run/other_special", "has other marker (run)"),
    ("run/length_cap", "length cap (run)"),
]


def results_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table: one row per variant, `mean ± std` over its seeds for every column any run has."""
    columns = [(k, t) for k, t in TABLE_COLUMNS if any(k in s for runs in results.values() for s in runs)]
    lines = [
        "| variant | seeds | " + " | ".join(t for _, t in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for label, runs in results.items():
        cells = []
        for key, _ in columns:
            values = [s[key] for s in runs if key in s]
            mean, std = mean_std(values)
            fmt = {
                "response/length": "{:.1f} ± {:.1f}",
                "last_eval_batch": "{:.0f}",
                "selected_batch": "{:.0f} ± {:.0f}",
            }.get(key, "{:.3f} ± {:.3f}")
            cells.append(fmt.format(mean, std) if values else "–")
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def posthoc_eval(run_dir: Path, cfg: dict[str, Any], n: int) -> dict[str, float]:
    """Greedy pass@1 and avg@n of the run's final checkpoint, with transformers (n samples per prompt)."""
    from experiments.diagnostics import evaluate_model, load_checkpoint_model

    trainer = cfg["trainer"]
    model, tokenizer = load_checkpoint_model(trainer["model"], run_dir / "checkpoints")
    return evaluate_model(
        model,
        tokenizer,
        eval_file=trainer["eval_file"],
        verifier=trainer.get("eval_verifier", "toy_arith"),
        n=n,
        max_prompts=int(trainer.get("eval_max_prompts", 0)),
        max_new_tokens=int(trainer.get("eval_max_new_tokens", 64)),
        # The eval's sampling settings, not the worker's: one yardstick for every variant (the top-p ablation).
        temperature=float(trainer.get("eval_temperature", 1.0)),
        top_p=float(trainer.get("eval_top_p", 0.9)),
        seed=int(trainer.get("seed", 0)),
    )


def run_experiment(
    name: str,
    base_path: Path,
    seeds: list[int],
    batches: int,
    out: Path,
    avg_n: int,
    eval_every: int = 0,
    only: Sequence[str] = (),
    resume: bool = False,
) -> dict[str, list[dict[str, float]]]:
    from experiments.multitask_results import summarize_tasks
    from trainer.metrics import read_metrics

    with open(base_path, "rb") as fh:
        base = tomllib.load(fh)
    exp_dir = out / name
    runs_dir, configs_dir = exp_dir / "runs", exp_dir / "configs"
    configs_dir.mkdir(parents=True, exist_ok=True)
    variants = [v for v in EXPERIMENTS[name] if not only or v.slug in only]
    if not variants:
        raise ValueError(f"--only {list(only)} matches none of {[v.slug for v in EXPERIMENTS[name]]}")
    vocab_size = _vocab_size(base.get("teacher", {}).get("model", ""))
    # Build (and so check) every config before the first, long, run. Seed-major: every variant runs
    # once before any runs twice, so an experiment cut off midway still has a row for each variant.
    plan = []
    for seed in seeds:
        for variant in variants:
            run_name = f"{name}-{variant.slug}-s{seed}"
            cfg = build_variant_config(
                base,
                variant,
                run_name=run_name,
                runs_dir=runs_dir,
                seed=seed,
                batches=batches,
                eval_every=eval_every,
                vocab_size=vocab_size,
            )
            path = configs_dir / f"{run_name}.toml"
            path.write_text(tomli_w.dumps(cfg))
            plan.append((variant, seed, run_name, cfg, path.resolve()))

    results: dict[str, list[dict[str, float]]] = {v.label: [] for v in variants}
    curves: dict[str, list[list[dict[str, Any]]]] = {v.label: [] for v in variants}
    for i, (variant, seed, run_name, cfg, path) in enumerate(plan):
        run_dir = runs_dir / run_name
        reuse = resume and finished_run(run_dir, path, int(cfg["trainer"].get("max_batches", 0)))
        log.info(
            "[%d/%d] %s (seed %d)%s",
            i + 1,
            len(plan),
            variant.label,
            seed,
            " finished, kept" if reuse else "",
        )
        # Per run, beside its outputs: the run's wall time and its post-hoc eval (the one slow part of a
        # summary, kept per avg@n). The table row itself is always recomputed from metrics.jsonl.
        state_path = run_dir / "experiment.json"
        state = json.loads(state_path.read_text()) if reuse and state_path.is_file() else {}
        if not reuse:
            t0 = time.perf_counter()
            # Each run is `opd up` as a user runs it (the launcher sits above the experiments, not below).
            rc = subprocess.call([sys.executable, "-m", "launcher.cli", "up", "--config", str(path)])
            if rc != 0:
                raise RuntimeError(f"run {run_name} failed (exit {rc}); see {run_dir / 'logs'}")
            state = {"wall_s": time.perf_counter() - t0}
        rows = read_metrics(run_dir)
        summary = summarize_tasks(rows) if name == "multitask" else summarize_run(rows)
        summary["seed"] = float(seed)
        if "wall_s" in state:
            summary["wall_s"] = float(state["wall_s"])
        if avg_n > 0 and name != "multitask":  # the post-hoc eval reads one eval_file; tasks eval in-run
            post = state.get("posthoc")
            if not post or post.get("avg_n") != avg_n:
                post = state["posthoc"] = {"avg_n": avg_n, **posthoc_eval(run_dir, cfg, avg_n)}
            for key in ("pass@1", "pass@1_lenient", "avg@n", "avg@n_lenient"):
                summary[f"posthoc/{key}"] = float(post[key])
        state_path.write_text(json.dumps(state, indent=2))
        results[variant.label].append(summary)
        curves[variant.label].append(rows)
        # Written after every run, so a long experiment interrupted midway still leaves its partial table.
        _write_outputs(exp_dir, name, results, curves, seeds, batches, avg_n)
    return results


def finished_run(run_dir: Path, config_path: Path, max_batches: int) -> bool:
    """Whether `run_dir` holds a finished pipeline run of exactly the config at `config_path`: the same
    config text, report.md (the launcher writes it only after the trainer finished) and, with a batch
    budget, a metrics row at that batch."""
    from trainer.metrics import read_metrics

    copied = run_dir / "config.toml"
    if not copied.is_file() or copied.read_text() != config_path.read_text():
        return False
    if not (run_dir / "report.md").is_file() or not (run_dir / "metrics.jsonl").is_file():
        return False
    return (
        max_batches <= 0 or max((r.get("batch", 0) for r in read_metrics(run_dir)), default=0) >= max_batches
    )


def _vocab_size(model: str) -> int:
    """The vocabulary size of a local HF model dir (0 = unknown, e.g. a hub id: no capping)."""
    path = Path(model) / "config.json"
    return int(json.loads(path.read_text()).get("vocab_size", 0)) if path.is_file() else 0


def _write_outputs(exp_dir, name, results, curves, seeds, batches, avg_n) -> None:
    done = {k: v for k, v in results.items() if v}
    (exp_dir / "results.json").write_text(json.dumps(done, indent=2))
    if name == "multitask":
        from experiments.multitask_results import plot_task_curves, tasks_table

        (exp_dir / "table.md").write_text(
            f"# opd experiment multitask\n\nseeds {seeds}, {batches or 'base-file'} batches per run (tasks "
            "alternate batch by batch); per task the trainer's greedy eval: pass@1 of the prompt task, success "
            "rate of the environment task, before training and at the last eval (no best-of-test column: selecting "
            "on the test set overstates it; a val-selected column appears where tasks log a validation eval). "
            "Beside it: the lenient pass@1 (an answer closed by the teacher's marker also counts), the last "
            "eval's length and share ending with the student's own end marker, and (run) the shares of the "
            "task's training samples ending with that marker, holding the other marker, cut by the length limit."
            "\n\n" + tasks_table(done) + "\n![curves](curves.png)\n"
        )
        plot_task_curves(
            {k: curves[k] for k in done}, exp_dir / "curves.png", title="opd experiment multitask"
        )
        return
    table = results_table(done)
    header = (
        f"# opd experiment {name}\n\nseeds {seeds}, {batches or 'base-file'} batches per run; pass@1 columns "
        "from the trainer's greedy eval on the test prompts (first and last eval). pass@1 is STRICT: the "
        "answer is right AND the completion ends with the student's own end marker; the lenient score also "
        "accepts an answer closed by the teacher's marker. The val-selected checkpoint is the eval with the "
        "best validation pass@1 (held-out prompts disjoint from the test set); its TEST pass@1 is reported. "
        f"HF columns: final checkpoint, avg@{avg_n} at the eval temperature/top-p.\n\n"
    )
    if name == "ablations":
        header += K_ONE_NOTE + "\n\n"
    (exp_dir / "table.md").write_text(header + table + "\n![curves](curves.png)\n")
    plot_curves({k: curves[k] for k in done}, exp_dir / "curves.png", title=f"opd experiment {name}")


@report_config_errors("opd experiment")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [*EXPERIMENTS, "gamma-toy", "diagnostics"]
    if not argv or argv[0] not in names:
        print(f"usage: opd experiment {{{','.join(names)}}} [options]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name == "gamma-toy":
        from experiments import gamma_toy

        return gamma_toy.main(rest)
    if name == "diagnostics":
        from experiments import diagnostics

        return diagnostics.main(rest)

    from services.common.logs import setup_logging

    setup_logging("experiment")
    parser = argparse.ArgumentParser(prog=f"opd experiment {name}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (trainer.seed = worker.seed)")
    parser.add_argument(
        "--batches", type=int, default=0, help="trainer.max_batches per run (0 = base file's)"
    )
    parser.add_argument("--only", default="", help="comma-separated variant slugs to run (default: all)")
    parser.add_argument("--eval-every", type=int, default=0, help="trainer.eval_every (0 = base file's)")
    parser.add_argument("--out", default="runs/experiments", help="outputs go to <out>/<name>/")
    parser.add_argument(
        "--base",
        default=DEFAULT_BASE.get(name, "configs/demo.toml"),
        help="TOML file every variant starts from",
    )
    parser.add_argument(
        "--avg-n", type=int, default=4, help="samples per prompt of the post-hoc avg@n (0 = off)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep runs that already finished with the same config (an interrupted or widened experiment)",
    )
    args = parser.parse_args(rest)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        parser.error("--seeds: give at least one seed")
    out = Path(args.out)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    results = run_experiment(
        name, Path(args.base), seeds, args.batches, out, args.avg_n, args.eval_every, only, args.resume
    )
    print(f"\nopd experiment {name}: {out / name / 'table.md'}, {out / name / 'curves.png'}\n")
    if name == "multitask":
        from experiments.multitask_results import tasks_table

        print(tasks_table(results))
    else:
        print(results_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
