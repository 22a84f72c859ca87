"""`opd train`: the trainer driver, top to bottom.

    setup      config, process group, student (fp32 masters) + tokenizer, layout (trainer/parallel.py),
               optimizer, resume from the newest checkpoint (any world size)
    recover    (rank 0) this consumer's pending entries: ack those the commit log holds, retrain the rest
    loop       read a batch -> broadcast it -> mini-batch steps (micro-batches) -> version++ if a push is due
               -> checkpoint (started: every rank writes its shard in the background) -> push weights
               -> XACK+XDEL of what a finished checkpoint committed -> eval -> metrics
    finish     finish the checkpoint in flight, checkpoint what is left, commit trailing stale drops, close

The order is what makes consumption exactly-once (trainer/checkpoint.py): entries are acked only after the
checkpoint listing them is renamed into place, which rank 0 does once every rank's shard is written (polled
between reads too, so a quiet stream does not hold acks). Pushes do not wait for the checkpoint: a trainer
restarted from an older checkpoint than the rollouts serve raises its version past theirs
(trainer/weight_sync.py), so a version number never names two sets of weights.

Data parallel: `torchrun --nproc-per-node N opd train ...`; see trainer/dist.py (records, gradients) and
trainer/parallel.py (the replicate and FSDP2 layouts, mixed precision). Every rank trains, checkpoints
(each writes its shard, trainer/checkpoint.py) and, under FSDP2, helps gather the weights for a push; only
rank 0 talks to Redis and the rollout services.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from transformers import PreTrainedModel

from services.common import redis_keys
from services.common.config import ConfigError, report_config_errors, to_dict
from services.common.experience import ExperienceRecord, decode
from services.common.hf_models import load_causal_lm
from services.common.logs import setup_logging
from services.common.prompts import Prompt
from services.common.token_aliases import disagreeing_special_ids
from services.common.verifiers import Verifier, get_verifier
from services.rollout.client import RolloutClient
from trainer import checkpoint as ckpt
from trainer import dist
from trainer import tasks as task_streams
from trainer.aliases import TrainerAliases, load_tokenizer
from trainer.config import TrainerConfig, load_config
from trainer.consumer import BatchRead
from trainer.data import (
    MiniBatch,
    TrainSequence,
    check_record,
    collate,
    micro_batches,
    sequences_of,
    split_even,
)
from trainer.lr_schedule import warmup_cosine
from trainer.metrics import MetricsWriter, mean_metrics, weighted_mean
from trainer.objective import lm_head_gradient_variance
from trainer.parallel import (
    ModuleWeights,
    ObjectiveModule,
    grad_norm_value,
    is_sharded,
    push_dtype_of,
    wrap_model,
)
from trainer.schedule import TaskSchedule
from trainer.weight_sync import StateDictWeights, Weights, WeightSync

log = logging.getLogger("trainer")


# ----------------------------------------------------------------------------------------------- setup


def load_student(cfg: TrainerConfig, device: torch.device) -> tuple[PreTrainedModel, Any]:
    """The student (any causal LM id or path) with fp32 master weights, in training mode on `device`, and
    its tokenizer. The layout over ranks and the compute precision come after (trainer/parallel.py)."""
    from transformers import AutoTokenizer  # lazy: heavy import

    model = load_causal_lm(cfg.model, dtype=torch.float32).to(device)
    model.config.use_cache = False
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    return model, tokenizer


def vocab_size_of(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    assert isinstance(head, nn.Module) and isinstance(head.weight, torch.Tensor)
    return int(head.weight.shape[0])


def masked_ids_of(cfg: TrainerConfig, tokenizer: Any, teacher_tokenizer: Any = None) -> torch.Tensor | None:
    """Ids for special-token masking (None when it is off): `masked_token_ids` if given, else the special
    ids the student and teacher tokenizers disagree on (`disagreeing_special_ids`; no teacher tokenizer
    means the student's: none)."""
    if not cfg.special_token_masking or not (cfg.mask_special_positions or cfg.mask_special_support):
        return None
    ids = cfg.masked_token_ids or disagreeing_special_ids(tokenizer, teacher_tokenizer)
    log.info(
        "special-token masking (positions %s, support %s): ids %s %s",
        cfg.mask_special_positions,
        cfg.mask_special_support,
        ids,
        tokenizer.convert_ids_to_tokens(ids) if ids and max(ids) < len(tokenizer) else "",
    )
    return torch.tensor(ids, dtype=torch.int64)


def check_setup(cfg: TrainerConfig, vocab_size: int, world_size: int) -> None:
    """Config errors that need the model or the process count."""
    if cfg.objective == "full_kl":
        if cfg.top_k != vocab_size:
            raise ConfigError(
                f"objective full_kl is the exact reverse KL and needs the teacher's whole distribution: top_k must "
                f"equal the vocabulary size {vocab_size} (got {cfg.top_k}); with a top-K teacher use objective lsm"
            )
        if cfg.support != "teacher_topk":
            raise ConfigError(
                f"objective full_kl uses the teacher's ids as given; support must be teacher_topk, "
                f"got {cfg.support!r}"
            )
    if cfg.batch_size // cfg.steps_per_batch < world_size:
        raise ConfigError(
            f"mini-batches of {cfg.batch_size // cfg.steps_per_batch} sequences cannot feed "
            f"{world_size} ranks: raise mini_batch_size"
        )


def lr_at(cfg: TrainerConfig, batch: int) -> float:
    """The learning rate of batch `batch` (0-based): a pure function of the batch, so a resumed run
    continues the schedule with no scheduler state in the checkpoint."""
    floor = cfg.lr_min_ratio if cfg.lr_decay == "cosine" else 1.0
    return cfg.lr * warmup_cosine(batch, cfg.max_batches, cfg.lr_warmup_batches, floor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- one batch


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that the time/* breakdown charges each phase its own kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _micro_shards(
    seqs: list[TrainSequence],
    cfg: TrainerConfig,
    masked_ids: torch.Tensor | None,
    aliases: TrainerAliases | None,
    device: torch.device,
) -> list[MiniBatch]:
    """This rank's share of a mini-batch as collated micro-batches of at most max_tokens_per_micro_batch."""
    groups = micro_batches(
        seqs, cfg.max_tokens_per_micro_batch, max_seq_len=cfg.max_seq_len, packed=cfg.pack_sequences
    )
    return [
        collate(
            g,
            support=cfg.support,
            top_k=cfg.top_k,
            max_seq_len=cfg.max_seq_len,
            masked_ids=masked_ids,
            aliases=aliases,
            pack=cfg.pack_sequences,
            mask_positions=cfg.mask_special_positions,
            mask_support=cfg.mask_special_support,
        ).to(device)
        for g in groups
    ]


def train_batch(
    module: ObjectiveModule,
    optimizer: torch.optim.Optimizer,
    records: list[ExperienceRecord],
    cfg: TrainerConfig,
    ctx: dist.DistContext,
    masked_ids: torch.Tensor | None,
    *,
    with_diagnostics: bool = False,
    with_grad_variance: bool = False,
    aliases: TrainerAliases | None = None,
) -> dict[str, float]:
    """One batch: cfg.steps_per_batch mini-batches, one optimizer step each; returns the batch's metrics.

    Each mini-batch is split into contiguous shards, one per rank, and a rank's shard into micro-batches of
    at most `max_tokens_per_micro_batch` tokens whose gradients accumulate. Every micro-batch's loss is
    divided by the mini-batch's global token count, so the accumulated, rank-summed gradient is the
    full mini-batch's (trainer/dist.py). Under FSDP2 every rank runs the same number of forward/backward
    passes (each holds collectives): a rank with fewer micro-batches repeats its last one at weight 0.

    With `cfg.recompute_old`, every micro-batch of every mini-batch first gets the PPO old policy's
    log-probabilities from the model as it is before the batch's first update (no grad), so the ratio is 1
    at the first step and later steps measure how far the batch's own updates moved the policy.
    """
    seqs = sequences_of(records)
    params = [p for p in module.parameters() if p.requires_grad]
    sharded = is_sharded(module)
    per_step: list[dict[str, float]] = []
    t_collate = t_loss = t_optim = t_old = 0.0
    tokens = 0
    micro_total = 0
    # (this rank's sequences, its micro-batches, the mini-batch's global token count, passes) per step
    steps: list[tuple[list[TrainSequence], list[MiniBatch], float, int]] = []
    tc = time.perf_counter()
    for s, e in split_even(len(seqs), cfg.steps_per_batch):
        rs, re = split_even(e - s, ctx.world_size)[ctx.rank]
        mine = seqs[s + rs : s + re]
        if not mine:
            raise RuntimeError(f"rank {ctx.rank} got no sequences of a mini-batch of {e - s}")
        shards = _micro_shards(mine, cfg, masked_ids, aliases, ctx.device)
        local_tokens = sum(mb.num_loss_tokens for mb in shards)
        global_tokens, n_micro = dist.all_reduce_sum(ctx, [float(local_tokens)])[0], len(shards)
        if sharded:
            n_micro = int(dist.all_reduce_max(ctx, [float(len(shards))])[0])
        tokens += int(global_tokens)
        micro_total += n_micro
        steps.append((mine, shards, global_tokens, n_micro))
    t_collate = time.perf_counter() - tc
    if cfg.recompute_old:
        for _, shards, _, n_micro in steps:
            for i in range(n_micro):  # padding passes too: under FSDP every forward is a collective
                mb = shards[min(i, len(shards) - 1)]
                mb.old_logprobs_B_T = module(mb, old_logprobs=True)[0]
        _sync(ctx.device)
        t_old = time.perf_counter() - tc - t_collate

    for step_i, (mine, shards, global_tokens, n_micro) in enumerate(steps):
        t0 = time.perf_counter()
        local_tokens = sum(mb.num_loss_tokens for mb in shards)
        extra: dict[str, float] = {}
        if with_grad_variance and step_i == 0 and ctx.is_main:
            whole = collate(
                mine,
                support=cfg.support,
                top_k=cfg.top_k,
                max_seq_len=cfg.max_seq_len,
                masked_ids=masked_ids,
                aliases=aliases,
                mask_positions=cfg.mask_special_positions,
                mask_support=cfg.mask_special_support,
            ).to(ctx.device)
            if cfg.recompute_old:  # replicate only (config): a forward on rank 0 alone is no collective
                whole.old_logprobs_B_T = module(whole, old_logprobs=True)[0]
            extra = lm_head_gradient_variance(module.model, whole, cfg, cfg.grad_variance_micro)
        optimizer.zero_grad(set_to_none=True)
        parts: list[tuple[dict[str, float], float]] = []
        for i in range(n_micro):
            mb = shards[min(i, len(shards) - 1)]
            loss, m = module(mb, denom_tokens=global_tokens, with_diagnostics=with_diagnostics)
            if i >= len(shards):
                loss = loss * 0.0  # a padding pass: runs the collectives, adds nothing
            else:
                parts.append((m, float(mb.num_loss_tokens)))
            loss.backward()
        _sync(ctx.device)
        t1 = time.perf_counter()
        if not sharded:
            dist.all_reduce_gradients(ctx, module)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
        _sync(ctx.device)
        t2 = time.perf_counter()
        t_loss, t_optim = t_loss + t1 - t0, t_optim + t2 - t1

        metrics = dist.reduce_metrics(ctx, weighted_mean(parts), float(local_tokens))
        metrics["grad/norm"] = grad_norm_value(grad_norm)
        metrics.update(extra)
        per_step.append(metrics)
    out = mean_metrics(per_step)
    out.update(
        {
            "time/collate": t_collate,
            "time/old_logprobs": t_old,
            "time/loss": t_loss,
            "time/optim": t_optim,
            "train/tokens": float(tokens),
            "train/micro_batches": float(micro_total),
            "train/sequences": float(len(seqs)),
            "response/length": sum(len(sq.sample) for sq in seqs) / len(seqs),
        }
    )
    if aliases is not None:
        out.update(aliases.batch_metrics([sq.sample for sq in seqs], cfg.top_k))
    return out


# ------------------------------------------------------------------------------------------------ loop


@dataclass
class RankZero:
    """What only rank 0 holds: Redis, a reader per task stream, the pusher, the metrics writer, eval."""

    streams: dict[str, task_streams.TaskStream]  # task ("" without tasks) -> its stream and reader
    sync: WeightSync | None  # None without rollout services to push to
    writer: MetricsWriter
    counters: task_streams.TaskCounters = field(default_factory=task_streams.TaskCounters)
    eval_client: RolloutClient | None = None
    eval_prompts: list[Prompt] = field(default_factory=list)
    val_prompts: list[Prompt] = field(default_factory=list)  # checkpoint selection (trainer/eval.py)
    verifier: Verifier | None = None
    task_evals: dict[str, tuple[list[Prompt], Verifier]] = field(default_factory=dict)  # prompt task -> eval


class StopFlag:
    """Set by SIGTERM/SIGINT: finish the current batch, checkpoint, exit."""

    def __init__(self) -> None:
        self.stop = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        log.warning("signal %d: stopping after this batch", signum)
        self.stop = True


def _commit_line(state: ckpt.TrainState, read: BatchRead, task: str = "") -> dict[str, Any]:
    return {
        "batch": state.batch,
        "task": task,  # whose stream the entry ids belong to
        "step": state.step,
        "policy_version": state.policy_version,
        "entries": [e.entry_id for e, _ in read.records],
        "records": [r.record_id for _, r in read.records],
        "stale_entries": [e.entry_id for e, _ in read.stale],
        "stale_records": [rid for _, rid in read.stale],
    }


def run(cfg: TrainerConfig, stop: StopFlag | None = None) -> ckpt.TrainState:
    """Train until max_batches, an idle timeout, or `stop` is set; returns the final state."""
    ctx = dist.init_distributed(cfg.device, always_group=cfg.parallelism == "fsdp")
    try:
        state = _run(cfg, ctx, stop or StopFlag())
    except BaseException:
        dist.shutdown(ctx, clean=False)
        raise
    dist.shutdown(ctx)
    return state


def _run(cfg: TrainerConfig, ctx: dist.DistContext, stop: StopFlag) -> ckpt.TrainState:
    seed_everything(cfg.seed)
    model, tokenizer = load_student(cfg, ctx.device)
    vocab_size = vocab_size_of(model)
    check_setup(cfg, vocab_size, ctx.world_size)
    teacher_tokenizer = load_tokenizer(cfg.teacher_tokenizer) if cfg.teacher_tokenizer else None
    masked_ids = masked_ids_of(cfg, tokenizer, teacher_tokenizer)
    aliases = TrainerAliases.from_config(cfg.token_aliases, tokenizer, teacher_tokenizer)
    dist.broadcast_parameters(ctx, model)  # every rank starts from rank 0's weights, then shards them
    module = wrap_model(model, cfg, ctx)
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )

    # Resume: every rank loads its part of the newest checkpoint (DCP reshards across world sizes); a fresh
    # start refuses a directory with history in it.
    if not cfg.resume and (
        ckpt.list_checkpoints(cfg.checkpoint_dir) or ckpt.read_commit_log(cfg.checkpoint_dir)
    ):
        raise ConfigError(
            f"checkpoint_dir {cfg.checkpoint_dir!r} holds a previous run: pass --resume or use a "
            "new directory"
        )
    loaded = ckpt.load_latest(cfg.checkpoint_dir, model, optimizer, rank=ctx.rank) if cfg.resume else None
    state = loaded.state if loaded else ckpt.TrainState()
    state.consumer = cfg.consumer
    if loaded:
        # The commit log is the record of stale drops (trailing ones are committed after the checkpoint).
        state.dropped_stale = sum(len(line["stale_entries"]) for line in loaded.commits)
    if loaded and loaded.path and ctx.is_main:
        log.info(
            "resumed from %s: batch %d, step %d, policy version %d",
            loaded.path,
            state.batch,
            state.step,
            state.policy_version,
        )
    checkpointer = ckpt.Checkpointer(
        cfg.checkpoint_dir,
        rank=ctx.rank,
        keep=cfg.keep_checkpoints,
        async_save=cfg.checkpoint_async,
        group=dist.checkpoint_group(),
        extra={"config": {**to_dict(cfg), "redis_url": redis_keys.redacted(cfg.redis_url)}},
        committed_batch=state.batch,
    )
    saved_batch = state.batch  # the newest checkpoint started (every rank tracks it)
    push_dtype = push_dtype_of(cfg)
    pushing = bool(cfg.push_every and cfg.rollout_urls)

    # The full weights in the serving dtype, gathered as they are read: a collective under FSDP (all ranks
    # read them together; only rank 0 gets tensors).
    weights = ModuleWeights(module, push_dtype, ctx.is_main)

    def join_gather() -> None:
        """Take part in rank 0's gather (FSDP): every all-gather is a collective."""
        for _ in weights.tensors():
            pass

    # Under FSDP the gather is a collective: gather once on every rank before rank 0 decides what to push.
    start_weights: Weights = weights
    if pushing and is_sharded(module):
        start_weights = StateDictWeights(dict(weights.tensors()))

    r0: RankZero | None = None

    def between_reads() -> bool:
        """Called by the reader while it waits for entries: commit a finished checkpoint and ack its
        entries now, not at the next batch (a quiet stream would otherwise hold them, and the workers
        blocked on max_backlog would never send the records that end the wait)."""
        if r0 is not None:
            task_streams.ack_lines(r0.streams, checkpointer.poll())
        return stop.stop

    if ctx.is_main:
        r0 = _setup_rank_zero(
            cfg,
            start_weights,
            tokenizer,
            state,
            loaded,
            vocab_size,
            between_reads,
            aliases,
        )
        if cfg.eval_every and state.batch == 0:
            # The "before" point of every curve and report: the student as it starts.
            r0.writer.write(0, 0, _eval(cfg, state, r0, tokenizer))
    start_weights = weights  # drop the gathered copy
    # Rank 0's reconcile may raise the version past a rollout's; every rank must agree on it.
    state.policy_version = int(dist.all_reduce_max(ctx, [float(state.policy_version)])[0])

    pending_commits: list[dict[str, Any]] = []
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        disable=not (cfg.progress and ctx.is_main),
    )
    bar = progress.add_task("", total=cfg.max_batches or None, completed=state.batch)
    trailing_stale: BatchRead | None = None
    trailing_task = ""
    task_held: str | None = None
    names = task_streams.task_names(cfg)
    # Which task each batch trains; every rank computes it, a resumed run continues it (trainer/tasks.py).
    schedule = TaskSchedule([t.weight for t in cfg.tasks] or [1.0], cfg.task_schedule, state.batch)
    with progress:
        while not (cfg.max_batches and state.batch >= cfg.max_batches):
            # --- read (rank 0) and broadcast the kept records' raw bytes
            t0 = time.perf_counter()
            if task_held is None:
                task = names[schedule.next()]
            task, task_held = task_held or task, None
            read: BatchRead | None = None
            blobs: list[bytes] | None = None
            behind: list[int] = []
            if r0 is not None:
                read = r0.streams[task].reader.next_batch(state.policy_version)
                while read.flush_stale and not stop.stop:
                    # the checkpoint in flight first (rank 0's wait needs no other rank's main thread)
                    task_streams.ack_lines(r0.streams, checkpointer.wait())
                    _commit_stale(cfg.checkpoint_dir, state, read, r0, task, checkpointer.committed_batch)
                    # A read that is all stale: a rollout may have restarted on older weights (no resume).
                    behind = r0.sync.behind(state.policy_version) if r0.sync is not None else []
                    if behind:
                        break
                    read = r0.streams[task].reader.next_batch(state.policy_version)
                if read.complete and not behind:
                    # Every read record was decoded from its entry's data, so none is None.
                    blobs = [e.data for e, _ in read.records if e.data is not None]
                    assert len(blobs) == len(read.records)
                elif not behind:
                    trailing_stale, trailing_task = read, task
            # every rank learns whether rank 0 must bring a rollout current first (a collective under FSDP)
            if dist.broadcast_flag(ctx, bool(behind)):
                if r0 is not None and r0.sync is not None:
                    log.warning(
                        "rollouts %s serve a version below %d (restarted without --resume-from?): "
                        "pushing the current weights again",
                        [r0.sync.urls[i] for i in behind],
                        state.policy_version,
                    )
                    r0.sync.push(weights, state.policy_version, only=behind)
                elif pushing and is_sharded(module):
                    join_gather()
                task_held = task  # this task's batch is still to be read
                continue
            blobs = dist.broadcast_blobs(ctx, blobs)
            if blobs is None:
                break
            records = [r for _, r in read.records] if read is not None else [decode(b) for b in blobs]
            lag = sum(state.policy_version - r.policy_version for r in records) / len(records)
            t_read = time.perf_counter() - t0

            # --- train
            diag = bool(cfg.diagnostics_every) and (state.batch + 1) % cfg.diagnostics_every == 0
            gvar = bool(cfg.grad_variance_every) and (state.batch + 1) % cfg.grad_variance_every == 0
            lr = lr_at(cfg, state.batch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            metrics = train_batch(
                module,
                optimizer,
                records,
                cfg,
                ctx,
                masked_ids,
                with_diagnostics=diag,
                with_grad_variance=gvar,
                aliases=aliases,
            )
            metrics["optim/lr"] = lr
            state.batch += 1
            state.step += cfg.steps_per_batch
            state.records_trained += len(records)
            state.sequences_trained += int(metrics["train/sequences"])
            state.tokens_trained += int(metrics["train/tokens"])
            push_due = bool(cfg.push_every) and state.batch % cfg.push_every == 0
            if push_due:
                state.policy_version += 1
            if r0 is not None:
                assert read is not None
                state.dropped_stale += len(read.stale)
                state.dead = sum(s.reader.dead_total for s in r0.streams.values())
                r0.counters.add(task, 1, len(read.stale))
                pending_commits.append(_commit_line(state, read, task))

            # --- commit (every rank writes its shard; rank 0 commits, then acks what became durable)
            tc = time.perf_counter()
            if state.batch % cfg.checkpoint_every == 0:
                committed = checkpointer.save(model, optimizer, state, pending_commits)
                pending_commits, saved_batch = [], state.batch
            else:
                committed = checkpointer.poll()
            t_ckpt = time.perf_counter() - tc
            # --- push: a full gather on every rank under FSDP, then rank 0 sends
            t_push = 0.0
            if push_due and r0 is not None and r0.sync is not None:
                t_push = r0.sync.push(weights, state.policy_version)
            elif push_due and pushing and is_sharded(module):
                join_gather()
            if r0 is None:
                continue
            task_streams.ack_lines(r0.streams, committed)
            metrics.update(_eval(cfg, state, r0, tokenizer))

            wall = time.perf_counter() - t0
            backlogs = {name: s.consumer.backlog() for name, s in r0.streams.items()}  # one XLEN each
            metrics.update(task_streams.reward_metrics(records))
            metrics.update(
                {
                    "time/read": t_read,
                    "time/push": t_push,
                    "time/checkpoint": t_ckpt,
                    "time/batch": wall,
                    "perf/tokens_per_s": metrics["train/tokens"] / wall,
                    "queue/backlog": float(sum(backlogs.values())),
                    "queue/dropped_stale": float(state.dropped_stale),
                    "queue/dead": float(state.dead),
                    "rollout/policy_lag": lag,
                    "train/policy_version": float(state.policy_version),
                }
            )
            metrics.update(task_streams.task_metrics(task, metrics, backlogs, r0.counters))
            r0.writer.write(state.batch, state.step, metrics)
            loss_key = next((k for k in metrics if k.startswith("loss/")), "")
            progress.update(
                bar, completed=state.batch, description=f"{loss_key} {metrics.get(loss_key, 0):.4f}"
            )
            log.info(
                "batch %d step %d v%d %s=%.5f tok/s=%.0f stale=%d",
                state.batch,
                state.step,
                state.policy_version,
                loss_key,
                metrics.get(loss_key, float("nan")),
                metrics["perf/tokens_per_s"],
                state.dropped_stale,
            )

    # --- finish: checkpoint what is left (every rank), commit it, then the trailing stale drops
    committed = checkpointer.wait()
    if state.batch > saved_batch:
        committed += checkpointer.save(model, optimizer, state, pending_commits)
        committed += checkpointer.wait()
    if r0 is not None:
        task_streams.ack_lines(r0.streams, committed)
        if trailing_stale is not None and trailing_stale.stale:  # after every checkpoint is committed
            _commit_stale(
                cfg.checkpoint_dir, state, trailing_stale, r0, trailing_task, checkpointer.committed_batch
            )
        r0.writer.close()
        if r0.sync:
            r0.sync.close()
        log.info(
            "stopped at batch %d, step %d, policy version %d", state.batch, state.step, state.policy_version
        )
    return state


def _setup_rank_zero(
    cfg: TrainerConfig,
    weights: Weights,
    tokenizer: Any,
    state: ckpt.TrainState,
    loaded: ckpt.Loaded | None,
    vocab_size: int,
    should_stop: Callable[[], bool],
    aliases: TrainerAliases | None = None,
) -> RankZero:
    client = redis_keys.connect(cfg.redis_url)

    def check(rec: ExperienceRecord) -> None:
        check_record(
            rec,
            support=cfg.support,
            top_k=cfg.top_k,
            vocab_size=vocab_size,
            max_seq_len=cfg.max_seq_len,
            full_vocab=cfg.objective == "full_kl",
            aliases=aliases,
        )

    # One stream per task; each recovers the entries this consumer read there before a restart.
    streams = task_streams.open_streams(client, cfg, check, loaded, should_stop)

    sync: WeightSync | None = None
    if cfg.push_every and cfg.push_mode == "collective":
        from trainer.weight_broadcast import CollectiveSync  # one broadcast to every rollout (issue #16)

        sync = CollectiveSync.from_config(client, cfg)
    elif cfg.push_every:
        sync = WeightSync(
            client,
            cfg.run,
            cfg.rollout_urls,
            mode=cfg.push_mode,
            shared_dir=cfg.shared_weights_dir,
            token=cfg.resolve_token(),
            timeout_s=cfg.push_timeout_s,
            tls_ca_file=cfg.rollout_tls_ca_file or None,
        )
    if sync is not None:
        state.policy_version = sync.reconcile(weights, state.policy_version)

    r0 = RankZero(
        streams=streams,
        sync=sync,
        writer=MetricsWriter(cfg.metrics_dir, tensorboard=cfg.tensorboard),
        counters=task_streams.TaskCounters.from_commits(loaded.commits if loaded else []),
    )
    if cfg.eval_every:
        r0.eval_client = RolloutClient(
            cfg.eval_url or cfg.rollout_urls[0],
            timeout_s=cfg.push_timeout_s,
            tls_ca_file=cfg.rollout_tls_ca_file or None,
        )
    if cfg.eval_every and cfg.tasks:
        r0.task_evals = task_streams.load_task_evals(cfg, tokenizer)
    elif cfg.eval_every:
        from trainer.eval import load_eval_prompts

        r0.eval_prompts = load_eval_prompts(cfg.eval_file, tokenizer, cfg.eval_max_prompts)
        if cfg.val_file:
            r0.val_prompts = load_eval_prompts(cfg.val_file, tokenizer, cfg.eval_max_prompts)
        r0.verifier = get_verifier(cfg.eval_verifier)
    return r0


def _commit_stale(
    ckpt_dir: str, state: ckpt.TrainState, read: BatchRead, r0: RankZero, task: str, committed_batch: int
) -> None:
    """Commit the stale drops of an incomplete read durably, then ack them.

    Stale drops change no weights, so their line needs durability, not a checkpoint: it carries the batch
    of the newest committed checkpoint (not the current batch, which may not be checkpointed yet), so a
    restart from that checkpoint keeps the line (trainer/checkpoint.py) and never re-reads the entries."""
    state.dropped_stale += len(read.stale)
    r0.counters.add(task, 0, len(read.stale))
    line = {**_commit_line(state, BatchRead(stale=read.stale), task), "batch": committed_batch}
    ckpt.append_commits(ckpt_dir, [line])
    task_streams.ack_lines(r0.streams, [line])


def _eval(cfg: TrainerConfig, state: ckpt.TrainState, r0: RankZero, tokenizer: Any) -> dict[str, float]:
    if not cfg.eval_every or state.batch % cfg.eval_every:
        return {}
    if cfg.tasks:
        return task_streams.eval_tasks(cfg, r0.eval_client, r0.task_evals, tokenizer)
    from trainer.eval import EvalSettings, evaluate_splits

    settings = EvalSettings(
        n=cfg.eval_n,
        greedy=cfg.eval_greedy,
        temperature=cfg.eval_temperature,
        top_p=cfg.eval_top_p,
        max_new_tokens=cfg.eval_max_new_tokens,
        chat_template=cfg.eval_chat_template,
        seed=cfg.seed,
    )
    assert r0.eval_client is not None and r0.verifier is not None  # set up with eval_every (_setup_eval)
    return evaluate_splits(r0.eval_client, tokenizer, r0.eval_prompts, r0.val_prompts, r0.verifier, settings)


@report_config_errors("opd train")
def main(argv: list[str] | None = None) -> int:
    cfg = load_config(argv)
    setup_logging("trainer")
    stop = StopFlag()
    stop.install()
    run(cfg, stop)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
