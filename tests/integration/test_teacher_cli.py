"""`opd teacher serve` as a real subprocess: config from flags and env, health, drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opd_teacher_client import TeacherClient, build_sequence
from opd_teacher_client.v1 import teacher_pb2, teacher_pb2_grpc

from experiments.tiny_models import make_tiny_llama
from services.common.redis_server import free_port
from services.teacher.server import main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def wait_serving(address: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited with {proc.returncode}"
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"teacher at {address} not SERVING after {timeout} s")
    finally:
        channel.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("teacher") / "llama", seed=1)


def test_serve_drains_on_sigterm(model_dir, tmp_path):
    port = free_port()
    env = dict(
        os.environ,
        OPD_TEACHER_TOKEN="envtoken",
        OPD_TEACHER_BATCH_WINDOW_MS="3000",
        PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'proto'}",
    )
    log_path = tmp_path / "teacher.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launcher.cli",
                "teacher",
                "serve",
                "--model",
                str(model_dir),
                "--port",
                str(port),
                "--device",
                "cpu",
                "--grace-s",
                "20",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, proc)
        with TeacherClient(address, max_retries=0) as anonymous:  # the token came from the environment
            with pytest.raises(grpc.RpcError) as err:
                anonymous.info()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        channel = grpc.insecure_channel(address)
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        request = teacher_pb2.ScoreRequest(sequences=[build_sequence([1, 5, 6, 7], 2)], top_k=4)
        # Queued behind the 3 s gather window when SIGTERM arrives: drain must still answer it.
        in_flight = stub.Score.future(request, timeout=30, metadata=(("authorization", "Bearer envtoken"),))
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        response = in_flight.result()
        assert response.results[0].rows == 2 and response.results[0].k == 4
        assert proc.wait(timeout=30) == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "draining" in text and "stopped" in text
    assert "envtoken" not in text


def test_config_errors_exit_with_2(capsys):
    # One line on stderr naming the field, exit code 2, no traceback (services/common/config.py).
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opd teacher serve: model: required") and err.count("\n") == 1
    assert main(["--model", "m", "--backend", "onnx"]) == 2
    assert "backend: expected one of" in capsys.readouterr().err
