"""Typed configuration: one dataclass per process; CLI flags and environment variables derive from it.

`load(cls, argv, overlay)` is the one loader of every process. Precedence, lowest first: the dataclass default,
the process's section of a TOML file (`--config`), the process's overlay (e.g. a worker's task table), the
environment (`<ENV_PREFIX><FIELD>`, e.g. `OPD_TEACHER_PORT`), then command-line flags (`--port`). Every entry
point reports a bad value the same way (`report_config_errors`: one line on stderr, exit code 2).
Each field's help text lives in `field(metadata={"help": ...})`; defaults are written once, in the class.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, ParamSpec, TypeVar, cast

C = TypeVar("C", bound="ConfigBase")
P = ParamSpec("P")

# One variable holds the weight-update bearer token for both ends: the rollout service and the trainer.
WEIGHTS_TOKEN_ENV = "OPD_WEIGHTS_TOKEN"


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text. Mutable defaults (lists) are copied per instance."""
    if isinstance(default, list | dict):
        return dataclasses.field(
            default_factory=functools.partial(copy.copy, default), metadata={"help": help}, **kw
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional) for `T`, `T | None`, `list[T]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_value(tp: Any, raw: str, name: str) -> Any:
    base, optional = _base_type(tp)
    if optional and raw.strip().lower() in ("", "none", "null"):
        return None
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        if item is Any:
            # Nested values (e.g. token_aliases) have no comma form: flags and env vars carry JSON.
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{name}: expected a JSON list, got {raw!r} ({e.msg})") from e
            if not isinstance(value, list):
                raise ConfigError(f"{name}: expected a JSON list, got {raw!r}")
            return value
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        return [_parse_value(item, p, name) for p in parts]
    if base is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected a boolean, got {raw!r}")
    try:
        return base(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: expected {getattr(base, '__name__', base)}, got {raw!r}") from e


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check/convert a TOML value to the field type."""
    if tp is Any:
        return value  # checked by the config class's __post_init__
    if isinstance(value, str) and _base_type(tp)[0] is not str:
        return _parse_value(tp, value, name)
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must not be null")
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(base)
        return [_coerce(item, v, name) for v in value]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (int, float, str, bool) and not isinstance(value, base):
        raise ConfigError(f"{name}: expected {base.__name__}, got {value!r}")
    if base is int and isinstance(value, bool):
        raise ConfigError(f"{name}: expected int, got {value!r}")
    return value


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(cls: type, field_name: str) -> str:
    return cast(type[ConfigBase], cls).ENV_PREFIX + field_name.upper()


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; all default to None so that unset flags do not override lower layers."""
    parser.add_argument("--config", type=Path, default=None, help="TOML file; this process reads its section")
    hints = typing.get_type_hints(cls)
    values = defaults(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        base, _ = _base_type(tp)
        help_text = f.metadata.get("help", "")
        default = values[f.name]
        help_text = f"{help_text} (default: {default!r}; env {env_name(cls, f.name)})".replace("%", "%%")
        if base is bool:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, type=str, help=help_text)


def read_toml_section(path: Path | None, section: str) -> dict[str, Any]:
    if path is None:
        return {}
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return dict(data.get(section, {}))


def build_config(
    cls: type[C],
    toml_values: dict[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cli: dict[str, Any] | None = None,
) -> C:
    """Merge the layers into an instance of `cls` (whose __post_init__ validates)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cast(Any, cls))}
    values: dict[str, Any] = {}
    for key, value in (toml_values or {}).items():
        if key not in names:
            raise ConfigError(f"[{cls.SECTION}] unknown key {key!r}; known: {sorted(names)}")
        values[key] = _coerce(hints[key], value, key)
    env = os.environ if env is None else env
    for name in names:
        raw = env.get(env_name(cls, name))
        if raw is not None:
            values[name] = _parse_value(hints[name], raw, env_name(cls, name))
    for name, raw in (cli or {}).items():
        if name in names and raw is not None:
            values[name] = raw if isinstance(raw, bool) else _parse_value(hints[name], raw, flag_name(name))
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class Layers:
    """A process's configuration sources before they are merged (what an overlay may look at)."""

    toml: dict[str, Any]  # the process's section of the --config file ({} without one)
    path: Path | None  # the --config file
    env: Mapping[str, str]  # the environment
    cli: dict[str, Any]  # flags given on the command line (unset flags are None)


# Values a process adds between its TOML section and the environment, e.g. a worker's task table.
Overlay = Callable[[Layers], dict[str, Any]]


def load(
    cls: type[C],
    argv: Sequence[str] | None = None,
    overlay: Overlay | None = None,
    *,
    env: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> C:
    """The one config loader of every process.

    Precedence, lowest first: the dataclass defaults, the class's section of the `--config` TOML file,
    `overlay(layers)`, the environment (`<ENV_PREFIX><FIELD>`), then the command-line flags. Raises
    ConfigError (naming the field and the value) for a bad value; argparse exits 2 on an unknown flag.
    """
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0])
    add_arguments(parser, cls)
    cli = vars(parser.parse_args(None if argv is None else list(argv)))
    path = cli.pop("config")
    env = os.environ if env is None else env
    toml = read_toml_section(path, cls.SECTION)
    values = dict(toml)
    if overlay is not None:
        values.update(overlay(Layers(toml=toml, path=path, env=env, cli=cli)))
    return build_config(cls, values, env=env, cli=cli)


def defaults(cls: type) -> dict[str, Any]:
    """Each field's default, as written in the class (for checks that read raw TOML sections)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def report_config_errors(prog: str) -> Callable[[Callable[P, int]], Callable[P, int]]:
    """Decorate a process's `main`: a ConfigError anywhere in it becomes one line on stderr
    (`<prog>: <field>: <why>`) and exit code 2, never a traceback. The one way every entry point reports
    a bad configuration."""

    def wrap(main: Callable[P, int]) -> Callable[P, int]:
        @functools.wraps(main)
        def wrapped(*args: P.args, **kwargs: P.kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except ConfigError as e:
                print(f"{prog}: {e}", file=sys.stderr)
                return 2

        return wrapped

    return wrap


def load_section(cls: type[C], path: Path | str, **overrides: Any) -> C:
    """Build a config from a TOML file's section plus keyword overrides (used by `opd up` and tests)."""
    values = read_toml_section(Path(path), cls.SECTION)
    values.update(overrides)
    return build_config(cls, values, env={})


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class ConfigBase:
    """Marker base: subclasses set SECTION (TOML table) and ENV_PREFIX."""

    SECTION: ClassVar[str] = ""
    ENV_PREFIX: ClassVar[str] = "OPD_"
