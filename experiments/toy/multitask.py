"""`opd toy prepare-multi`: the two-task toy setting (math + a multi-turn agent task), cached.

    runs/toy-multi/data/math_train.jsonl, math_eval.jsonl   addition prompts, as the math toy (task.py)
    runs/toy-multi/models/math_teacher/                     strong on addition, ends with <|im_end|>
    runs/toy-multi/models/agent_teacher/                    strong in the `rooms` game, ends with <|im_end|>
    runs/toy-multi/models/student/                          weak on both, ends with </s>
    runs/toy-multi/models/meta.json                         config hash, env settings, measured rates

All three models share ONE character vocabulary (`build_tokenizer`: digits, `+=`, lowercase letters, space,
`.,:>`, the line break, both end markers), so the student can be distilled from either teacher. The rooms
game's transcript format is the episode runner's (services/worker/episode.py): observation + "\\n>", then
an action and its end marker, then the next observation, ...

Agent data are scripted-expert transcripts (services/worker/envs/rooms.py `expert_action`) with two kinds
of noise that make the teacher useful on the student's own transcripts: with probability `agent_noise` one
turn is a random (often illegal) action, not trained on, after which the expert recovers from whatever
state it left; and each earlier action's end marker is the other model's marker with probability
`foreign_eos`, not trained on, because in distillation the teacher reads transcripts whose earlier actions
end with the student's marker. Only expert actions and their own end markers carry the loss; observations
never do.

Env seeds: distillation uses rows 0, 1, 2, ... (the worker's env seeds); the agent eval uses
[`EVAL_SEED_BASE`, + n_env_eval); pretraining transcripts come from seeds >= `TRAIN_SEED_BASE`, so neither
overlaps. Teachers are trained with experiments/toy/pretrain.py `train` (fresh examples every step, stop at a
teacher-forced sequence-accuracy target); the student with `train_student` (both tasks, stop once greedy
probes of both reach their targets).
"""

from __future__ import annotations

import itertools
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
from services.worker.envs.rooms import EXPERT_MAX_STEPS

RECIPE_VERSION = 2  # 2: math without the single-task toy's fillers (v1 trained on unknown tokens)
ALPHABET = "0123456789+=\n abcdefghijklmnopqrstuvwxyz.,:>"
EVAL_SEED_BASE = 1_000_000
PROBE_SEED_BASE = 2_000_000
TRAIN_SEED_BASE = 10_000_000
ENV = "rooms"


