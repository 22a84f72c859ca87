"""Prompt files for rollout workers: JSONL or Parquet rows, sharded by worker, cycled for epochs.

Each row has either `prompt` (a string, sent to the rollout service as text and tokenised there) or
`messages` (a chat: a list of {"role", "content"}; rendered with the tokenizer's chat template plus the
generation prompt and tokenised here, so it needs a tokenizer). An optional `answer` is kept for verifiers.
Other columns are ignored.

Row r of the file belongs to worker `r % num_workers`: the shards of all workers are disjoint and together
cover the file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


class PromptFileError(ValueError):
    """A prompt file or one of its rows is invalid; the message names the file, the row and the reason."""


@dataclass(frozen=True)
class Prompt:
    row: int  # 0-based row in the file
    text: str  # the `prompt` string, or the chat-template rendering of `messages`
    answer: str = ""
    token_ids: tuple[int, ...] | None = None  # set for `messages` rows (tokenised locally)
    epoch: int = 0  # which pass over the file produced this prompt


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{path}:{lineno}: not JSON: {e}") from e
                if not isinstance(row, dict):
                    raise PromptFileError(
                        f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                    )
                rows.append(row)
        return rows
    raise PromptFileError(f"{path}: unknown prompt file type {path.suffix!r} (use .jsonl or .parquet)")


def _to_prompt(row: dict[str, Any], index: int, where: str, tokenizer: Any | None) -> Prompt:
    answer = row.get("answer")
    answer = "" if answer is None else str(answer)
    text, messages = row.get("prompt"), row.get("messages")
    if text is not None and messages is not None:
        raise PromptFileError(f"{where}: give `prompt` or `messages`, not both")
    if text is not None:
        if not isinstance(text, str) or not text:
            raise PromptFileError(f"{where}: `prompt` must be a non-empty string, got {text!r}")
        return Prompt(row=index, text=text, answer=answer)
    if messages is None:
        raise PromptFileError(f"{where}: row has neither `prompt` nor `messages` (keys: {sorted(row)})")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise PromptFileError(f"{where}: `messages` must be a non-empty list of {{role, content}} strings")
    if tokenizer is None:
        raise PromptFileError(
            f"{where}: `messages` needs a tokenizer for the chat template (set `tokenizer`)"
        )
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already spells any BOS/special markers, so the tokenizer must not add its own.
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PromptFileError(f"{where}: chat template rendered to no tokens")
    return Prompt(row=index, text=rendered, answer=answer, token_ids=tuple(int(i) for i in ids))


def load_prompts(
    path: str | Path, worker_index: int = 0, num_workers: int = 1, tokenizer: Any | None = None
) -> list[Prompt]:
    """This worker's shard of the file, in file order (rows r with r % num_workers == worker_index)."""
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} outside [0, num_workers={num_workers})")
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: no such prompt file")
    rows = _read_rows(path)
    if not rows:
        raise PromptFileError(f"{path}: no prompts")
    return [
        _to_prompt(row, r, f"{path} row {r}", tokenizer)
        for r, row in enumerate(rows)
        if r % num_workers == worker_index
    ]


def cycle_prompts(
    prompts: list[Prompt], epochs: int = 0, shuffle_seed: str | None = None
) -> Iterator[Prompt]:
    """Yield the shard `epochs` times (0 = forever), each prompt tagged with its epoch.

    With `shuffle_seed`, every epoch visits the shard in its own order, a permutation drawn from
    (`shuffle_seed`, epoch): the same seed gives the same order, another seed another order.
    """
    if not prompts:
        return
    epoch = 0
    while epochs == 0 or epoch < epochs:
        order = list(prompts)
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}:{epoch}").shuffle(order)
        for p in order:
            yield replace(p, epoch=epoch)
        epoch += 1
