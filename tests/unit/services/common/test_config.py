"""Config layering: default < TOML section < environment < flags; bad values named."""

from dataclasses import dataclass
from typing import ClassVar

import pytest

from services.common.config import ConfigBase, ConfigError, build_config, load, opt


@dataclass
class DemoConfig(ConfigBase):
    """Demo process."""

    SECTION: ClassVar[str] = "demo"
    ENV_PREFIX: ClassVar[str] = "OPD_DEMO_"
    port: int = opt(1, "port")
    rate: float = opt(0.5, "rate")
    name: str = opt("a", "name")
    flag: bool = opt(False, "flag")
    hosts: list[str] = opt(["x"], "hosts")
    path: str | None = opt(None, "path")

    def __post_init__(self) -> None:
        if self.port < 0:
            raise ConfigError(f"port must be >= 0, got {self.port}")


def test_layers_in_order(tmp_path, monkeypatch) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[demo]\nport = 2\nrate = 1\nname = "toml"\nhosts = ["a", "b"]\n[other]\nport = 9\n')
    monkeypatch.setenv("OPD_DEMO_NAME", "env")
    monkeypatch.setenv("OPD_DEMO_FLAG", "true")
    cfg = load(DemoConfig, ["--config", str(toml), "--port", "3"])
    assert (cfg.port, cfg.rate, cfg.name, cfg.flag, cfg.hosts, cfg.path) == (
        3,
        1.0,
        "env",
        True,
        ["a", "b"],
        None,
    )
    cfg = load(DemoConfig, ["--no-flag", "--hosts", "p,q", "--path", "/x"])
    assert (cfg.flag, cfg.hosts, cfg.path) == (False, ["p", "q"], "/x")


def test_defaults_are_fresh_per_instance() -> None:
    a, b = DemoConfig(), DemoConfig()
    a.hosts.append("y")
    assert b.hosts == ["x"]


@pytest.mark.parametrize(
    ("toml", "env", "match"),
    [
        ({"port": "abc"}, {}, "port: expected int"),
        ({"nope": 1}, {}, "unknown key 'nope'"),
        ({"flag": 3}, {}, "flag: expected bool"),
        ({}, {"OPD_DEMO_RATE": "fast"}, "OPD_DEMO_RATE: expected float"),
        ({"port": -1}, {}, "port must be >= 0"),
    ],
)
def test_bad_values_are_named(toml, env, match) -> None:
    with pytest.raises(ConfigError, match=match):
        build_config(DemoConfig, toml, env=env)