@dataclass
class MultiToyConfig(CachedBuildConfig):
    """Make the two-task toy setting: math prompts, a math teacher, an agent teacher, one student."""

    SECTION: ClassVar[str] = "toy_multi"
    ENV_PREFIX: ClassVar[str] = "OPD_TOY_MULTI_"

    out: str = opt("runs/toy-multi", "output directory (data/, models/, models/meta.json)")
    n_train: int = opt(5000, "math prompts in data/math_train.jsonl")
    n_eval: int = opt(200, "held-out math prompts in data/math_eval.jsonl")
    min_digits: int = opt(2, "fewest digits of a math operand")
    max_digits: int = opt(3, "most digits of a math operand")
    n_env_eval: int = opt(200, "agent eval episodes (env seeds EVAL_SEED_BASE + i)")
    num_receptacles: int = opt(4, "rooms game: receptacles per room")
    num_objects: int = opt(2, "rooms game: objects per room")
    p_closed: float = opt(0.7, "rooms game: chance that an openable receptacle starts closed")
    max_turns: int = opt(8, "agent episode turn limit")
    action_max_new_tokens: int = opt(24, "tokens per action at most (the longest expert action is 21)")
    agent_noise: float = opt(0.3, "chance of one random, untrained action in an agent transcript")
    foreign_eos: float = opt(0.5, "chance that an earlier action ends with the other model's end marker")
    hidden_size: int = opt(64, "model width (all models)")
    num_layers: int = opt(2, "transformer layers")
    num_heads: int = opt(2, "attention heads; head_dim = hidden_size / num_heads must be 32 or 64 (vLLM)")
    intermediate_size: int = opt(256, "MLP width")
    max_positions: int = opt(512, "context length of the models")
    batch_size: int = opt(32, "examples per training step")
    lr: float = opt(3e-3, "peak AdamW learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay on matrices")
    warmup_steps: int = opt(30, "linear warmup steps, then cosine decay to 10% over the planned steps")
    math_teacher_steps: int = opt(1500, "most math teacher steps")
    math_teacher_target: float = opt(0.95, "stop the math teacher at this batch sequence accuracy (EMA)")
    agent_teacher_steps: int = opt(1500, "most agent teacher steps")
    agent_teacher_target: float = opt(0.85, "stop the agent teacher at this batch sequence accuracy (EMA)")
    student_steps: int = opt(1500, "most student steps (a step is one batch of one task)")
    student_agent_share: float = opt(0.4, "student: share of its steps (batches) on the agent task")
    student_math_target: float = opt(0.3, "student: stop once its probe greedy math pass@1 is >= this ...")
    student_agent_target: float = opt(0.2, "student: ... and its probe greedy agent success is >= this")
    student_probe_every: int = opt(20, "student: steps between probes of its greedy rates")
    n_probe: int = opt(50, "student probes: math prompts and agent episodes (disjoint from eval)")
    eval_top_p: float = opt(0.9, "top-p of the sampled measurements (temperature 1)")

    def __post_init__(self) -> None:
        check_model_shape(self)
        check_digits(self)
        check_at_least_one(
            self,
            (
                "n_train",
                "n_eval",
                "n_env_eval",
                "batch_size",
                "max_turns",
                "action_max_new_tokens",
                "math_teacher_steps",
                "agent_teacher_steps",
                "student_steps",
                "student_probe_every",
                "n_probe",
            ),
        )
        check_rates(
            self,
            (
                "math_teacher_target",
                "agent_teacher_target",
                "student_math_target",
                "student_agent_target",
                "eval_top_p",
            ),
        )
        for name in ("agent_noise", "foreign_eos", "p_closed", "student_agent_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if (
            self.n_env_eval > PROBE_SEED_BASE - EVAL_SEED_BASE
            or self.n_probe > TRAIN_SEED_BASE - PROBE_SEED_BASE
        ):
            raise ConfigError(f"n_env_eval {self.n_env_eval} / n_probe {self.n_probe}: seed ranges overlap")
        if self.max_turns < EXPERT_MAX_STEPS:
            raise ConfigError(
                f"max_turns: {self.max_turns} < {EXPERT_MAX_STEPS}, the expert's longest episode"
            )
        if self.threads < 0 or self.lr <= 0:
            raise ConfigError(f"threads ({self.threads}) must be >= 0 and lr ({self.lr}) > 0")
        self.env_options()  # the rooms game validates its own options

    def cache_key(self) -> str:
        return config_hash(self, RECIPE_VERSION)

    def env_options(self) -> dict[str, Any]:
        from services.worker.envs.rooms import RoomsEnv

        options = dict(
            num_receptacles=self.num_receptacles, num_objects=self.num_objects, p_closed=self.p_closed
        )
        try:
            RoomsEnv(**options)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return options


@dataclass
class MultiPaths:
    out: Path

    @property
    def math_train(self) -> Path:
        return self.out / "data" / "math_train.jsonl"

    @property
    def math_eval(self) -> Path:
        return self.out / "data" / "math_eval.jsonl"

    def model(self, role: str) -> Path:
        return self.out / "models" / role

    @property
    def meta(self) -> Path:
        return self.out / "models" / "meta.json"


ROLES = ("math_teacher", "agent_teacher", "student")


def build_tokenizer(eos_token: str) -> Any:
    """The shared character vocabulary of the three models; `eos_token` picks the model's end marker."""
    from experiments.tiny_models import build_char_tokenizer
    from experiments.toy.task import END_MARKERS, SPECIAL_TOKENS

    if eos_token not in END_MARKERS:
        raise ValueError(f"eos_token must be one of {END_MARKERS}, got {eos_token!r}")
    return build_char_tokenizer(ALPHABET, SPECIAL_TOKENS, eos_token=eos_token)


