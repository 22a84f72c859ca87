"""The collective weight path (issue #16) over real servers on loopback: two hf rollout replicas served
in-process and a trainer-side CollectiveSync in the test process, one gloo group between them.

A push reaches both replicas by one broadcast (version and sha256 = the pushed weights'); a second push
reuses the group; a wrong token is 401 at the join; a spec mismatch is 422 with nothing installed anywhere
and no byte sent; a replica that left (restarted) is rejoined by the next push; a replica that dies in the
middle of a broadcast fails the push at once with a clear error, and the next push forms a new group; a
trainer run with push_mode = "collective" pushes after every batch."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import torch
from fastapi import FastAPI

from experiments.synthetic import synthetic_records, write_records
from experiments.tiny_models import build_char_tokenizer, make_tiny_llama
from services.common import redis_keys
from services.common.hf_models import load_causal_lm
from services.common.redis_server import EmbeddedRedis
from services.rollout.app import build_app
from services.rollout.client import RolloutClient, RolloutError
from services.rollout.collective import CollectiveError, host_store
from services.rollout.config import RolloutConfig
from services.rollout.engine import state_sha256
from services.rollout.server import running_server
from trainer.config import TrainerConfig
from trainer.metrics import read_metrics
from trainer.train import run
from trainer.weight_broadcast import CollectiveSync
from trainer.weight_sync import StateDictWeights

pytestmark = pytest.mark.integration

TOKEN = "collective-token"
TOK = build_char_tokenizer()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("collective")
    return dict(
        root=root,
        student_dir=make_tiny_llama(root / "student", seed=0, tokenizer=TOK),
        teacher=load_causal_lm(make_tiny_llama(root / "teacher", seed=1, tokenizer=TOK)),
    )


@dataclass
class Replica:
    url: str
    client: RolloutClient
    app: FastAPI

    def member(self) -> dict | None:
        return httpx.get(f"{self.url}/v1/weights/collective").json()


@contextlib.contextmanager
def replica(student_dir, token: str | None = TOKEN) -> Iterator[Replica]:
    cfg = RolloutConfig(model=str(student_dir), backend="hf", device="cpu", port=0, token=token)
    app = build_app(cfg)
    with running_server(app) as url:
        client = RolloutClient(url, token=token)
        client.wait_ready(120)
        try:
            yield Replica(url, client, app)
        finally:
            client.close()


@pytest.fixture
def replicas(models):
    with replica(models["student_dir"]) as a, replica(models["student_dir"]) as b:
        yield [a, b]


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


def _sha(sd) -> str:
    return state_sha256(sd, sd.keys())


def _perturbed(student_dir, seed: int) -> dict[str, torch.Tensor]:
    model = load_causal_lm(student_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sync(redis_server, urls, **kw) -> CollectiveSync:
    kw.setdefault("token", TOKEN)
    kw.setdefault("collective_timeout_s", 20.0)
    kw.setdefault("bucket_bytes", 1 << 16)  # many buckets, some tensors alone: both paths of the plan
    kw.setdefault("chunk_bytes", 1 << 14)
    return CollectiveSync(redis_keys.connect(redis_server.url), "coll", urls, addr="127.0.0.1", **kw)


def test_push_reaches_both_replicas_and_reuses_the_group(models, replicas, redis_server):
    before = [r.client.weights() for r in replicas]
    sync = _sync(redis_server, [r.url for r in replicas])
    try:
        sd1 = _perturbed(models["student_dir"], 1)
        assert sync.push(StateDictWeights(sd1), 1) > 0
        for r in replicas:
            info = r.client.weights()
            assert info.version == 1 and info.sha256 == _sha(sd1) != before[0].sha256
        assert int(sync.redis.get(sync.key)) == 1
        group = sync.group_name
        assert group is not None
        assert [r.member() for r in replicas] == [
            {"group_name": group, "rank": rank, "world_size": 3, "backend": "gloo"} for rank in (1, 2)
        ]
        assert sync.last_push["bytes"] >= sum(t.numel() * t.element_size() for t in sd1.values())

        sd2 = _perturbed(models["student_dir"], 2)
        sync.push(StateDictWeights(sd2), 2)
        assert sync.group_name == group  # the same group: no new rendezvous
        assert all(r.client.weights().sha256 == _sha(sd2) for r in replicas)
        assert sync.versions() == [2, 2] and sync.behind(2) == []
    finally:
        sync.close()
    assert [r.member() for r in replicas] == [None, None]  # close() made them leave


def test_wrong_or_missing_token_is_refused(models, replicas, redis_server):
    sync = _sync(redis_server, [r.url for r in replicas], token="wrong")
    try:
        with pytest.raises(RolloutError) as err:
            sync.push(StateDictWeights(_perturbed(models["student_dir"], 3)), 1)
        assert err.value.status_code == 401
    finally:
        sync.close()
    base = replicas[0].url
    join = dict(addr="127.0.0.1", port=1, world_size=2, rank=1, backend="gloo", group_name="g")
    update = dict(group_name="g", update_id="u", version=1, specs=[["x", [1], "float32"]])
    for path, body in (("join", join), ("update", update), ("leave", {"group_name": "g"})):
        assert httpx.post(f"{base}/v1/weights/collective/{path}", json=body).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert httpx.post(f"{base}/v1/weights/collective/{path}", json=body, headers=bad).status_code == 401
    assert [r.client.weights().version for r in replicas] == [0, 0]


def test_no_token_configured_is_403_and_bad_input_422_409(models):
    join = dict(addr="127.0.0.1", port=1, world_size=2, rank=1, backend="gloo", group_name="g")
    with replica(models["student_dir"], token=None) as rep:
        assert httpx.post(f"{rep.url}/v1/weights/collective/join", json=join).status_code == 403
    with replica(models["student_dir"]) as rep:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for bad in (
            dict(rank=2),  # not below world_size
            dict(backend="mpi"),
            dict(group_name="a b"),
            dict(port=0),
            dict(backend="nccl"),  # the model is not on a GPU
            dict(extra=1),
        ):
            r = httpx.post(f"{rep.url}/v1/weights/collective/join", json={**join, **bad}, headers=auth)
            assert r.status_code == 422, (bad, r.text)
        update = dict(group_name="g", update_id="u", version=1, specs=[["x", [1], "float32"]])
        r = httpx.post(f"{rep.url}/v1/weights/collective/update", json=update, headers=auth)
        assert r.status_code == 409 and "join first" in r.json()["detail"]
        for specs in ([["x", [1], "complex7"]], [["x", [-1], "float32"]], [["x", [1], "float32"]] * 2, []):
            r = httpx.post(
                f"{rep.url}/v1/weights/collective/update", json={**update, "specs": specs}, headers=auth
            )
            assert r.status_code == 422, (specs, r.text)
        # nothing listens there: 422 at once
        t0 = time.monotonic()
        r = httpx.post(f"{rep.url}/v1/weights/collective/join", json=join, headers=auth, timeout=30)
        assert r.status_code == 422 and "cannot reach" in r.json()["detail"] and time.monotonic() - t0 < 10
        # a store, but the group never completes (rank 0 never comes): 504 after the join's timeout
        store = host_store("127.0.0.1", 0, 5)
        t0 = time.monotonic()
        r = httpx.post(
            f"{rep.url}/v1/weights/collective/join",
            json={**join, "port": store.port, "timeout_s": 2},
            headers=auth,
            timeout=30,
        )
        assert r.status_code == 504 and time.monotonic() - t0 < 20
        assert rep.member() is None and rep.client.weights().version == 0


def test_spec_mismatch_is_422_and_installs_nothing(models, replicas, redis_server):
    sync = _sync(redis_server, [r.url for r in replicas])
    try:
        sd = _perturbed(models["student_dir"], 4)
        sync.push(StateDictWeights(sd), 1)  # forms the group
        good = [r.client.weights() for r in replicas]
        group = sync.group_name
        read: list[str] = []

        class Watched(StateDictWeights):
            def tensors(self):
                for name, t in super().tensors():
                    read.append(name)
                    yield name, t

        name = next(iter(sd))
        with pytest.raises(RolloutError) as err:
            sync.push(Watched({**sd, name: torch.zeros(3, 3)}), 2)
        assert err.value.status_code == 422 and name in err.value.detail
        assert len(read) == len(sd)  # read to its end once (FSDP ranks gather in step), though sent nowhere
        with pytest.raises(RolloutError) as err:
            sync.push(StateDictWeights({k: v for k, v in sd.items() if k != name}), 2)
        assert err.value.status_code == 422 and "missing" in err.value.detail
        with pytest.raises(RolloutError) as err:  # below the served version
            sync.push(StateDictWeights(sd), 0)
        assert err.value.status_code == 409
        sync.push(StateDictWeights(sd), 1)  # what they serve already (e.g. resumed): nothing to do
        assert [r.client.weights() for r in replicas] == good
        assert int(sync.redis.get(sync.key)) == 1
        # the group survived every refusal
        sd3 = _perturbed(models["student_dir"], 5)
        sync.push(StateDictWeights(sd3), 3)
        assert sync.group_name == group
        assert all(r.client.weights().sha256 == _sha(sd3) for r in replicas)
    finally:
        sync.close()


def test_a_replica_that_left_is_rejoined_by_the_next_push(models, replicas, redis_server):
    sync = _sync(redis_server, [r.url for r in replicas])
    try:
        sync.push(StateDictWeights(_perturbed(models["student_dir"], 6)), 1)
        first = sync.group_name
        # as after a restart: replica 1 knows no group; the update finds it (409 before any byte moves)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        left = httpx.post(
            f"{replicas[1].url}/v1/weights/collective/leave", json={"group_name": first}, headers=auth
        )
        assert left.json() == {"left": True}
        sd = _perturbed(models["student_dir"], 7)
        sync.push(StateDictWeights(sd), 2)
        assert sync.group_name not in (None, first)
        assert all(r.client.weights().sha256 == _sha(sd) for r in replicas)
        assert [r.member()["group_name"] for r in replicas] == [sync.group_name] * 2  # type: ignore[index]
    finally:
        sync.close()


def test_a_push_to_some_replicas_goes_over_http(models, replicas, redis_server):
    sync = _sync(redis_server, [r.url for r in replicas])
    try:
        sd = _perturbed(models["student_dir"], 8)
        sync.push(StateDictWeights(sd), 1, only=[1])
        assert [r.client.weights().version for r in replicas] == [0, 1]
        assert sync.group_name is None  # no group was needed
        assert sync.reconcile(StateDictWeights(sd), 1) == 1  # brings replica 0 to version 1
        assert [r.client.weights().sha256 for r in replicas] == [_sha(sd)] * 2
    finally:
        sync.close()


def test_replica_failing_mid_broadcast_fails_the_push_fast_then_a_new_group_forms(
    models, replicas, redis_server
):
    sync = _sync(redis_server, [r.url for r in replicas], collective_timeout_s=60.0)
    try:
        sync.push(StateDictWeights(_perturbed(models["student_dir"], 9)), 1)
        first = sync.group_name
        victim = replicas[1].app.state.collective.member.group

        class Failing(StateDictWeights):
            """Replica 2's group closes (its connections drop, as when its process dies) mid-broadcast."""

            def tensors(self):
                for k, item in enumerate(super().tensors()):
                    if k == 3:
                        threading.Thread(target=victim.close, daemon=True).start()
                        time.sleep(0.2)
                    yield item

        t0 = time.monotonic()
        with pytest.raises(CollectiveError) as err:
            sync.push(Failing(_perturbed(models["student_dir"], 10)), 2)
        assert time.monotonic() - t0 < 30  # not the 60 s timeout
        assert "formed anew on the next push" in str(err.value)
        assert sync.group_name is None
        assert [r.client.weights().version for r in replicas] == [1, 1]  # nothing installed anywhere
        assert int(sync.redis.get(sync.key)) == 1
        sd = _perturbed(models["student_dir"], 11)
        sync.push(StateDictWeights(sd), 2)
        assert sync.group_name not in (None, first)
        assert all(r.client.weights().sha256 == _sha(sd) for r in replicas)
    finally:
        sync.close()


