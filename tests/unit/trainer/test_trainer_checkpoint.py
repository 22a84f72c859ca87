"""trainer.checkpoint: exact round trip of model/optimizer/state/RNG, and the commit log's crash repair."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from trainer import checkpoint as ckpt


class Tied(nn.Module):
    """Two names for one weight, as in a tied LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def _trained(seed: int):
    torch.manual_seed(seed)
    m = Tied()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        m(torch.arange(11)).logsumexp(-1).sum().backward()
        opt.step()
    return m, opt


def _line(batch, entries, stale=()):
    return {
        "batch": batch,
        "step": 2 * batch,
        "policy_version": batch,
        "entries": list(entries),
        "records": [f"r{e}" for e in entries],
        "stale_entries": list(stale),
        "stale_records": [],
    }


def test_round_trip_is_exact(tmp_path):
    m, opt = _trained(0)
    state = ckpt.TrainState(
        batch=3, step=6, policy_version=3, records_trained=9, dropped_stale=2, consumer="t0"
    )
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = ckpt.save_checkpoint(tmp_path, m, opt, state, [_line(3, ["1-0", "2-0"], stale=["3-0"])])
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert path.name == "ckpt-00000003" and not list(tmp_path.glob(".tmp-*"))

    m2, opt2 = _trained(1)  # different weights and optimizer moments
    assert not torch.equal(m2.mid.weight, m.mid.weight)
    loaded = ckpt.load_latest(tmp_path, m2, opt2)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert loaded.state == state and loaded.path == path
    assert loaded.committed_entries == {"1-0", "2-0", "3-0"}
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert m2.head.weight is m2.emb.weight  # the tie survives
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])


def test_orphan_commit_lines_and_temp_dirs_are_discarded(tmp_path):
    m, opt = _trained(0)
    ckpt.save_checkpoint(tmp_path, m, opt, ckpt.TrainState(batch=1), [_line(1, ["1-0"])])
    # a crash after the commit line of batch 2 was written but before its directory was renamed
    ckpt.append_commits(tmp_path, [_line(2, ["2-0"])])
    (tmp_path / ".tmp-crashed").mkdir()
    (tmp_path / ".tmp-crashed" / "model.safetensors").write_bytes(b"partial")
    loaded = ckpt.load_latest(tmp_path, m, opt)
    assert loaded.state.batch == 1
    assert [c["batch"] for c in loaded.commits] == [1] and loaded.committed_entries == {"1-0"}
    assert [json.loads(x)["batch"] for x in (tmp_path / "commits.jsonl").read_text().splitlines()] == [1]
    assert not (tmp_path / ".tmp-crashed").exists()


def test_torn_last_line_is_dropped(tmp_path):
    m, opt = _trained(0)
    ckpt.save_checkpoint(tmp_path, m, opt, ckpt.TrainState(batch=1), [_line(1, ["1-0"])])
    with open(tmp_path / "commits.jsonl", "a") as fh:
        fh.write('{"batch": 2, "entr')
    assert [c["batch"] for c in ckpt.read_commit_log(tmp_path)] == [1]
    ckpt.load_latest(tmp_path, m, opt)
    assert (tmp_path / "commits.jsonl").read_text().endswith("}\n")


def test_stale_only_lines_without_a_checkpoint_count(tmp_path):
    ckpt.append_commits(tmp_path, [_line(0, [], stale=["9-0"])])
    loaded = ckpt.load_latest(tmp_path)
    assert loaded.path is None and loaded.state.batch == 0 and loaded.committed_entries == {"9-0"}


def test_keeps_the_newest_and_refuses_to_overwrite(tmp_path):
    m, opt = _trained(0)
    for b in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, m, opt, ckpt.TrainState(batch=b), [_line(b, [f"{b}-0"])], keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000002", "ckpt-00000003"]
    assert [c["batch"] for c in ckpt.read_commit_log(tmp_path)] == [1, 2, 3]
    with pytest.raises(FileExistsError):
        ckpt.save_checkpoint(tmp_path, m, opt, ckpt.TrainState(batch=3), [])


def test_async_save_commits_only_when_written_and_snapshots_the_state(tmp_path):
    """A background checkpoint: its lines reach the log (and the caller, to ack) only once it is renamed,
    and it holds the weights of the moment it started even though training mutates them meanwhile."""
    m, opt = _trained(0)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    saver = ckpt.Checkpointer(tmp_path, async_save=True)
    assert saver.save(m, opt, ckpt.TrainState(batch=1), [_line(1, ["1-0"])]) == []  # nothing committed yet
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # the next step, while the write runs
    committed = saver.wait()
    assert [c["batch"] for c in committed] == [1] and saver.committed_batch == 1
    assert [c["batch"] for c in ckpt.read_commit_log(tmp_path)] == [1]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000001"]
    m2, opt2 = _trained(1)
    ckpt.load_latest(tmp_path, m2, opt2)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, want[k]), k
    # a second save waits for nothing (the first is done) and poll finishes it once written
    saver.save(m, opt, ckpt.TrainState(batch=2), [_line(2, ["2-0"])])
    while saver.busy:
        committed = saver.poll()
    assert [c["batch"] for c in committed] == [2]
    assert [c["batch"] for c in ckpt.read_commit_log(tmp_path)] == [1, 2]
