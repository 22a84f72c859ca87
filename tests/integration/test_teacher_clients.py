"""The teacher as a product for other trainers: the slim Python client and the Node.js example, each run
as a separate program against a real teacher server on loopback (tiny Llama, bearer token).

- `opd-teacher-client` (clients/python) installs into a fresh venv with nothing but its declared
  dependencies (no torch), builds a wheel holding the package, the generated code and py.typed, and from
  that venv answers exactly what the in-process client (main venv) answers.
- The Node.js example (clients/node) installs with `npm ci` from its lock file, loads the one .proto file,
  and its decoded top-K ids and log-probs equal the Python client's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from opd_teacher_client import ScoredRows, TeacherClient

from experiments.tiny_models import make_tiny_llama
from services.common.hf_models import load_causal_lm
from services.teacher.config import TeacherConfig
from services.teacher.server import run_server

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "clients" / "python"
NODE_DIR = ROOT / "clients" / "node"
TOKEN = "client-test-token"
TOP_K = 8
NO_BUILD_OUTPUT = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "node_modules")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("teacher") / "llama", seed=7)
    model = load_causal_lm(path)
    with torch.no_grad():  # spread the logits so the top-K order is not a near-tie anywhere
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    cfg = TeacherConfig(model=str(path), port=0, device="cpu", token=TOKEN, max_top_k=32)
    with run_server(cfg) as handle:
        yield handle


@pytest.fixture(scope="module")
def request_batch(server) -> dict:
    """Three sequences of random ids (scored from their own starts), candidates on the second."""
    with TeacherClient(server.address, token=TOKEN) as client:
        vocab = client.info().vocab_size
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, vocab, n).tolist() for n in (7, 12, 3)]
    return {"sequences": sequences, "score_from": [3, 1, 2], "candidates": [None, [0, 5, 9], None]}


def score_in_process(address: str, batch: dict) -> list[ScoredRows]:
    cands = [None if c is None else np.asarray(c, dtype=np.int32) for c in batch["candidates"]]
    with TeacherClient(address, token=TOKEN) as client:
        return client.score(batch["sequences"], batch["score_from"], top_k=TOP_K, candidates=cands)


def assert_same_rows(got: dict, want: ScoredRows) -> None:
    """A result decoded from JSON equals the in-process client's arrays bit for bit: the same request gives
    the same forward on the server, and a float32 survives float64 JSON exactly."""
    np.testing.assert_array_equal(np.asarray(got["topk_ids"], dtype=np.int32), want.topk_ids)
    for key in ("topk_logprobs", "target_logprobs"):
        np.testing.assert_array_equal(np.asarray(got[key], dtype=np.float32), getattr(want, key))


# -- Python: a fresh venv without torch -----------------------------------------------------------------


def pip(python: Path, *args: str) -> None:
    """The main venv's pip acting on another interpreter (`--python`): the fresh venv needs no pip."""
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def client_source(tmp_path_factory) -> Path:
    """A copy of clients/python: a build writes build/ and *.egg-info next to its source."""
    out = tmp_path_factory.mktemp("client-src") / "python"
    shutil.copytree(CLIENT_DIR, out, ignore=NO_BUILD_OUTPUT)
    return out


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory, client_source) -> Path:
    """A new venv with the client and only its declared dependencies installed (from PyPI or pip's cache)."""
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    deps = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    pip(python, "install", "-q", *deps)
    pip(python, "install", "-q", "--no-deps", str(client_source))
    pip(python, "check")  # every declared dependency is satisfied
    return python


FRESH_SCRIPT = """
import json, sys
try:
    import torch  # noqa: F401
    torch_found = True
except ModuleNotFoundError:
    torch_found = False
import grpc
import numpy as np
import opd_teacher_client
from opd_teacher_client import TeacherClient

address, token, batch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {"torch_found": torch_found, "module": opd_teacher_client.__file__}
cands = [None if c is None else np.asarray(c, dtype=np.int32) for c in batch["candidates"]]
with TeacherClient(address, token=token) as client:
    out["vocab_size"] = client.info().vocab_size
    rows = client.score(batch["sequences"], batch["score_from"], top_k=int(sys.argv[4]), candidates=cands)
out["results"] = [
    {
        "topk_ids": r.topk_ids.tolist(),
        "topk_logprobs": r.topk_logprobs.tolist(),
        "target_logprobs": r.target_logprobs.tolist(),
        "candidate_logprobs": None if r.candidate_logprobs is None else r.candidate_logprobs.tolist(),
    }
    for r in rows
]
with TeacherClient(address, max_retries=0) as client:
    try:
        client.info()
        out["without_token"] = "OK"
    except grpc.RpcError as e:
        out["without_token"] = e.code().name
print(json.dumps(out))
"""


