"""Teacher clients on the real gRPC server (tiny Llama, loopback): named tokens from a tokens file, the file
rewritten while serving (one client revoked, one added) without a restart, per-client in-flight limits, and
per-client metrics on the real /metrics endpoint."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from opd_teacher_client.v1 import teacher_pb2, teacher_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from experiments.tiny_models import make_tiny_llama
from services.common.redis_server import free_port
from services.teacher.config import TeacherConfig
from services.teacher.scorer import HFScorer
from services.teacher.server import run_server
from tests.integration.fault_procs import Proc, wait_until

pytestmark = pytest.mark.integration
TOK_PIPELINE = "pipeline-" + "p" * 27
TOK_LAB = "lab-" + "l" * 32
TOK_NEW = "newcomer-" + "n" * 27


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("clients") / "llama", seed=3)


@pytest.fixture(scope="module")
def scorer(model_dir):
    return HFScorer(str(model_dir), device="cpu", dtype="float32")


def write_tokens(path, text: str) -> None:
    """Atomic rewrite: a temporary file in the same directory, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def request(length: int = 6, score_from: int = 2) -> teacher_pb2.ScoreRequest:
    seq = teacher_pb2.Sequence(token_ids=list(range(1, length + 1)), score_from=score_from)
    return teacher_pb2.ScoreRequest(sequences=[seq], top_k=2)


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_named_tokens_reload_without_restart_and_per_client_metrics(model_dir, scorer, tmp_path, caplog):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, f"# teacher clients\npipeline {TOK_PIPELINE}\nlab {TOK_LAB} max_inflight=4\n")
    metrics_port = free_port()
    cfg = TeacherConfig(
        model=str(model_dir), port=0, device="cpu", tokens_file=str(tokens), metrics_port=metrics_port
    )
    with run_server(cfg, scorer=scorer) as handle:
        channel = grpc.insecure_channel(handle.address)
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)

        def score(token: str, length: int = 6) -> int:
            return stub.Score(request(length), metadata=auth(token), timeout=30).results[0].rows

        def refused(token: str | None) -> bool:
            metadata = () if token is None else auth(token)
            for call in (
                lambda: stub.Score(request(), metadata=metadata, timeout=30),
                lambda: stub.GetInfo(teacher_pb2.GetInfoRequest(), metadata=metadata, timeout=30),
            ):
                try:
                    call()
                    return False
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
                    assert "bearer token" in (e.details() or "")
            return True

        # both named clients work; their answers are the same numbers
        assert [score(TOK_PIPELINE) for _ in range(3)] == [4, 4, 4]
        assert score(TOK_LAB, length=9) == 7
        same = [stub.Score(request(), metadata=auth(t), timeout=30) for t in (TOK_PIPELINE, TOK_LAB)]
        assert same[0].results[0].topk_logprobs == same[1].results[0].topk_logprobs
        # wrong, missing and not-yet-added tokens fail
        assert refused("wrong") and refused(None) and refused(TOK_NEW) and refused(TOK_LAB + "x")

        # revoke lab, add newcomer: effective within about a second, the server never restarts
        write_tokens(tokens, f"pipeline {TOK_PIPELINE}\nnewcomer {TOK_NEW}\n")
        deadline = time.monotonic() + 10
        while refused(TOK_NEW):
            assert time.monotonic() < deadline, "the new token was not picked up"
            time.sleep(0.2)
        assert refused(TOK_LAB)
        assert score(TOK_NEW) == 4 and score(TOK_PIPELINE) == 4

        # a broken rewrite keeps the table: nobody is locked out, nobody is let in
        write_tokens(tokens, "pipeline\n")
        time.sleep(1.5)
        assert score(TOK_PIPELINE) == 4 and score(TOK_NEW) == 4 and refused("wrong")
        assert handle.tokens.reloads == 2  # the first read and the rewrite; the broken file was refused

        metrics = scrape(metrics_port)
        channel.close()

    def value(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    ok = "opd_teacher_client_requests_total"
    assert value(ok, client="pipeline", code="OK") == 3 + 1 + 1 + 1
    assert value(ok, client="lab", code="OK") == 2
    assert value(ok, client="newcomer", code="OK") == 1 + 2  # the probe that saw it added, then two
    assert value("opd_teacher_client_scored_tokens_total", client="pipeline") == 6 * 4
    assert value("opd_teacher_client_scored_tokens_total", client="lab") == 7 + 4
    assert value("opd_teacher_client_input_tokens_total", client="lab") == 9 + 6
    assert value("opd_teacher_client_queue_depth", client="pipeline") == 0
    assert value("opd_teacher_unauthenticated_total") >= 2 * 4 + 2 + 2
    client_labels = {dict(labels).get("client") for (_, labels) in metrics if dict(labels).get("client")}
    assert client_labels == {"pipeline", "lab", "newcomer"}  # names from the file only
    for token in (TOK_PIPELINE, TOK_LAB, TOK_NEW):
        assert token not in caplog.text


def test_per_client_in_flight_limit_on_the_real_server(model_dir, scorer, tmp_path):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, f"pipeline {TOK_PIPELINE}\nlab {TOK_LAB} max_inflight=1\n")
    # A 1.5 s batching window keeps the first request queued while the others arrive.
    cfg = TeacherConfig(
        model=str(model_dir),
        port=0,
        device="cpu",
        tokens_file=str(tokens),
        batch_window_ms=1500,
        max_client_inflight=2,
    )
    with run_server(cfg, scorer=scorer) as handle:
        channel = grpc.insecure_channel(handle.address)
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        lab_first = stub.Score.future(request(), metadata=auth(TOK_LAB), timeout=30)
        pipeline = [stub.Score.future(request(), metadata=auth(TOK_PIPELINE), timeout=30) for _ in range(2)]
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request(), metadata=auth(TOK_LAB), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "client 'lab' has 1 requests in flight" in err.value.details()
        assert "is 1" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # the server-wide max_client_inflight=2
            stub.Score(request(), metadata=auth(TOK_PIPELINE), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "is 2" in err.value.details()
        assert lab_first.result().results[0].rows == 4
        assert all(f.result().results[0].rows == 4 for f in pipeline)
        # freed: the limited client is admitted again, in parallel with the other
        with ThreadPoolExecutor(2) as pool:
            rows = list(
                pool.map(
                    lambda t: stub.Score(request(), metadata=auth(t), timeout=30).results[0].rows,
                    (TOK_LAB, TOK_PIPELINE),
                )
            )
        assert rows == [4, 4]
        value = handle.metrics.registry.get_sample_value
        assert value("opd_teacher_client_rejected_total", {"client": "lab", "reason": "client_limit"}) == 1
        assert (
            value("opd_teacher_client_rejected_total", {"client": "pipeline", "reason": "client_limit"}) == 1
        )
        channel.close()


def test_sighup_rereads_the_tokens_file_in_the_cli_process(model_dir, tmp_path):
    """`opd teacher serve` survives SIGHUP and re-reads the file at once, even unchanged (a stat check would
    not); the token is in no log line."""
    tokens = tmp_path / "tokens"
    write_tokens(tokens, f"pipeline {TOK_PIPELINE}\n")
    port = free_port()
    log_path = tmp_path / "teacher.log"
    args = ["teacher", "serve", "--model", str(model_dir), "--port", str(port), "--tokens-file", str(tokens)]
    proc = Proc(args, log_path, {"OPD_LOG_LEVEL": "DEBUG"}).start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)

        def serving() -> bool:
            try:
                stub.GetInfo(teacher_pb2.GetInfoRequest(), metadata=auth(TOK_PIPELINE), timeout=5)
                return True
            except grpc.RpcError:
                return False

        wait_until(serving, 120, "teacher", [proc], interval=0.2)
        assert "reloaded" not in log_path.read_text()
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded: 1 clients" in log_path.read_text(), 10, "SIGHUP reload", [proc])
        assert proc.alive
        assert stub.Score(request(), metadata=auth(TOK_PIPELINE), timeout=30).results[0].rows == 4
        channel.close()
    finally:
        proc.terminate(30)
    assert TOK_PIPELINE not in log_path.read_text()