# ---------------------------------------------------------------------------------------------- data

# An example is a list of segments (text, trained); a segment whose text is an end marker is one token.
Segments = list[tuple[str, bool]]


def math_segments(problem: Any, eos: str) -> Segments:
    """The addition task without the single-task toy's line fillers: this toy's vocabulary has none (a
    filler would be an unknown token), and its math needs no wide vocabulary (the K ablation is not run here)."""
    from experiments.toy.task import reference_completion

    return [
        (problem.prompt, False),
        (reference_completion(problem.a, problem.b, fillers=False), True),
        (eos, True),
    ]


def agent_segments(
    seed: int,
    env_options: dict[str, Any],
    rng: random.Random,
    eos: str,
    foreign: str,
    noise: float,
    foreign_eos: float,
    max_turns: int,
) -> Segments:
    """One scripted-expert transcript of the rooms game from env seed `seed` (see the module docstring)."""
    from services.worker.envs.rooms import RoomsEnv
    from services.worker.episode import observation_text

    while True:
        env = RoomsEnv(**env_options)
        segments: Segments = [(observation_text(env.reset(seed)), False)]
        # every expert episode has >= 4 turns, so a noisy turn among the first 4 always happens
        noisy_turn = rng.randrange(min(4, max_turns)) if rng.random() < noise else -1
        for turn in range(max_turns):
            expert = turn != noisy_turn
            action = env.expert_action() if expert else _random_action(env, rng)
            result = env.step(action)
            segments.append((action, expert))
            if result.done:
                segments.append((eos, True))
                return segments
            if expert and rng.random() >= foreign_eos:
                segments.append((eos, True))
            else:
                segments.append((foreign if expert else rng.choice((eos, foreign)), False))
            segments.append((observation_text(result.observation), False))
        if noise == 0.0:
            raise RuntimeError(f"env seed {seed}: the expert needs more than max_turns={max_turns} turns")
        noise = 0.0  # the noise pushed the expert past the turn limit: the same seed again, clean


def _random_action(env: Any, rng: random.Random) -> str:
    s = env.state
    r, o = rng.choice(s.receptacles), rng.choice(s.objects)
    return rng.choice(
        [
            f"go to {r}",
            f"open {r}",
            f"close {r}",
            f"take {o}",
            f"put {o} in {r}",
            "look",
            "inventory",
            "go to x",
        ]
    )


def encode_segments(examples: Sequence[Segments], tokenizer: Any) -> tuple[Any, Any]:
    """(input_ids_B_T, labels_B_T) as pretrain.encode_batch: labels are the ids of trained segments and
    IGNORE elsewhere (unshifted), right padding with the pad id."""
    import torch

    from experiments.toy.pretrain import IGNORE

    special = set(tokenizer.all_special_tokens)
    rows = []
    for segments in examples:
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in segments:
            piece = (
                [tokenizer.convert_tokens_to_ids(text)]
                if text in special
                else tokenizer(text, add_special_tokens=False)["input_ids"]
            )
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        rows.append((ids, labels))
    T = max(len(ids) for ids, _ in rows)
    input_ids_B_T = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    labels_B_T = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        input_ids_B_T[i, : len(ids)] = torch.tensor(ids)
        labels_B_T[i, : len(labels)] = torch.tensor(labels)
    return input_ids_B_T, labels_B_T


def example_stream(
    cfg: MultiToyConfig, role: str, kind: str, eos: str, foreign: str, exclude: Sequence[str]
) -> Iterator[Segments]:
    """Endless fresh training examples of one task (`kind`: math or agent) for one role."""
    from experiments.toy.task import problem_stream

    offset = ROLES.index(role) + 1
    if kind == "math":
        for problem in problem_stream(
            cfg.seed * 1000 + offset, cfg.min_digits, cfg.max_digits, exclude=exclude
        ):
            yield math_segments(problem, eos)
    elif kind == "agent":
        rng = random.Random(f"multi:{cfg.seed}:{role}")
        options = cfg.env_options()
        start = TRAIN_SEED_BASE + offset * 10_000_000 + cfg.seed * 1_000_000
        for seed in itertools.count(start):
            yield agent_segments(
                seed, options, rng, eos, foreign, cfg.agent_noise, cfg.foreign_eos, cfg.max_turns
            )
    else:
        raise ValueError(f"unknown task kind {kind!r}")


