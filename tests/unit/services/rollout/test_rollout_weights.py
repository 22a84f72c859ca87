"""Weight validation, hashing, parsing, the readers-writer lock, the client's serialisation, the config."""

from __future__ import annotations

import asyncio
import io

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from experiments.tiny_models import build_char_tokenizer, tiny_llama_config
from services.common.config import ConfigError, build_config
from services.rollout.client import SafetensorsStream, state_dict_to_safetensors
from services.rollout.config import RolloutConfig
from services.rollout.engine import (
    AsyncRWLock,
    WeightSchema,
    WeightsError,
    parse_safetensors,
    row_seed,
    safetensors_files,
    state_sha256,
    tensor_specs,
)


def tiny_model(tie: bool = False) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(len(build_char_tokenizer()), tokenizer=build_char_tokenizer())
    config.tie_word_embeddings = tie
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_schema_lists_every_tensor_and_tied_aliases():
    untied = WeightSchema.of_module(tiny_model(tie=False))
    assert untied.aliases == {}
    assert "lm_head.weight" in untied.specs and "model.embed_tokens.weight" in untied.specs
    assert untied.num_parameters == sum(p.numel() for p in tiny_model(tie=False).parameters())
    tied = WeightSchema.of_module(tiny_model(tie=True))
    assert tied.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in tied.specs


def test_schema_of_meta_model_equals_schema_of_real_model():
    with torch.device("meta"):
        meta = tiny_model(tie=True)
    assert WeightSchema.of_module(meta) == WeightSchema.of_module(tiny_model(tie=True))


def test_validate_accepts_a_full_state_dict_with_or_without_tied_aliases():
    model = tiny_model(tie=True)
    schema = WeightSchema.of_module(model)
    sd = model.state_dict()
    schema.validate(tensor_specs(sd))  # with lm_head.weight (an alias)
    schema.validate(tensor_specs({k: v for k, v in sd.items() if k != "lm_head.weight"}))


