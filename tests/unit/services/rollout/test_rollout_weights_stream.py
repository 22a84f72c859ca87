"""The streamed safetensors encoder and the incremental receiver (services/rollout/weights_stream.py):
round trips at every piece size, agreement with the safetensors library both ways, header checks, early
refusal, truncated and overlong bodies, buckets, staging memory."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from services.rollout.engine import WeightsError
from services.rollout.weights_stream import (
    PIECE_BYTES,
    SafetensorsReceiver,
    encode_header,
    iter_body,
    parse_header,
    receive_safetensors,
    staging_tensors,
)


def mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "mask": torch.tensor([True, False, True]),  # 3 bytes first: later tensors start unaligned
        "b": torch.randn(3, 5, generator=g).bfloat16(),
        "a": torch.randn(7, generator=g),
        "i": torch.arange(5),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "h": torch.randn(4, generator=g).half(),
        "u": torch.arange(3, dtype=torch.uint8),
        "strided": torch.arange(12.0).reshape(3, 4)[:, ::2],
        "big": torch.randn(PIECE_BYTES // 4 + 3, generator=g),  # over a piece: sent without a copy
    }


def specs_of(sd: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(name, tuple(t.shape), t.dtype) for name, t in sd.items()]


def encode(sd: dict[str, torch.Tensor], bucket_bytes: int = 1 << 20) -> bytes:
    specs = specs_of(sd)
    prefix, length = encode_header(specs)
    body = b"".join(bytes(b) for b in iter_body(prefix, specs, iter(sd.items()), bucket_bytes))
    assert len(body) == length
    return body


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("piece", [1, 7, 8, 4096, 1 << 30])
def test_round_trip_at_any_piece_size(piece):
    sd = mixed_state()
    body = encode(sd)
    receiver = SafetensorsReceiver()
    for start in range(0, len(body), piece):
        receiver.feed(body[start : start + piece])
    got = receiver.finish()
    assert_same(got, sd)
    for t in got.values():  # owned and writable
        t.add_(1) if t.dtype != torch.bool else t.logical_not_()


def test_agrees_with_the_safetensors_library_both_ways():
    sd = mixed_state()
    assert_same(safetensors_load(encode(sd)), sd)  # the library parses what we send (specs order)
    theirs = safetensors_save({k: v.contiguous() for k, v in sd.items()})  # their order, their padding
    receiver = SafetensorsReceiver()
    receiver.feed(theirs)
    assert_same(receiver.finish(), sd)


def test_buckets_are_bounded_and_large_tensors_are_not_copied():
    sd = mixed_state()
    specs = specs_of(sd)
    prefix, _ = encode_header(specs)
    buckets = list(iter_body(prefix, specs, iter(sd.items()), bucket_bytes=1 << 16))
    assert all(0 < len(b) <= 1 << 16 for b in buckets)
    sd["big"].fill_(7.0)  # after the buckets were made: the big tensor's buckets are views of it
    seven = torch.full((16,), 7.0).numpy().tobytes()
    assert sum(bytes(b[:64]) == seven for b in buckets) >= len(buckets) - 2
    # small tensors (and the header) are packed: far fewer buckets than tensors + pieces of the big one
    assert len(buckets) <= 2 + -(-sd["big"].numel() * 4 // (1 << 16))


def test_a_sender_must_keep_to_its_specs():
    sd = mixed_state()
    specs = specs_of(sd)
    prefix, _ = encode_header(specs)
    for tensors, match in [
        ([(n, t.float() if n == "a" else t) for n, t in sd.items()][:-1], "fewer"),
        ([*sd.items(), ("x", torch.zeros(1))], "more"),
        ([("zzz" if n == "i" else n, t) for n, t in sd.items()], "promised"),
        ([(n, t.double() if n == "a" else t) for n, t in sd.items()], "promised"),
    ]:
        with pytest.raises(ValueError, match=match):
            list(iter_body(prefix, specs, iter(tensors)))
    with pytest.raises(ValueError, match="no safetensors encoding"):
        encode_header([("c", (2,), torch.complex64)])
    with pytest.raises(ValueError, match="duplicate"):
        encode_header([("a", (1,), torch.float32), ("a", (1,), torch.float32)])


def header_bytes(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    "header,reason",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "do not hold"),
        ({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "gap or overlap"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            "gap or overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [1]}}, "exactly dtype, shape and data_offsets"),
        ({"__metadata__": {"k": 1}}, "map of strings"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_malformed_headers_are_refused(header, reason):
    receiver = SafetensorsReceiver()
    with pytest.raises(WeightsError, match=reason):
        receiver.feed(header_bytes(header))


def test_header_framing_errors():
    dup = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(WeightsError, match="duplicate key"):
        parse_header(dup)
    with pytest.raises(WeightsError, match="not JSON"):
        parse_header(b"\xff\xfe")
    with pytest.raises(WeightsError, match="header length .* exceeds"):
        SafetensorsReceiver().feed(b"not safetensors")
    with pytest.raises(WeightsError, match="empty body"):
        SafetensorsReceiver().finish()
    r = SafetensorsReceiver()
    r.feed(b"\x10\0\0\0")
    with pytest.raises(WeightsError, match="ends inside the header"):
        r.finish()
    ok = parse_header(b'{"__metadata__":{"format":"pt"}}   ')
    assert ok.entries == () and ok.length == 8 + 35


def test_the_header_check_runs_before_any_data_and_can_refuse():
    sd = mixed_state()
    body = encode(sd)
    seen = []

    def refuse(header):
        seen.append((header.specs["a"], header.length))
        raise WeightsError("not this model")

    receiver = SafetensorsReceiver(refuse)
    header_end = 8 + struct.unpack("<Q", body[:8])[0]
    receiver.feed(body[: header_end - 1])
    assert not seen
    with pytest.raises(WeightsError, match="not this model"):
        receiver.feed(body[header_end - 1 : header_end + 100])
    assert seen == [(((7,), torch.float32), len(body))] and not receiver.tensors


def test_truncated_and_overlong_bodies():
    body = encode(mixed_state())
    short = SafetensorsReceiver()
    short.feed(body[:-1])
    assert not short.complete
    with pytest.raises(WeightsError, match=f"truncated safetensors body: {len(body) - 1} of the {len(body)}"):
        short.finish()
    long = SafetensorsReceiver()
    with pytest.raises(WeightsError, match="body longer than its safetensors header declares"):
        long.feed(body + b"\0")


def test_receive_from_an_async_stream():
    sd = mixed_state()
    body = encode(sd)

    async def chunks():
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    assert_same(asyncio.run(receive_safetensors(chunks())), sd)


def test_staging_tensors_are_aligned_owned_and_separate():
    specs = [("a", (3,), torch.bool), ("b", (5,), torch.float32), ("e", (0, 2), torch.bfloat16)]
    tensors, views = staging_tensors(specs)
    assert tensors["b"].data_ptr() % 64 == 0 and tensors["a"].data_ptr() % 64 == 0
    views["b"][:] = torch.arange(5.0).numpy().tobytes()
    assert torch.equal(tensors["b"], torch.arange(5.0))
    tensors["a"].fill_(True)
    assert torch.equal(tensors["b"], torch.arange(5.0))  # no overlap
    assert tensors["e"].shape == (0, 2) and "e" not in views
