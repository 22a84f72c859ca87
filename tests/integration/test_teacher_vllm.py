"""The vllm backend (prompt_logprobs) served by `opd teacher serve --backend vllm` agrees with the hf backend.

The vLLM engine spawns worker processes, so the server runs as a subprocess (its main module is guarded);
one engine serves every test of this module. Its steps hold 64 tokens (`--vllm-max-num-batched-tokens`),
so every longer sequence is prefilled in chunks and its prompt log-probabilities come from several steps:
matching hf, which scores it whole, is the chunked == whole check. Its prefix cache serves shared prompts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opd_teacher_client import TeacherClient

from experiments.tiny_models import make_tiny_llama
from services.common.hf_models import load_causal_lm
from services.common.redis_server import free_port
from services.teacher.scorer import HFScorer, ScoreItem

pytestmark = [pytest.mark.integration, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("teacher") / "llama", seed=11)  # head_dim 32
    model = load_causal_lm(path)
    with torch.no_grad():  # spread the logits so the top-K order is not a near-tie everywhere
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    return path


STEP_TOKENS = 64


@dataclass
class VLLMServer:
    address: str
    metrics_url: str

    def prompt_counters(self) -> tuple[float, float]:
        """(opd_teacher_prompt_tokens_requested_total, opd_teacher_prompt_tokens_computed_total)"""
        text = httpx.get(self.metrics_url, timeout=5).text
        values = dict(line.split() for line in text.splitlines() if line.startswith("opd_teacher_prompt_"))
        return (
            float(values["opd_teacher_prompt_tokens_requested_total"]),
            float(values["opd_teacher_prompt_tokens_computed_total"]),
        )


@pytest.fixture(scope="module")
def vllm_server(model_dir, tmp_path_factory):
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'proto'}")
    log_path = tmp_path_factory.mktemp("logs") / "teacher-vllm.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "teacher",
            "serve",
            "--backend",
            "vllm",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-sequence-tokens",
            "256",
            "--max-batch-tokens",
            "1024",
            "--max-top-k",
            "16",
            "--vllm-gpu-memory-utilization",
            "0.05",
            "--vllm-enforce-eager",
            "--vllm-max-num-batched-tokens",
            str(STEP_TOKENS),
            "--metrics-port",
            str(metrics_port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        channel = grpc.insecure_channel(address)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 480
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"vllm teacher exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}"
                )
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm teacher not SERVING:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        channel.close()
        yield VLLMServer(address, f"http://127.0.0.1:{metrics_port}/metrics")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the engine's worker processes too
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def hf(model_dir):
    return HFScorer(str(model_dir), device="cpu", dtype="float32")


def test_vllm_matches_hf(vllm_server, hf):
    rng = np.random.default_rng(0)
    V = hf.info.vocab_size
    lengths, starts = [40, 7, 120, 2, 65, 256], [12, 1, 100, 1, 30, 3]  # 120, 65, 256: over 64, chunked
    seqs = [rng.integers(0, V, n).astype(np.int32) for n in lengths]
    with TeacherClient(vllm_server.address) as c:
        info = c.info()
        assert info.backend == "vllm" and not info.supports_candidates and not info.supports_temperature
        assert info.vocab_size == V and info.tokenizer_sha256 == hf.info.tokenizer_sha256
        got = c.score([s.tolist() for s in seqs], starts, top_k=16)
    want = hf.score(
        [ScoreItem(s, f, top_k=V) for s, f in zip(seqs, starts, strict=True)]
    )  # full distribution
    mismatched_ids = 0
    for g, w, n, s in zip(got, want, lengths, starts, strict=True):
        assert g.topk_ids.shape == (n - s, 16)
        # the hf log-probability of every id vLLM returned, from hf's full sorted distribution
        full_R_V = np.full((n - s, V), np.nan, dtype=np.float32)
        np.put_along_axis(full_R_V, w.topk_ids.astype(np.int64), w.topk_logprobs, axis=1)
        np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs[:, :16], atol=ATOL)  # values by rank
        np.testing.assert_allclose(
            np.take_along_axis(full_R_V, g.topk_ids.astype(np.int64), 1), g.topk_logprobs, atol=ATOL
        )  # each id's own value: ids may only differ within near-ties
        np.testing.assert_allclose(g.target_logprobs, w.target_logprobs, atol=ATOL)
        mismatched_ids += int((g.topk_ids != w.topk_ids[:, :16]).sum())
    assert mismatched_ids <= 0.01 * sum(n - s for n, s in zip(lengths, starts, strict=True)) * 16


def test_vllm_concurrent_clients_and_unimplemented(vllm_server, hf):
    rng = np.random.default_rng(1)
    V = hf.info.vocab_size
    jobs = [
        [rng.integers(0, V, int(rng.integers(3, 50))).astype(np.int32) for _ in range(3)] for _ in range(6)
    ]

    def run(job):
        with TeacherClient(vllm_server.address) as c:
            return c.score([s.tolist() for s in job], [1] * len(job), top_k=4)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(run, jobs))
    for job, answer in zip(jobs, answers, strict=True):
        for g, w in zip(answer, hf.score([ScoreItem(s, 1, top_k=4) for s in job]), strict=True):
            np.testing.assert_allclose(g.target_logprobs, w.target_logprobs, atol=ATOL)
            np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, atol=ATOL)

    with TeacherClient(vllm_server.address, max_retries=0) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.score([[1, 2, 3]], [1], top_k=2, candidates=[np.array([4, 5])])
        assert (
            err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            and "sequence 0: candidates" in err.value.details()
        )
        with pytest.raises(grpc.RpcError) as err:
            c.score([[1, 2, 3]], [1], top_k=2, temperature=0.7)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "temperature" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            c.score([[1, 2, 3]], [1], top_k=17)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k=17" in err.value.details()
        assert c.score([[1, 2, 3]], [2], top_k=2)[0].topk_ids.shape == (1, 2)  # still up


def compare(got, seqs, starts, hf, k):
    want = hf.score(
        [ScoreItem(np.asarray(s, np.int32), f, top_k=k) for s, f in zip(seqs, starts, strict=True)]
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.target_logprobs, w.target_logprobs, atol=ATOL)
        np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, atol=ATOL)


def test_vllm_group_reads_its_shared_prompt_from_the_prefix_cache(vllm_server, hf):
    # vLLM's CPU blocks hold 128 tokens: a 160-token prompt is one cached block plus 32 tokens. The first
    # sample computes it; the other three read the block and compute 32 prompt tokens each.
    rng = np.random.default_rng(2)
    V = hf.info.vocab_size
    G, P = 4, 160
    prompt = rng.integers(0, V, P).tolist()
    seqs = [prompt + rng.integers(0, V, int(n)).tolist() for n in (60, 20, 90, 41)]
    requested0, computed0 = vllm_server.prompt_counters()
    with TeacherClient(vllm_server.address) as c:
        got = c.score(seqs, [P] * G, top_k=8)
    requested1, computed1 = vllm_server.prompt_counters()
    compare(got, seqs, [P] * G, hf, 8)
    assert requested1 - requested0 == G * P
    assert computed1 - computed0 == P + (G - 1) * (P - 128)


def test_vllm_cache_hit_past_score_from_is_scored_again(vllm_server, hf):
    # The same sequence twice: the second one's cache hit (its first 128 tokens) covers rows we return,
    # which vLLM leaves uncomputed; the scorer notices (num_cached_tokens >= score_from) and scores it again
    # without reading the cache. Then a hit that stops below score_from is read.
    rng = np.random.default_rng(3)
    V = hf.info.vocab_size
    seq = rng.integers(0, V, 200).tolist()
    with TeacherClient(vllm_server.address) as c:
        first = c.score([seq], [50], top_k=8)
        requested0, computed0 = vllm_server.prompt_counters()
        again = c.score([seq], [50], top_k=8)
        requested1, computed1 = vllm_server.prompt_counters()
        later = c.score([seq], [150], top_k=8)
        requested2, computed2 = vllm_server.prompt_counters()
    compare(first + again, [seq, seq], [50, 50], hf, 8)
    compare(later, [seq], [150], hf, 8)
    assert (requested1 - requested0, computed1 - computed0) == (50, 50)  # recomputed without the cache
    assert (requested2 - requested1, computed2 - computed1) == (150, 150 - 128)  # read: the hit < 150