def test_validate_names_every_problem():
    model = tiny_model()
    schema = WeightSchema.of_module(model)
    sd = dict(model.state_dict())
    del sd["model.norm.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["lm_head.weight"] = torch.zeros(7, 64)
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"].bfloat16()
    with pytest.raises(WeightsError) as err:
        schema.validate(tensor_specs(sd))
    msg = str(err.value)
    assert "missing 1 tensor(s): model.norm.weight" in msg
    assert "unexpected 1 tensor(s): extra.weight" in msg
    assert "lm_head.weight: got [7, 64] float32, want [85, 64] float32" in msg
    assert "model.embed_tokens.weight: got [85, 64] bfloat16, want [85, 64] float32" in msg


def test_validate_checks_aliases_too():
    model = tiny_model(tie=True)
    schema = WeightSchema.of_module(model)
    sd = dict(model.state_dict())
    sd["lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match="lm_head.weight: got \\[3, 3\\]"):
        schema.validate(tensor_specs(sd))


def test_validate_truncates_long_listings():
    schema = WeightSchema({f"w{i}": ((1,), torch.float32) for i in range(20)})
    with pytest.raises(WeightsError, match=r"missing 20 tensor\(s\): .*\.\.\. and 12 more"):
        schema.validate({})


def test_sha256_depends_on_values_names_dtypes_not_on_order():
    sd = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    h = state_sha256(sd, sd)
    assert h == state_sha256(dict(reversed(list(sd.items()))), ["a", "b"])
    flipped = dict(sd)
    flipped["b"] = sd["b"].clone()
    flipped["b"][1, 2] = torch.nextafter(flipped["b"][1, 2], torch.tensor(100.0))  # one ulp
    assert state_sha256(flipped, flipped) != h
    assert state_sha256({"b": sd["b"].reshape(3, 2), "a": sd["a"]}, ["a", "b"]) != h  # same bytes, new shape
    assert state_sha256({"c": sd["b"], "a": sd["a"]}, ["a", "c"]) != h
    assert state_sha256(sd, ["b"]) != h  # only the listed names count
    # non-contiguous views hash by value
    assert state_sha256({"b": sd["b"].t().contiguous().t(), "a": sd["a"]}, ["a", "b"]) == h


def test_parse_safetensors_rejects_malformed_and_pickled_bodies():
    sd = {"w": torch.randn(3, 4)}
    body = safetensors_save(sd)
    assert torch.equal(parse_safetensors(body)["w"], sd["w"])
    buf = io.BytesIO()
    torch.save(sd, buf)  # a pickle: must be refused, never loaded
    for bad in (b"", b"garbage", body[:-3], buf.getvalue(), b"\xff" * 8 + b"{}"):
        with pytest.raises(WeightsError, match="safetensors body|empty body"):
            parse_safetensors(bad)


def test_safetensors_files(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(safetensors_save({"x": torch.zeros(1)}))
    (tmp_path / "a.safetensors").write_bytes(safetensors_save({"y": torch.zeros(1)}))
    assert [p.name for p in safetensors_files(tmp_path)] == ["a.safetensors", "b.safetensors"]
    assert safetensors_files(tmp_path / "a.safetensors", root=tmp_path) == [tmp_path / "a.safetensors"]
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "empty"): "no \\*.safetensors",
        str(tmp_path / "nope"): "not a file or directory",
        "bad\0name": "cannot read",
        "/": "outside the weights directory",
        str(tmp_path / ".." / "x"): "outside the weights directory",
    }
    for path, reason in cases.items():
        with pytest.raises(WeightsError, match=reason):
            safetensors_files(path, root=tmp_path if "outside" in reason else None)


def test_client_serialises_tied_weights_once_and_views_by_value():
    model = tiny_model(tie=True)
    sd = model.state_dict()
    fused = torch.arange(12.0)
    sd = {**sd, "view.a": fused[:6].view(2, 3), "view.b": fused[6:]}
    loaded = safetensors_load(state_dict_to_safetensors(sd))
    assert "lm_head.weight" not in loaded  # the alias of the embeddings goes once
    assert torch.equal(loaded["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(loaded["view.b"], torch.arange(6.0, 12.0))
    WeightSchema.of_module(model).validate(tensor_specs({k: v for k, v in loaded.items() if "view" not in k}))


def test_row_seed_is_stable_and_distinct():
    seeds = {row_seed(7, i, j) for i in range(20) for j in range(20)}
    assert len(seeds) == 400
    assert row_seed(7, 1, 2) == row_seed(7, 1, 2) != row_seed(8, 1, 2)
    assert all(0 <= s < 2**63 for s in seeds)


def test_rw_lock_writer_waits_for_readers_and_holds_off_new_readers():
    async def scenario() -> list[str]:
        lock, events = AsyncRWLock(), []
        first_in, release_first = asyncio.Event(), asyncio.Event()

        async def reader(name: str, hold: asyncio.Event | None = None) -> None:
            async with lock.read():
                events.append(f"{name}+")
                if hold is not None:
                    first_in.set()
                    await hold.wait()
                events.append(f"{name}-")

        async def writer() -> None:
            async with lock.write():
                events.append("w+")
                await asyncio.sleep(0.01)
                events.append("w-")

        r1 = asyncio.create_task(reader("r1", release_first))
        await first_in.wait()
        w = asyncio.create_task(writer())
        await asyncio.sleep(0.01)
        r2 = asyncio.create_task(reader("r2"))  # arrives while the writer waits: must go after it
        await asyncio.sleep(0.01)
        assert events == ["r1+"]
        release_first.set()
        await asyncio.gather(r1, w, r2)
        return events

    assert asyncio.run(scenario()) == ["r1+", "r1-", "w+", "w-", "r2+", "r2-"]


def test_rw_lock_cancelled_writer_releases_waiting_readers():
    async def scenario() -> None:
        lock = AsyncRWLock()
        holding, release = asyncio.Event(), asyncio.Event()

        async def long_reader() -> None:
            async with lock.read():
                holding.set()
                await release.wait()

        r1 = asyncio.create_task(long_reader())
        await holding.wait()
        w = asyncio.create_task(lock.write().__aenter__())
        await asyncio.sleep(0.01)
        w.cancel()
        await asyncio.gather(w, return_exceptions=True)
        async with asyncio.timeout(1):  # a new reader is not blocked by the cancelled writer
            async with lock.read():
                pass
        release.set()
        await r1

    asyncio.run(scenario())


def test_config_validation_and_token_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("OPD_WEIGHTS_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="model"):
        build_config(RolloutConfig, {}, env={})
    with pytest.raises(ConfigError, match="backend: 'tgi'"):
        build_config(RolloutConfig, {"model": "m", "backend": "tgi"}, env={})
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        build_config(RolloutConfig, {"model": "m", "vllm_gpu_memory_utilization": 0}, env={})
    cfg = build_config(
        RolloutConfig, {"model": "m"}, env={"OPD_ROLLOUT_PORT": "0", "OPD_ROLLOUT_BACKEND": "vllm"}
    )
    assert (cfg.port, cfg.backend, cfg.initial_version) == (0, "vllm", 0)
    assert cfg.resolve_token() is None
    monkeypatch.setenv("OPD_WEIGHTS_TOKEN", "from-env")
    assert cfg.resolve_token() == "from-env"
    monkeypatch.delenv("OPD_WEIGHTS_TOKEN")
    (tmp_path / "tok").write_text("from-file\n")
    assert build_config(
        RolloutConfig, {"model": "m", "token_file": str(tmp_path / "tok")}, env={}
    ).resolve_token() == ("from-file")


def test_streamed_safetensors_round_trip_through_the_safetensors_parser():
    sd = {
        "b": torch.randn(3, 5).bfloat16(),
        "a": torch.randn(7),
        "i": torch.arange(5),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "mask": torch.tensor([True, False, True]),
        "h": torch.randn(4).half(),
        "u": torch.arange(3, dtype=torch.uint8),
        "strided": torch.arange(12.0).reshape(3, 4)[:, ::2],
    }
    stream = SafetensorsStream(sd, piece=16)  # tiny pieces: many boundaries inside tensors
    pieces = list(stream)
    assert all(len(p) <= 16 for p in pieces[1:])
    body = b"".join(pieces)
    assert len(body) == stream.length and (len(pieces[0]) % 8) == 0
    back = parse_safetensors(body)
    assert back.keys() == sd.keys()
    for name, t in sd.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert b"".join(stream) == body  # iterable again (a retried request re-sends it)
    with pytest.raises(ValueError, match="no safetensors encoding"):
        SafetensorsStream({"c": torch.zeros(2, dtype=torch.complex64)})