# ------------------------------------------------------------------------------------------------ eval


class InProcessRollout:
    """The rollout service's `generate` on an in-memory model (services/rollout/hf_engine.py
    `sample_groups`, as the hf backend does), so the episode runner's evaluators measure a model while it
    is being prepared."""

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size

    def generate(self, req: Any) -> Any:
        from services.rollout.engine import GenerateParams
        from services.rollout.hf_engine import sample_groups
        from services.rollout.protocol import GenerateResponse

        if req.prompts is None:
            raise ValueError("InProcessRollout takes token-id prompts only")
        params = GenerateParams(
            n=req.n,
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed or 0,
            stop_token_ids=req.stop_token_ids or [self.tokenizer.eos_token_id],
            return_top_k=0,
        )
        self.model.eval()
        samples = sample_groups(self.model, req.prompts, params, self.max_batch_size)
        return GenerateResponse(policy_version=0, prompt_ids=req.prompts, samples=samples)


def agent_success(
    model: Any, tokenizer: Any, cfg: MultiToyConfig, greedy: bool, seed: int = 0, seeds: Sequence[int] = ()
) -> tuple[float, float, list[str]]:
    """(success rate, mean turns, the first episode's transcript) over `seeds` (default: the eval seeds)."""
    from services.rollout.protocol import GREEDY_TOP_P
    from services.worker.envs import make_env
    from services.worker.episode import Episode, encode_text, observation_text, play

    was_training = model.training
    options = cfg.env_options()
    episodes = []
    for s in seeds or range(EVAL_SEED_BASE, EVAL_SEED_BASE + cfg.n_env_eval):
        env = make_env(ENV, **options)
        episodes.append(Episode(env, encode_text(tokenizer, observation_text(env.reset(s)))))
    play(
        episodes,
        rollout=InProcessRollout(model, tokenizer),
        tokenizer=tokenizer,
        max_turns=cfg.max_turns,
        max_new_tokens=cfg.action_max_new_tokens,
        temperature=1.0,
        top_p=GREEDY_TOP_P if greedy else cfg.eval_top_p,
        sample_seed=seed,
        max_context_tokens=cfg.max_positions,
    )
    rate = sum(e.success for e in episodes) / len(episodes)
    turns = sum(len(e.actions) for e in episodes) / len(episodes)
    first = episodes[0]
    model.train(was_training)
    return rate, turns, [tokenizer.decode(first.prompt_ids + first.ids)]