def test_trainer_run_pushes_by_collective(models, replicas, redis_server, tmp_path, monkeypatch):
    student = load_causal_lm(models["student_dir"])
    records = synthetic_records(
        student,
        models["teacher"],
        n_records=4,
        group_size=2,
        top_k=4,
        behaviour_top_k=4,
        special_ids=sorted(set(TOK.all_special_ids)),
        eos_id=TOK.eos_token_id,
    )
    write_records(redis_keys.connect(redis_server.url), "collective-run", records)
    monkeypatch.setenv("OPD_WEIGHTS_TOKEN", TOKEN)
    cfg = TrainerConfig(
        model=str(models["student_dir"]),
        device="cpu",
        redis_url=redis_server.url,
        run="collective-run",
        batch_size=4,
        mini_batch_size=2,
        top_k=4,
        lr=1e-2,
        read_block_ms=100,
        idle_timeout_s=1.0,
        checkpoint_dir=str(tmp_path / "ckpt"),
        tensorboard=False,
        progress=False,
        push_every=1,
        push_mode="collective",
        rollout_urls=[r.url for r in replicas],
        collective_addr="127.0.0.1",
        collective_timeout_s=30.0,
    )
    state = run(cfg)
    assert state.policy_version == state.batch == 2
    trained = load_causal_lm(models["student_dir"])
    from trainer import checkpoint as ckpt

    ckpt.load_latest(cfg.checkpoint_dir, trained, restore_rng=False)
    infos = [r.client.weights() for r in replicas]
    assert [i.version for i in infos] == [2, 2]
    assert infos[0].sha256 == infos[1].sha256 == _sha(trained.state_dict()) != _sha(student.state_dict())
    rows = read_metrics(cfg.metrics_dir)
    assert [m["train/policy_version"] for m in rows] == [1, 2] and all(m["time/push"] > 0 for m in rows)
    assert [r.member() for r in replicas] == [None, None]  # the trainer's close() left the group
