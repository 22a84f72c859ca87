"""What `opd toy prepare` and `opd toy prepare-multi` share: config checks, the cache keyed by config hash,
meta.json as the commit marker, the torch thread setting while training, and the CLI entry point.

A cache is a directory whose meta.json records the hash of every config field that changes the outputs
(`config_hash`); it is written last, so a crash mid-build leaves no meta.json and the next call rebuilds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from rich.table import Table

from services.common.config import ConfigBase, ConfigError, load, opt, report_config_errors

# Fields that say where or how fast to run, not what is made: they are left out of the cache key.
NOT_HASHED = ("out", "force", "device", "threads")


@dataclass
class CachedBuildConfig(ConfigBase):
    """The fields every toy build has: where it goes, its seed, and the NOT_HASHED ones that say how to run
    it. Subclasses set SECTION and ENV_PREFIX, override `out` with their own default, add the rest."""

    SECTION: ClassVar[str] = ""

    out: str = opt("", "output directory")
    seed: int = opt(0, "seed of the data, the initialisations and the training streams")
    device: str = opt("cpu", "torch device for training and evaluation (cpu, cuda, cuda:1, ...)")
    force: bool = opt(False, "retrain even when the cache matches the config")
    threads: int = opt(0, "torch CPU threads; 0 = the cores the 1-minute load average leaves idle (>= 1)")


def hashed_fields(cfg: Any) -> dict[str, Any]:
    """The config fields that change the outputs (meta.json's "config")."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_HASHED}


def config_hash(cfg: Any, recipe_version: int) -> str:
    """16 hex digits of sha256 over the hashed fields and the recipe version (the cache key)."""
    blob = json.dumps({"recipe": recipe_version, **hashed_fields(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_model_shape(cfg: Any) -> None:
    """hidden_size / num_heads must be a head_dim vLLM's CPU attention supports."""
    if cfg.hidden_size % cfg.num_heads or cfg.hidden_size // cfg.num_heads not in (32, 64):
        raise ConfigError(
            f"hidden_size / num_heads must be 32 or 64 (vLLM's CPU attention), got "
            f"{cfg.hidden_size} / {cfg.num_heads}"
        )


def check_digits(cfg: Any) -> None:
    if not 1 <= cfg.min_digits <= cfg.max_digits <= 9:
        raise ConfigError(f"need 1 <= min_digits <= max_digits <= 9, got {cfg.min_digits}, {cfg.max_digits}")


def check_at_least_one(cfg: Any, names: Iterable[str]) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def check_rates(cfg: Any, names: Iterable[str]) -> None:
    """Each named field is a rate in (0, 1] (a target or a top-p: 0 would never stop or never sample)."""
    for name in names:
        if not 0.0 < getattr(cfg, name) <= 1.0:
            raise ConfigError(f"{name} must be in (0, 1], got {getattr(cfg, name)}")


def auto_threads() -> int:
    """Cores the recent load leaves (at least partly) idle: an OpenMP thread sharing a core with another
    busy process spin-waits at every barrier, and a step can run 5-10x slower than with fewer threads."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, math.ceil(cores - os.getloadavg()[0])))


@contextmanager
def training_threads(cfg: Any) -> Iterator[int]:
    """Train on `cfg.threads` torch threads (0: `auto_threads()`), restored on exit so that a caller in the
    same process keeps its own setting; Hugging Face progress bars are off (our own bars only)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    threads, threads_before = cfg.threads or auto_threads(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads_before)


def meta_header(cfg: Any, recipe_version: int, threads: int) -> dict[str, Any]:
    """The first fields of every meta.json: the cache key and what it was computed from."""
    return {
        "config_hash": config_hash(cfg, recipe_version),
        "recipe_version": recipe_version,
        "config": hashed_fields(cfg),
        "device": cfg.device,
        "threads": threads,
    }


@dataclass
class PrepareResult:
    paths: Any  # the caller's paths object (ToyPaths, MultiPaths)
    meta: dict[str, Any]
    cached: bool  # True when the cache matched and nothing was trained
    seconds: float


def cached_meta(
    meta_path: Path, key: str, needed: Sequence[Path], force: bool = False
) -> dict[str, Any] | None:
    """The meta.json at `meta_path` when it records `key` and every `needed` file exists, else None."""
    if force or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("config_hash") != key or not all(p.is_file() for p in needed):
        return None
    return meta


def prepare_cached(
    cfg: Any, paths: Any, key: str, needed: Sequence[Path], build: Callable[[], dict[str, Any]]
) -> PrepareResult:
    """Return the cache under `paths` (with `paths.meta`) when it matches `key`, else `build()` it."""
    t0 = time.perf_counter()
    meta = cached_meta(paths.meta, key, needed, force=cfg.force)
    cached = meta is not None
    if meta is None:
        paths.meta.unlink(missing_ok=True)  # the commit marker goes first: a crash leaves no stale cache
        text = json.dumps(build(), indent=2) + "\n"
        paths.meta.write_text(text)
        meta = json.loads(text)  # what a cached call returns (JSON lists, not tuples)
    return PrepareResult(paths, meta, cached=cached, seconds=time.perf_counter() - t0)


def how_made(result: PrepareResult) -> str:
    """Table-title words: how long the build took, whether this call found it cached, and this call's time."""
    meta = result.meta
    how = f"trained in {meta['seconds']:.0f} s on {meta['threads']} threads"
    how = f"cached; {how} earlier" if result.cached else how
    return f"{how}; this call {result.seconds:.1f} s"


def run_cli(
    config_cls: type,
    prepare: Callable[[Any], PrepareResult],
    summary_table: Callable[[PrepareResult], Table],
    prog: str,
    argv: list[str] | None,
) -> int:
    """Parse the config (exit 2 with the reason on a bad one), prepare, print the summary table."""

    @report_config_errors(prog)
    def main() -> int:
        cfg = load(config_cls, argv, prog=prog)
        Console().print(summary_table(prepare(cfg)))
        return 0

    return main()