def test_python_client_from_a_fresh_venv_without_torch(server, request_batch, fresh_python, tmp_path):
    proc = subprocess.run(
        [
            str(fresh_python),
            "-I",
            "-c",
            FRESH_SCRIPT,
            server.address,
            TOKEN,
            json.dumps(request_batch),
            str(TOP_K),
        ],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},  # no PYTHONPATH into the checkout
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["torch_found"] is False
    assert Path(out["module"]).is_relative_to(fresh_python.parents[1])  # the installed copy, not the repo's
    assert out["without_token"] == "UNAUTHENTICATED"
    want = score_in_process(server.address, request_batch)
    assert len(out["results"]) == len(want) == 3
    for got, rows, n, s in zip(
        out["results"], want, map(len, request_batch["sequences"]), request_batch["score_from"], strict=True
    ):
        assert np.asarray(got["topk_ids"]).shape == (n - s, TOP_K)
        assert_same_rows(got, rows)
        if rows.candidate_logprobs is None:
            assert got["candidate_logprobs"] is None
        else:
            np.testing.assert_array_equal(
                np.asarray(got["candidate_logprobs"], dtype=np.float32), rows.candidate_logprobs
            )
    assert want[1].candidate_logprobs is not None and want[1].candidate_logprobs.shape == (11, 3)


def test_python_client_wheel_holds_the_package_and_its_types(client_source, tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(client_source), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("opd_teacher_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {n for n in names if not n.startswith("opd_teacher_client-")}  # less the .dist-info
    assert package == {
        "opd_teacher_client/__init__.py",
        "opd_teacher_client/client.py",
        "opd_teacher_client/py.typed",
        "opd_teacher_client/v1/__init__.py",
        "opd_teacher_client/v1/teacher_pb2.py",
        "opd_teacher_client/v1/teacher_pb2.pyi",
        "opd_teacher_client/v1/teacher_pb2_grpc.py",
    }
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert sorted(requires) == sorted(
        tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    )


# -- Node.js: the example client from its lock file ----------------------------------------------------


@pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not on PATH: the Node.js example client (clients/node) is not tested",
)
def test_node_example_equals_the_python_client(server, request_batch, tmp_path):
    # The example's layout inside a copy of the repository (clients/node next to proto/), so its default
    # .proto path is the one it resolves; node_modules lands in the copy, not in the checkout.
    node_dir = tmp_path / "clients" / "node"
    shutil.copytree(NODE_DIR, node_dir, ignore=NO_BUILD_OUTPUT)
    (tmp_path / "proto").symlink_to(ROOT / "proto")
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=node_dir,
        check=True,
        capture_output=True,
        timeout=300,
    )
    plain = {k: v for k, v in request_batch.items() if k != "candidates"}  # the example sends no candidates
    base = ["node", "score.mjs", "--target", server.address, "--top-k", str(TOP_K)]
    base += ["--sequences", json.dumps(plain["sequences"]), "--score-from", json.dumps(plain["score_from"])]

    env = {k: v for k, v in os.environ.items() if k != "OPD_TEACHER_TOKEN"}  # the example's token default
    run = dict(cwd=node_dir, env=env, capture_output=True, text=True, timeout=120)
    proc = subprocess.run([*base, "--token", TOKEN], **run)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    want = score_in_process(server.address, {**plain, "candidates": [None] * len(plain["sequences"])})
    with TeacherClient(server.address, token=TOKEN) as client:
        info = client.info()
    assert (out["info"]["vocab_size"], out["info"]["max_top_k"]) == (info.vocab_size, 32)
    assert out["model_id"] == out["info"]["model_id"] == info.model_id
    assert len(out["results"]) == len(want)
    for got, rows in zip(out["results"], want, strict=True):
        assert (got["rows"], got["k"]) == rows.topk_ids.shape
        assert_same_rows(got, rows)

    denied = subprocess.run(base, **run)
    assert denied.returncode == 1
    assert json.loads(denied.stderr)["error"]["code"] == "UNAUTHENTICATED"
