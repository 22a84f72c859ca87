"""Tokens end to end on the real server processes (`opd teacher serve`, `opd rollout serve`): read from a
secret file or the environment, unauthorised calls refused (UNAUTHENTICATED / 401), authorised calls
served, and the token string absent from everything the processes wrote (DEBUG logs included)."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
from opd_teacher_client import TeacherClient, build_sequence
from opd_teacher_client.v1 import teacher_pb2, teacher_pb2_grpc

from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common.redis_server import free_port
from services.rollout.client import RolloutClient, RolloutError
from tests.integration.fault_procs import Proc, wait_until

pytestmark = pytest.mark.integration
TEACHER_TOKEN = "teacher-" + "T" * 30
WEIGHTS_TOKEN = "weights-" + "W" * 30


def start(args: list[str], env: dict[str, str], log_path: Path) -> Proc:
    return Proc(args, log_path, {**env, "OPD_LOG_LEVEL": "DEBUG"}).start()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(
        tmp_path_factory.mktemp("tok") / "m", seed=0, tokenizer=build_char_tokenizer("abc")
    )


def test_teacher_token_from_a_secret_file(model_dir, tmp_path):
    token_file = tmp_path / "teacher_token"
    token_file.write_text(TEACHER_TOKEN + "\n")
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path / "teacher.log"
    proc = start(
        ["teacher", "serve", "--model", str(model_dir), "--port", str(port), "--token-file", str(token_file)],
        {},
        log_path,
    )
    refused = 0
    try:
        probe = TeacherClient(address, token=TEACHER_TOKEN, max_retries=0, timeout_s=5)

        def serving() -> bool:
            try:
                probe.info()
                return True
            except grpc.RpcError:
                return False

        wait_until(serving, 120, "teacher", [proc], interval=0.2)
        probe.close()
        request = teacher_pb2.ScoreRequest(sequences=[build_sequence([1, 2, 3, 4], 2)], top_k=2)
        channel = grpc.insecure_channel(address)
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        bad_metadata = [
            (),
            (("authorization", "Bearer wrong"),),
            (("authorization", f"Bearer {TEACHER_TOKEN}x"),),
            (("authorization", f"Bearer {TEACHER_TOKEN[:-1]}"),),
            (("authorization", TEACHER_TOKEN),),  # no scheme
            (("authorization", f"Basic {TEACHER_TOKEN}"),),
            (("x-token", f"Bearer {TEACHER_TOKEN}"),),  # wrong header
        ]
        for metadata in bad_metadata:
            for call in (
                lambda m=metadata: stub.Score(request, metadata=m, timeout=10),
                lambda m=metadata: stub.GetInfo(teacher_pb2.GetInfoRequest(), metadata=m, timeout=10),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert TEACHER_TOKEN not in (err.value.details() or "")
                refused += 1
        good = (("authorization", f"Bearer {TEACHER_TOKEN}"),)
        reply = stub.Score(request, metadata=good, timeout=30)
        assert reply.results[0].rows == 2 and reply.results[0].k == 2
        channel.close()
    finally:
        proc.terminate(30)
    logs = log_path.read_text()
    assert "serving" in logs  # the process did log
    assert TEACHER_TOKEN not in logs
    assert refused == 14


def test_rollout_weight_token_from_the_environment(model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "rollout.log"
    proc = start(
        ["rollout", "serve", "--model", str(model_dir), "--port", str(port), "--max-model-len", "64"],
        {"OPD_WEIGHTS_TOKEN": WEIGHTS_TOKEN},
        log_path,
    )
    refused = 0
    try:
        with RolloutClient(url) as client:
            wait_until(client.ready, 120, "rollout", [proc], interval=0.2)
            before = client.weights()
        body = (model_dir / "model.safetensors").read_bytes()
        headers = [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {WEIGHTS_TOKEN}x"},
            {"Authorization": f"Bearer {WEIGHTS_TOKEN[:-1]}"},
            {"Authorization": WEIGHTS_TOKEN},
            {"Authorization": f"Basic {WEIGHTS_TOKEN}"},
        ]
        with httpx.Client(base_url=url, timeout=60) as http:
            for h in headers:
                put = http.put("/v1/weights", params={"version": before.version + 1}, content=body, headers=h)
                load = http.post(
                    "/v1/weights/load",
                    json={"path": str(model_dir), "version": before.version + 1},
                    headers=h,
                )
                for r in (put, load):
                    assert r.status_code == 401, r.text
                    assert WEIGHTS_TOKEN not in r.text
                    refused += 1
            assert http.get("/v1/weights").json() == before.model_dump()
        with RolloutClient(url, token=WEIGHTS_TOKEN) as client:
            # authorised: the body is validated (garbage is 422) and a real update installs
            with pytest.raises(RolloutError) as err:
                client.put_weights(b"not safetensors", before.version + 1)
            assert err.value.status_code == 422
            assert client.put_weights(body, before.version + 1).version == before.version + 1
    finally:
        proc.terminate(30)
    logs = log_path.read_text()
    assert "ready" in logs
    assert WEIGHTS_TOKEN not in logs
    assert refused == 12
