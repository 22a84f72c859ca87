"""trainer.config: defaults, validation messages, the layers (TOML < env < flags), and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import ConfigError, build_config, load, load_section
from trainer.config import TrainerConfig

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_defaults_are_the_papers():
    cfg = TrainerConfig(model="m")
    assert (cfg.batch_size, cfg.mini_batch_size, cfg.lr, cfg.steps_per_batch) == (128, 64, 2e-6, 2)
    assert (cfg.objective, cfg.support, cfg.renormalize, cfg.special_token_masking) == (
        "lsm",
        "teacher_topk",
        True,
        True,
    )
    assert cfg.consumer == "trainer-0" and cfg.checkpoint_every == 1 and cfg.push_every == 1
    assert TrainerConfig(model="m", batch_size=130, mini_batch_size=64).steps_per_batch == 3


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(model=""), "model: required"),
        (dict(objective="kl"), "objective: 'kl'"),
        (dict(support="any"), "support: 'any'"),
        (dict(mini_batch_size=256), "mini_batch_size: 256 > batch_size 128"),
        (dict(gamma=1.5), "gamma: 1.5"),
        (dict(run="a:b"), "run: 'a:b'"),
        (dict(max_policy_lag=-1), "max_policy_lag: -1 < 0"),
        (dict(eval_every=5), "eval_file: required"),
        (dict(objective="full_kl", support="student_topk"), "support: full_kl"),
        (dict(push_mode="shared", rollout_urls=["http://x"]), "shared_weights_dir: required"),
        (dict(weights_token_file="/no/such/file"), "weights_token_file"),
    ],
)
def test_validation_names_the_bad_value(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainerConfig(**{"model": "m", **kw})


def test_layers_and_flags(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('[trainer]\nmodel = "from-toml"\nbatch_size = 16\nmini_batch_size = 8\ntop_k = 4\n')
    cfg = load(
        TrainerConfig,
        [
            "--config",
            str(toml),
            "--top-k",
            "5",
            "--resume",
            "--rollout-urls",
            "http://a:1,http://b:2",
            "--masked-token-ids",
            "3,7",
        ],
    )
    assert (cfg.model, cfg.batch_size, cfg.top_k, cfg.resume) == ("from-toml", 16, 5, True)
    assert cfg.rollout_urls == ["http://a:1", "http://b:2"] and cfg.masked_token_ids == [3, 7]
    env_cfg = build_config(
        TrainerConfig, {"model": "m"}, env={"OPD_TRAINER_OBJECTIVE": "gamma", "OPD_TRAINER_GAMMA": "0.5"}
    )
    assert (env_cfg.objective, env_cfg.gamma) == ("gamma", 0.5)


def test_token_from_file_or_env(tmp_path, monkeypatch):
    f = tmp_path / "tok"
    f.write_text("s3cret\n")
    monkeypatch.setenv("OPD_WEIGHTS_TOKEN", "from-env")
    assert TrainerConfig(model="m", weights_token_file=str(f)).resolve_token() == "s3cret"
    assert TrainerConfig(model="m").resolve_token() == "from-env"


@pytest.mark.parametrize("name", ["paper_math.toml", "trainer_cpu_small.toml"])
def test_shipped_configs_load(name):
    cfg = load_section(TrainerConfig, CONFIGS / name)
    assert cfg.objective == "lsm" and cfg.steps_per_batch == 2
    if name == "paper_math.toml":
        assert (cfg.lr, cfg.batch_size, cfg.mini_batch_size, cfg.max_seq_len, cfg.top_k) == (
            2e-6,
            128,
            64,
            16384,
            16,
        )


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    import math

    from trainer.train import lr_at

    base = dict(model="m", redis_url="redis://x", max_batches=110, lr=1e-3)
    const = TrainerConfig(**base)
    assert [lr_at(const, b) for b in (0, 50, 109)] == [1e-3] * 3  # the default keeps the old behaviour

    cfg = TrainerConfig(**base, lr_warmup_batches=10, lr_decay="cosine", lr_min_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(1e-4) and lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)  # decay starts at the peak
    # Halfway through the decay: floor + (1 - floor) * (1 + cos(pi/2)) / 2.
    assert lr_at(cfg, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert lr_at(cfg, 110) == pytest.approx(1e-4) and lr_at(cfg, 500) == pytest.approx(1e-4)
    lrs = [lr_at(cfg, b) for b in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True))  # monotone after the warmup


@pytest.mark.parametrize(
    "bad",
    [
        {"lr_decay": "linear"},
        {"lr_warmup_batches": -1},
        {"lr_min_ratio": 1.5},
        {"lr_decay": "cosine", "max_batches": 0},
    ],
)
def test_lr_schedule_bad_values_are_refused(bad):
    base = dict(model="m", redis_url="redis://x", max_batches=10)
    with pytest.raises(ConfigError):
        TrainerConfig(**{**base, **bad})
