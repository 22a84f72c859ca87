"""The collective weight path into a vLLM replica (a real `opd rollout serve --backend vllm` subprocess) and
an hf replica in one gloo group: the vLLM worker joins through `collective_rpc`, receives straight into its
own tensors, hashes them and reloads from them (vllm_ext.py); greedy outputs then follow the new weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama, save_model
from services.common import redis_keys
from services.common.hf_models import load_causal_lm
from services.common.redis_server import EmbeddedRedis
from services.rollout.app import build_app
from services.rollout.client import RolloutClient, RolloutError
from services.rollout.config import RolloutConfig
from services.rollout.engine import state_sha256
from services.rollout.protocol import GenerateRequest
from services.rollout.server import running_server
from trainer.weight_broadcast import CollectiveSync
from trainer.weight_sync import StateDictWeights

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
TOKEN = "vllm-collective-token"
GREEDY = GenerateRequest(
    prompts=[[5, 6, 7, 8, 9], [10, 11]], n=1, max_new_tokens=8, top_p=1e-6, stop_token_ids=[]
)


def _peaked(path, seed: int, tok):
    make_tiny_llama(path, seed=seed, tokenizer=tok)
    model = load_causal_lm(path).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    save_model(model, tok, path)
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_and_hf_replicas_take_one_broadcast(tmp_path):
    tok = build_char_tokenizer()
    _peaked(tmp_path / "a", 0, tok)
    b = _peaked(tmp_path / "b", 1, tok)
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OPD_WEIGHTS_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "launcher.cli", "rollout", "serve", "--backend", "vllm", "--model",
           str(tmp_path / "a"), "--port", str(port), "--dtype", "float32", "--vllm-gpu-memory-utilization",
           "0.1", "--vllm-enforce-eager", "--max-model-len", "256"]  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    vllm = RolloutClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout_s=120)
    hf_cfg = RolloutConfig(model=str(tmp_path / "a"), backend="hf", device="cpu", port=0, token=TOKEN)
    try:
        vllm.wait_ready(600)
        with running_server(build_app(hf_cfg)) as hf_url, EmbeddedRedis() as redis_server:
            hf = RolloutClient(hf_url, token=TOKEN)
            hf.wait_ready(120)
            sync = CollectiveSync(
                redis_keys.connect(redis_server.url),
                "vllm-coll",
                [vllm._http.base_url.__str__(), hf_url],
                token=TOKEN,
                addr="127.0.0.1",
                collective_timeout_s=60.0,
                bucket_bytes=1 << 16,
            )
            try:
                sd = {k: v.detach().clone() for k, v in b.state_dict().items()}
                sync.push(StateDictWeights(sd), 1)
                expected = state_sha256(sd, sd.keys())
                assert [c.weights().sha256 for c in (vllm, hf)] == [expected, expected]
                assert [c.weights().version for c in (vllm, hf)] == [1, 1]
                hf_out = [s.token_ids for s in hf.generate(GREEDY).samples]
                assert [s.token_ids for s in vllm.generate(GREEDY).samples] == hf_out
                with pytest.raises(RolloutError) as err:  # refused by both: nothing moves
                    sync.push(StateDictWeights({**sd, "model.norm.weight": torch.zeros(3)}), 2)
                assert err.value.status_code == 422 and vllm.weights().version == 1
                sync.push(StateDictWeights(sd), 2)  # the group survived the refusal
                assert [c.weights().version for c in (vllm, hf)] == [2, 2]
            finally:
                sync.close()
                hf.close()
    except Exception:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        vllm.close()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
