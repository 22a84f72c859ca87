"""Supervised training of the toy models from scratch: teacher-forced next-token loss on the completion.

Every step draws a fresh batch from an endless problem stream (the eval prompts excluded), so the model sees
no problem twice and the training-batch accuracy is an honest estimate of held-out accuracy. That estimate,
the share of sequences whose every completion token is the argmax under teacher forcing (exactly the
sequences greedy decoding reproduces), lets a run stop once it reaches a target: this is how the student is
trained to partial competence without guessing a step count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from experiments.tiny_models import save_model, tiny_llama_config
from experiments.toy.task import Problem
from trainer.lr_schedule import warmup_cosine

IGNORE = -100


@dataclass
class TrainResult:
    steps: int
    loss: float  # EMA of the per-token loss
    seq_acc: float  # EMA of the teacher-forced sequence exact-match rate on fresh batches
    seconds: float
    reached_target: bool
    history: list[tuple[int, float, float]]  # (step, loss EMA, seq-acc EMA) every `log_every` steps

    def meta(self) -> dict[str, Any]:
        """The run's fields of a model's entry in meta.json."""
        return {
            "train_steps": self.steps,
            "reached_target": self.reached_target,
            "train_seconds": round(self.seconds, 2),
            "train_loss_ema": self.loss,
            "train_seq_acc_ema": self.seq_acc,
            "train_history": self.history,
        }


def new_model(
    cfg: Any, tokenizer: PreTrainedTokenizerFast, seed: int, max_positions: int
) -> LlamaForCausalLM:
    """A tiny Llama of `cfg`'s shape (hidden_size, num_layers, num_heads, intermediate_size) for `tokenizer`,
    initialised from torch seed `seed`, on `cfg.device`."""
    config = tiny_llama_config(
        len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_positions=max_positions,
        tokenizer=tokenizer,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(cfg.device)


def save_and_describe(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path
) -> dict[str, Any]:
    """Save the model (moved to the CPU) and tokenizer in Hugging Face format; returns the fields that
    describe it in meta.json."""
    save_model(model.to("cpu"), tokenizer, out_dir)
    return {
        "path": str(out_dir),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def encode_batch(
    problems: Sequence[Problem], tokenizer: PreTrainedTokenizerFast
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids_B_T, labels_B_T): prompt + completion + eos, right-padded; labels are the input ids on
    completion tokens (eos included) and IGNORE on prompt and padding, unshifted (label t is token t)."""
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    completions = tokenizer([p.completion for p in problems], add_special_tokens=False)["input_ids"]
    rows = [(p, c + [tokenizer.eos_token_id]) for p, c in zip(prompts, completions, strict=True)]
    T = max(len(p) + len(c) for p, c in rows)
    input_ids_B_T = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    labels_B_T = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        input_ids_B_T[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels_B_T[i, len(p) : len(p) + len(c)] = torch.tensor(c)
    return input_ids_B_T, labels_B_T


def completion_loss(
    logits_B_T_V: torch.Tensor, labels_B_T: torch.Tensor, free_ids: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy over labelled tokens, per-sequence exact-match bool (B,)).

    Logit t predicts token t+1, so logits are shifted against the (unshifted) labels. Labels in `free_ids`
    (the toy's unpredictable fillers) are in the loss but need not be the argmax for an exact match.
    """
    logits_B_S_V = logits_B_T_V[:, :-1].float()
    target_B_S = labels_B_T[:, 1:]
    mask_B_S = target_B_S != IGNORE
    if not mask_B_S.any():
        raise ValueError("batch has no completion tokens to train on")
    loss = F.cross_entropy(logits_B_S_V.transpose(1, 2), target_B_S, ignore_index=IGNORE, reduction="sum")
    loss = loss / mask_B_S.sum()
    free_B_S = torch.isin(
        target_B_S, torch.tensor(list(free_ids), dtype=target_B_S.dtype, device=target_B_S.device)
    )
    hit_B_S = (logits_B_S_V.argmax(-1) == target_B_S) | ~mask_B_S | free_B_S
    return loss, hit_B_S.all(dim=1)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on embeddings, norms or biases)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: Iterator[Any],
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.01,
    warmup_steps: int = 50,
    min_lr_ratio: float = 0.1,
    target_seq_acc: float | None = None,
    ema: float = 0.9,
    log_every: int = 25,
    desc: str = "train",
    encode: Callable[
        [Sequence[Any], PreTrainedTokenizerFast], tuple[torch.Tensor, torch.Tensor]
    ] = encode_batch,
    free_ids: Sequence[int] = (),
) -> TrainResult:
    """AdamW on the completion loss for up to `steps` steps (cosine schedule planned for `steps`).

    Stops early once the EMA of the batch sequence accuracy reaches `target_seq_acc`. The model stays on its device; batches are moved there.
    `encode(examples, tokenizer) -> (input_ids_B_T, labels_B_T)` turns a batch of the stream's items into
    tensors (default: `Problem`s, `encode_batch`). `free_ids` do not count in the sequence accuracy
    (`completion_loss`).
    """
    device = next(model.parameters()).device
    opt = make_optimizer(model, lr, weight_decay)
    model.train()
    loss_ema = acc_ema = None
    reached = False
    history: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  seq-acc {task.fields[acc]:.3f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task(desc, total=steps, loss=float("nan"), acc=0.0)
        step = 0
        for step in range(1, steps + 1):
            for group in opt.param_groups:
                group["lr"] = lr * warmup_cosine(step - 1, steps, warmup_steps, min_lr_ratio)
            input_ids_B_T, labels_B_T = encode([next(problems) for _ in range(batch_size)], tokenizer)
            # Right padding under a causal mask never reaches a real token: no attention mask needed.
            logits_B_T_V = model(input_ids=input_ids_B_T.to(device)).logits
            loss, exact_B = completion_loss(logits_B_T_V, labels_B_T.to(device), free_ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_v, acc_v = loss.item(), exact_B.float().mean().item()
            loss_ema = loss_v if loss_ema is None else ema * loss_ema + (1 - ema) * loss_v
            acc_ema = acc_v if acc_ema is None else ema * acc_ema + (1 - ema) * acc_v
            progress.update(bar, advance=1, loss=loss_ema, acc=acc_ema)
            if step % log_every == 0:
                history.append((step, round(loss_ema, 5), round(acc_ema, 4)))
            if target_seq_acc is not None and acc_ema >= target_seq_acc:
                reached = True
                break
    model.eval()
    return TrainResult(step, float(loss_ema), float(acc_ema), time.perf_counter() - t0, reached, history)
