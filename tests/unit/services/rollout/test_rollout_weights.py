"""Weight validation, hashing, parsing, updates without draining (the engine's update lock, the hf gate),
the client's serialisation, the config."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from experiments.tiny_models import build_char_tokenizer, tiny_llama_config
from services.common.config import ConfigError, build_config
from services.rollout.client import SafetensorsStream, state_dict_to_safetensors
from services.rollout.config import RolloutConfig
from services.rollout.engine import (
    EngineUnavailable,
    RolloutEngine,
    WeightSchema,
    WeightsError,
    parse_safetensors,
    row_seed,
    safetensors_files,
    state_sha256,
    tensor_specs,
)
from services.rollout.hf_engine import WeightsGate
from services.rollout.protocol import GenerateRequest, Sample


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


class FakeEngine(RolloutEngine):
    """A backend whose generation waits on `release` and whose installs take `install_s` seconds."""

    def __init__(self, install_s: float = 0.05) -> None:
        model = torch.nn.Linear(2, 2)
        schema = WeightSchema.of_module(model)
        super().__init__(
            tokenizer=None,
            schema=schema,
            sha256=state_sha256(model.state_dict(), schema.specs),
            version=0,
            vocab_size=10,
            max_model_len=64,
            eos_token_ids=[],
            seed=0,
        )
        self.install_s, self.live, self.events = install_s, 0, []
        self.release = asyncio.Event()
        self.installed: list[int] = []

    async def _generate(self, prompt_ids, params):
        first = self.live
        self.events.append("generate+")
        await self.release.wait()
        self.events.append("generate-")
        return [
            Sample(
                prompt_index=0,
                token_ids=[1, 2],
                logprobs=[-1.0, -1.0],
                finish_reason="length",
                first_token_version=first,
                last_token_version=self.live,
            )
        ]

    def _prepare(self, staged):
        pass

    async def _install(self, staged):
        self.events.append(f"install{staged.version}+")
        await asyncio.sleep(self.install_s)
        self.live = staged.version
        self.installed.append(staged.version)
        self.events.append(f"install{staged.version}-")

    async def close(self):
        pass


def weights() -> dict[str, torch.Tensor]:
    return {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}


def test_an_update_does_not_wait_for_generation_in_flight():
    async def scenario() -> None:
        engine = FakeEngine()
        gen = asyncio.create_task(engine.generate(GenerateRequest(prompts=[[1]], max_new_tokens=2)))
        await asyncio.sleep(0.01)  # generating, and it will not finish until released
        async with asyncio.timeout(2):
            info = await engine.put_tensors(weights(), 1)
        assert info.version == engine.version == 1
        assert not gen.done()
        engine.release.set()
        resp = await gen
        # the response's version is the oldest token's; the sample says where it ended
        assert resp.policy_version == 0
        assert (resp.samples[0].first_token_version, resp.samples[0].last_token_version) == (0, 1)
        assert engine.events == ["generate+", "install1+", "install1-", "generate-"]

    asyncio.run(scenario())


def test_concurrent_updates_serialise_and_only_higher_versions_install():
    async def scenario() -> None:
        engine = FakeEngine(install_s=0.2)
        two = asyncio.create_task(engine.put_tensors(weights(), 2))
        while "install2+" not in engine.events:
            await asyncio.sleep(0.001)
        results = await asyncio.gather(
            two,
            engine.put_tensors(weights(), 1),  # passes the first check while 2 installs; refused after
            engine.put_tensors(weights(), 3),
            return_exceptions=True,
        )
        assert [type(r).__name__ for r in results] == ["WeightInfo", "VersionConflict", "WeightInfo"]
        assert engine.installed == [2, 3] and engine.version == 3
        # installs never overlap
        assert engine.events == ["install2+", "install2-", "install3+", "install3-"]

    asyncio.run(scenario())


def test_a_failed_install_fails_the_generation_in_flight():
    async def scenario() -> None:
        engine = FakeEngine()

        async def broken(staged):
            raise RuntimeError("device lost")

        engine._install = broken  # type: ignore[method-assign]
        gen = asyncio.create_task(engine.generate(GenerateRequest(prompts=[[1]], max_new_tokens=2)))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineUnavailable, match="device lost"):
            await engine.put_tensors(weights(), 1)
        engine.release.set()
        with pytest.raises(EngineUnavailable, match="device lost"):  # its later tokens: unknown weights
            await gen
        assert not engine.ready

    asyncio.run(scenario())


def test_gate_install_waits_for_the_step_in_progress_and_goes_before_the_next():
    gate, events = WeightsGate(version=4), []
    in_step, finish_step = threading.Event(), threading.Event()

    def first_step() -> None:
        with gate.step() as v:
            events.append(f"step{v}+")
            in_step.set()
            finish_step.wait(2)
            events.append(f"step{v}-")

    def second_step() -> None:
        with gate.step() as v:
            events.append(f"step{v}")

    t1 = threading.Thread(target=first_step)
    t1.start()
    in_step.wait(2)
    installer = threading.Thread(target=gate.install, args=(5, lambda: events.append("rebind")))
    installer.start()
    time.sleep(0.05)
    t2 = threading.Thread(target=second_step)  # arrives while the install waits: must go after it
    t2.start()
    time.sleep(0.05)
    assert events == ["step4+"]
    finish_step.set()
    for t in (t1, installer, t2):
        t.join(2)
    assert events == ["step4+", "step4-", "rebind", "step5"]
    assert gate.version == 5


def test_gate_installs_at_once_when_idle_and_a_failed_rebind_stops_later_steps():
    gate = WeightsGate()
    gate.install(1, lambda: None)  # no step in progress: returns at once
    assert gate.version == 1

    def broken() -> None:
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        gate.install(2, broken)
    assert gate.version == 1
    with pytest.raises(EngineUnavailable, match="version 2 failed: device lost"), gate.step():
        pass


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