def measure(model: Any, tokenizer: Any, cfg: MultiToyConfig, math_eval: list[Any]) -> dict[str, Any]:
    from experiments.toy.task import generate_and_score

    prompts, answers = [p.prompt for p in math_eval], [p.answer for p in math_eval]
    t0 = time.perf_counter()
    greedy = generate_and_score(model, tokenizer, prompts, answers, 48, greedy=True, seed=cfg.seed)
    sampled = generate_and_score(
        model, tokenizer, prompts, answers, 48, greedy=False, top_p=cfg.eval_top_p, seed=cfg.seed
    )
    success_greedy, turns_greedy, transcript = agent_success(model, tokenizer, cfg, greedy=True)
    success_sampled, _, _ = agent_success(model, tokenizer, cfg, greedy=False, seed=cfg.seed)
    return {
        "math_pass1_greedy": greedy.accuracy,
        "math_pass1_sampled": sampled.accuracy,
        "math_eos_rate_greedy": greedy.eos_rate,
        "math_example": greedy.completions[0],
        "agent_success_greedy": success_greedy,
        "agent_success_sampled": success_sampled,
        "agent_turns_greedy": turns_greedy,
        "agent_example": transcript[0],
        "eval_seconds": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------------------------- build


def prepare(cfg: MultiToyConfig) -> PrepareResult:
    """Make (or find in the cache) the math splits and the three models under `cfg.out`."""
    paths = MultiPaths(Path(cfg.out))
    needed = [paths.math_train, paths.math_eval] + [paths.model(r) / "config.json" for r in ROLES]
    return prepare_cached(cfg, paths, cfg.cache_key(), needed, lambda: _build(cfg, paths))


def train_student(
    model: Any,
    tokenizer: Any,
    cfg: MultiToyConfig,
    streams: dict[str, Iterator[Segments]],
    math_probe: list[Any],
) -> dict[str, Any]:
    """Train the student on both tasks until its greedy rates on probe sets reach both targets, then stop.

    Every step is one batch of one task, the agent task for `student_agent_share` of the steps (a homogeneous
    batch keeps math examples from being padded to transcript length). Every `student_probe_every` steps
    the greedy math pass@1 (on `math_probe`) and agent success (on the probe seeds) are measured; training
    stops at the first probe where both reached their targets, so the student is partly competent at both.
    Both tasks stay in the schedule to the end (dropping one makes the model forget it within a few dozen
    steps). AdamW, warmup then a constant learning rate (the stop time is not known in advance).
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from experiments.toy.pretrain import completion_loss, make_optimizer
    from experiments.toy.task import generate_and_score
    from trainer.lr_schedule import warmup_cosine

    device = next(model.parameters()).device
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    targets = {"math": cfg.student_math_target, "agent": cfg.student_agent_target}
    probe_seeds = range(PROBE_SEED_BASE, PROBE_SEED_BASE + cfg.n_probe)
    rates = {"math": 0.0, "agent": 0.0}
    history: list[tuple[int, float, float]] = []
    steps = {"math": 0, "agent": 0}
    reached = False
    t0 = time.perf_counter()

    def probe(step: int) -> bool:
        prompts, answers = [p.prompt for p in math_probe], [p.answer for p in math_probe]
        rates["math"] = generate_and_score(model, tokenizer, prompts, answers, 48, greedy=True).accuracy
        rates["agent"] = agent_success(model, tokenizer, cfg, greedy=True, seeds=probe_seeds)[0]
        history.append((step, rates["math"], rates["agent"]))
        return all(rates[k] >= targets[k] for k in targets)

    columns = (
        TextColumn("[bold]student"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.3f}  probe math {task.fields[math]:.2f} agent {task.fields[agent]:.2f}"
        ),
        TimeElapsedColumn(),
    )
    model.train()
    with Progress(*columns) as progress:
        bar = progress.add_task("student", total=cfg.student_steps, loss=float("nan"), math=0.0, agent=0.0)
        for step in range(cfg.student_steps):
            kind = "agent" if steps["agent"] < cfg.student_agent_share * (step + 1) else "math"
            for group in opt.param_groups:
                group["lr"] = cfg.lr * warmup_cosine(step, cfg.student_steps, cfg.warmup_steps, 1.0)
            input_ids_B_T, labels_B_T = encode_segments(
                [next(streams[kind]) for _ in range(cfg.batch_size)], tokenizer
            )
            logits_B_T_V = model(input_ids=input_ids_B_T.to(device)).logits
            loss, _ = completion_loss(logits_B_T_V, labels_B_T.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps[kind] += 1
            if (step + 1) % cfg.student_probe_every == 0:
                reached = probe(step + 1)
            progress.update(bar, advance=1, loss=loss.item(), math=rates["math"], agent=rates["agent"])
            if reached:
                break
    model.eval()
    return {
        "train_steps": steps["math"] + steps["agent"],
        "train_steps_per_task": steps,
        "reached_target": reached,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "probe_history": history,  # (step, math greedy pass@1, agent greedy success) on the probe sets
    }


def _train_role(cfg: MultiToyConfig, role: str, math_eval: list[Any], out_dir: Path) -> dict[str, Any]:
    from experiments.tiny_models import STUDENT_EOS, TEACHER_EOS
    from experiments.toy.pretrain import new_model, save_and_describe, train
    from experiments.toy.task import problem_stream

    eos, foreign = (STUDENT_EOS, TEACHER_EOS) if role == "student" else (TEACHER_EOS, STUDENT_EOS)
    tokenizer = build_tokenizer(eos)
    model = new_model(
        cfg, tokenizer, cfg.seed * 1000 + ROLES.index(role) + 1, max_positions=cfg.max_positions
    )
    exclude = [p.prompt for p in math_eval]
    if role == "student":
        probe_problems = problem_stream(cfg.seed * 1000 + 99, cfg.min_digits, cfg.max_digits, exclude=exclude)
        math_probe = [next(probe_problems) for _ in range(cfg.n_probe)]
        streams = {k: example_stream(cfg, role, k, eos, foreign, exclude) for k in ("math", "agent")}
        trained = train_student(model, tokenizer, cfg, streams, math_probe)
    else:
        kind = role.split("_")[0]
        result = train(
            model,
            tokenizer,
            example_stream(cfg, role, kind, eos, foreign, exclude),
            steps=getattr(cfg, f"{role}_steps"),
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            target_seq_acc=getattr(cfg, f"{role}_target"),
            desc=role,
            encode=encode_segments,
        )
        trained = result.meta()
    measured = measure(model, tokenizer, cfg, math_eval)
    return {
        **save_and_describe(model, tokenizer, out_dir),
        **trained,
        **measured,
    }


def _build(cfg: MultiToyConfig, paths: MultiPaths) -> dict[str, Any]:
    from experiments.toy.task import make_splits, write_jsonl

    t0 = time.perf_counter()
    with training_threads(cfg) as threads:
        math_train, math_eval, _ = make_splits(
            cfg.seed, cfg.n_train, cfg.n_eval, cfg.min_digits, cfg.max_digits
        )
        write_jsonl(paths.math_train, math_train)
        write_jsonl(paths.math_eval, math_eval)
        models = {}
        for role in ROLES:
            out_dir = paths.model(role)
            shutil.rmtree(out_dir, ignore_errors=True)
            models[role] = _train_role(cfg, role, math_eval, out_dir)
    return {
        **meta_header(cfg, RECIPE_VERSION, threads),
        "data": {
            "math_train": str(paths.math_train),
            "math_eval": str(paths.math_eval),
            "n_train": len(math_train),
            "n_eval": len(math_eval),
        },
        "agent": {
            "env": ENV,
            "env_options": cfg.env_options(),
            "max_turns": cfg.max_turns,
            "max_new_tokens": cfg.action_max_new_tokens,
            "max_context_tokens": cfg.max_positions,
            "eval_seeds": [EVAL_SEED_BASE, EVAL_SEED_BASE + cfg.n_env_eval],  # [start, end)
        },
        **models,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def summary_table(result: PrepareResult) -> Table:
    meta = result.meta
    table = Table(
        title=f"two-task toy ({how_made(result)})",
        caption=f"math: {meta['data']['n_eval']} eval prompts; agent: {meta['config']['n_env_eval']} rooms "
        f"episodes (<= {meta['agent']['max_turns']} turns); sampled = temperature 1, top-p "
        f"{meta['config']['eval_top_p']}; under {result.paths.out}",
    )
    for col in (
        "model",
        "end marker",
        "params",
        "steps",
        "math pass@1 greedy / sampled",
        "agent success greedy / sampled",
    ):
        table.add_column(col)
    for role in ROLES:
        m = meta[role]
        table.add_row(
            role,
            m["eos_token"],
            f"{m['parameters']:,}",
            str(m["train_steps"]),
            f"{m['math_pass1_greedy']:.1%} / {m['math_pass1_sampled']:.1%}",
            f"{m['agent_success_greedy']:.1%} / {m['agent_success_sampled']:.1%}",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    return run_cli(MultiToyConfig, prepare, summary_table, "opd toy prepare-multi", argv)


if __name__ == "__main__":
    sys.exit(main())
