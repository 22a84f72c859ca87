"""services.rollout.collective: the bucket plan both sides derive, and the gloo group's transfer (three ranks
in one process, one thread each): every tensor arrives bit-exact on every replica, in fresh memory."""

from __future__ import annotations

import threading

import pytest
import torch

from services.rollout.collective import (
    ALIGN,
    CollectiveError,
    Group,
    PlanMismatch,
    dtype_name,
    host_store,
    parse_dtype,
    plan_buckets,
    plan_digest,
)


def test_plan_packs_in_order_aligned_and_sends_large_tensors_alone():
    specs = [
        ("a", (3,), torch.float32),  # 12 bytes
        ("b", (5,), torch.bfloat16),  # 10 bytes at 64
        ("big", (100,), torch.float32),  # 400 bytes > bucket: alone
        ("c", (0, 4), torch.float32),  # empty
        ("d", (), torch.int64),  # a scalar
        ("e", (20,), torch.float32),  # 80 bytes: does not fit after d, next bucket
    ]
    plan = plan_buckets(specs, 128)
    assert [[s.name for s in b.slots] for b in plan] == [["a", "b"], ["big"], ["c", "d"], ["e"]]
    assert [s.offset for s in plan[0].slots] == [0, ALIGN] and plan[0].nbytes == ALIGN + 10
    assert plan[1].alone and plan[1].nbytes == 400
    assert [s.name for b in plan for s in b.slots] == [n for n, _, _ in specs]
    assert all(s.offset % ALIGN == 0 and s.offset + s.nbytes <= b.nbytes for b in plan for s in b.slots)
    assert plan_digest(plan) == plan_digest(plan_buckets(specs, 128)) != plan_digest(plan_buckets(specs, 256))


def test_dtype_names_round_trip():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8):
        assert parse_dtype(dtype_name(dtype)) == dtype
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("complex64")


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.w": torch.randn(i * 300 + 1, generator=g) for i in range(12)}
    sd["embed"] = torch.randn(1000, 64, generator=g).to(torch.bfloat16)  # alone in its bucket
    sd["flag"] = torch.tensor(True)
    sd["empty"] = torch.empty(0, 8)
    sd["steps"] = torch.arange(9)
    return sd


def _group_of_three(bucket_bytes: int, chunk_bytes: int, sd, *, tensors=None):
    specs = [(n, tuple(t.shape), t.dtype) for n, t in sd.items()]
    plan = plan_buckets(specs, bucket_bytes)
    store = host_store("127.0.0.1", 0, 20)
    got: dict[int, dict[str, torch.Tensor] | BaseException] = {}

    def replica(rank: int) -> None:
        group = Group.join("127.0.0.1", store.port, 3, rank, "gloo", "t", timeout_s=20)
        try:
            got[rank] = group.receive(plan, chunk_bytes=chunk_bytes)
        except BaseException as e:
            got[rank] = e
        finally:
            group.close()

    threads = [threading.Thread(target=replica, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    root = Group(store, "t", 0, 3, "gloo", timeout_s=20, local_addr="127.0.0.1")
    try:
        sent = root.send(plan, iter((tensors or sd).items()), chunk_bytes=chunk_bytes)
    finally:
        root.close()
        for t in threads:
            t.join(30)
    return sent, got


@pytest.mark.parametrize(("bucket_bytes", "chunk_bytes"), [(4096, 1000), (1 << 20, 1 << 12)])
def test_gloo_chain_delivers_every_tensor_to_every_replica(bucket_bytes, chunk_bytes):
    sd = _state()
    sent, got = _group_of_three(bucket_bytes, chunk_bytes, sd)
    assert sent >= sum(t.numel() * t.element_size() for t in sd.values())
    for rank in (1, 2):
        received = got[rank]
        assert isinstance(received, dict) and list(received) == list(sd)
        for name, t in sd.items():
            r = received[name]
            assert r.dtype == t.dtype and r.shape == t.shape and torch.equal(r, t), name
            assert r.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()  # fresh memory


def test_tensors_that_break_their_specs_stop_the_sender():
    sd = _state()
    wrong = dict(sd)
    wrong["layer3.w"] = torch.zeros(5)
    with pytest.raises(PlanMismatch, match="layer3.w"):
        _group_of_three(1 << 20, 1 << 12, sd, tensors=wrong)


def test_a_group_needs_every_rank():
    store = host_store("127.0.0.1", 0, 2)
    with pytest.raises(RuntimeError):  # rank 1 never joins: the rendezvous times out
        Group(store, "lonely", 0, 2, "gloo", timeout_s=1, local_addr="127.0.0.1")
    with pytest.raises(ValueError, match="nccl needs a CUDA device"):
        Group(store, "x", 0, 2, "nccl", timeout_s=1)
    assert issubclass(PlanMismatch, CollectiveError)
