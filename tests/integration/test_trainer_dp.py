"""Data parallel: `torchrun --nproc-per-node 2 opd train` (gloo, CPU) against a real redis-server gives the
same batches and the same parameters as a single process on the same stream, in both layouts (replicate,
FSDP2 with token-budget micro-batches and background sharded checkpoints), and the 2-rank checkpoint
resumes into 1 rank and finishes where the single process does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.diagnostics import load_full_state
from experiments.synthetic import synthetic_records, write_records
from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common import redis_keys
from services.common.config import WEIGHTS_TOKEN_ENV
from services.common.hf_models import load_causal_lm
from services.common.policy_files import DCP_DIR, read_dcp_model
from services.common.redis_server import EmbeddedRedis, free_port
from services.rollout.app import build_app
from services.rollout.client import RolloutClient
from services.rollout.config import RolloutConfig
from services.rollout.engine import state_sha256
from services.rollout.server import running_server
from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.metrics import read_metrics
from trainer.train import run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOK = build_char_tokenizer()
TOKEN = "dp-token"


def _sha_of_checkpoint(student_dir: Path, ckpt_dir: str, batch: int) -> str:
    model = load_causal_lm(student_dir)
    load_full_state(model, read_dcp_model(ckpt.checkpoint_path(Path(ckpt_dir), batch) / DCP_DIR))
    sd = model.state_dict()
    return state_sha256(sd, sd.keys())


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param({"parallelism": "replicate"}, id="replicate"),
        # 48-token micro-batches: the ranks get different micro-batch counts (padding passes under FSDP2)
        pytest.param(
            {"parallelism": "fsdp", "max_tokens_per_micro_batch": 48, "checkpoint_async": True}, id="fsdp"
        ),
    ],
)
def test_two_process_data_parallel_equals_single_process(tmp_path, layout, monkeypatch):
    student_dir = make_tiny_llama(tmp_path / "student", seed=0, tokenizer=TOK)
    teacher_dir = make_tiny_llama(tmp_path / "teacher", seed=1, tokenizer=TOK)
    student = load_causal_lm(student_dir)
    teacher = load_causal_lm(teacher_dir)
    # uneven completion lengths: the two shards of a mini-batch hold different token counts
    records = synthetic_records(
        student,
        teacher,
        n_records=12,
        group_size=2,
        top_k=4,
        behaviour_top_k=4,
        special_ids=sorted(set(TOK.all_special_ids)),
        eos_id=TOK.eos_token_id,
        completion_len=(3, 30),
        seed=4,
    )
    monkeypatch.setenv(WEIGHTS_TOKEN_ENV, TOKEN)
    rollout_cfg = RolloutConfig(model=str(student_dir), backend="hf", device="cpu", port=0, token=TOKEN)
    with EmbeddedRedis() as server, running_server(build_app(rollout_cfg)) as rollout_url:
        rollout = RolloutClient(rollout_url)
        rollout.wait_ready(120)
        client = redis_keys.connect(server.url)
        common = dict(
            model=str(student_dir),
            device="cpu",
            redis_url=server.url,
            batch_size=8,
            mini_batch_size=4,
            top_k=4,
            lr=1e-3,
            read_block_ms=100,
            idle_timeout_s=1.5,
            tensorboard=False,
            progress=False,
            push_every=1,
            max_policy_lag=10,
            diagnostics_every=1,
        )

        write_records(client, "single", records)
        single = TrainerConfig(**common, run="single", checkpoint_dir=str(tmp_path / "single"))
        state = run(single)
        assert (state.batch, state.step) == (3, 6)

        write_records(client, "dp", records)
        args = {**common, **layout, "run": "dp", "checkpoint_dir": str(tmp_path / "dp"), "max_batches": 2}
        # the 2-rank run pushes to a real rollout service: under FSDP2 every rank takes part in the gather
        args["rollout_urls"] = rollout_url  # a list flag/env value: comma-separated
        # the config travels in OPD_TRAINER_* variables: torchrun's own parser would take flags like --run
        env = dict(
            os.environ,
            PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'proto'}",
            OMP_NUM_THREADS="1",
            GLOO_SOCKET_IFNAME="lo",
        )
        env.update(
            {
                f"OPD_TRAINER_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in args.items()
            }
        )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "launcher.cli",
            "train",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        pushed_2 = rollout.weights()
        two_rank_lines = ckpt.read_commit_log(args["checkpoint_dir"])
        two_rank_metrics = read_metrics(Path(args["checkpoint_dir"]) / "logs")

        # the third batch on one rank, resumed from the 2-rank checkpoint (DCP reshards its shards)
        state = run(
            TrainerConfig(**{**args, "rollout_urls": [rollout_url], "max_batches": 3, "resume": True})
        )
        assert (state.batch, state.step, state.policy_version) == (3, 6, 3)
        pushed_3 = rollout.weights()

    # what the rollout serves is what the trainer checkpointed, at each version
    assert pushed_2.version == 2 and pushed_2.sha256 == _sha_of_checkpoint(
        student_dir, args["checkpoint_dir"], 2
    )
    assert pushed_3.version == 3 and pushed_3.sha256 == _sha_of_checkpoint(
        student_dir, args["checkpoint_dir"], 3
    )

    assert [(ln["batch"], ln["step"], ln["policy_version"]) for ln in two_rank_lines] == [
        (1, 2, 1),
        (2, 4, 2),
    ]
    lines_1 = ckpt.read_commit_log(single.checkpoint_dir)
    lines_2 = ckpt.read_commit_log(args["checkpoint_dir"])
    assert [ln["records"] for ln in lines_1] == [ln["records"] for ln in lines_2]
    assert [ln["batch"] for ln in lines_2] == [1, 2, 3]

    m1 = load_causal_lm(student_dir)
    m2 = load_causal_lm(student_dir)
    ckpt.load_latest(single.checkpoint_dir, m1, restore_rng=False)
    ckpt.load_latest(args["checkpoint_dir"], m2, restore_rng=False)
    assert not torch.equal(m1.lm_head.weight, student.lm_head.weight)  # training moved the weights
    # Adam divides by sqrt(v): for near-zero gradient entries summation-order noise moves an entry by a
    # small fraction of lr, so compare entries at 1% of lr and the whole update at 1e-4 relative.
    start = student.state_dict()
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        update = (a - start[name]).norm()
        assert update > 0 and (a - b).norm() / update < 1e-4, name

    # metrics reduced over ranks are the single process's (token-weighted means over the whole mini-batch)
    met_1, met_2 = read_metrics(single.metrics_dir)[:2], two_rank_metrics
    for key in ("loss/lsm", "grad/norm", "student/entropy", "support/student_mass", "train/tokens"):
        assert [m[key] for m in met_2] == pytest.approx([m[key] for m in met_1], rel=1e-4), key
